"""What renders nothing imports no torch (seconds and gigabytes at every start): a moderation-only worker, its stage
built as `pixelpipe worker --stages moderation` builds it, model registry included, and the gateway reading the
registry. Each runs in a fresh interpreter, so nothing an earlier test imported can hide an import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RENDER_LIBRARIES = ("torch", "diffusers", "transformers")
LOADED = "loaded:"  # marks the probe's own line on stdout


def loaded_render_libraries(code: str, env: dict[str, str] | None = None) -> list[str]:
    """The render libraries a fresh interpreter has imported after running ``code``."""
    loaded = f"json.dumps([name for name in {RENDER_LIBRARIES!r} if name in sys.modules])"
    probe = f"{code}\nimport json, sys\nprint({LOADED!r} + {loaded})"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=os.environ | (env or {}), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith(LOADED))
    return json.loads(line.removeprefix(LOADED))


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.json"
    models = {"sd": {"path": str(tmp_path), "default_steps": 20}, "null": {"kind": "null", "seconds_per_image": 0.01}}
    path.write_text(json.dumps(models))
    return path


def test_a_moderation_worker_imports_no_torch(registry: Path, tmp_path: Path):
    build = """
import pixelpipe.cli  # the command's own imports
import pixelpipe.processors.app
from pixelpipe.core.cli import load_settings
from pixelpipe.processors.build import build_stages

stage = build_stages(load_settings(), ["moderation"])["moderation"]
assert stage.registry.names() == ["null", "sd"], stage.registry.names()
"""
    env = {
        "PIXELPIPE_MODEL_REGISTRY": str(registry),
        "PIXELPIPE_MODERATION_STAMP_KEY": "a-test-key",
        "PIXELPIPE_OBJECT_STORE_URL": f"file://{tmp_path / 'objects'}",
        "PIXELPIPE_EXPERIMENTS_FILE": str(tmp_path / "no-experiments.json"),
    }
    assert loaded_render_libraries(build, env) == []


def test_the_gateway_reads_the_registry_without_torch(registry: Path):
    read = f"""
import pixelpipe.gateway.app
from pixelpipe.gateway.params import read_registry

assert [model.default_steps for model in read_registry({str(registry)!r}).values()] == [20, 25]
"""
    assert loaded_render_libraries(read) == []


def test_the_probe_sees_torch_where_the_render_side_imports_it():
    assert "torch" in loaded_render_libraries("import pixelpipe.processors.render")
