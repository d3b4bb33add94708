"""The wheel as a user gets it: built without warnings, holding every module and data file, and installed with its
declared dependencies (no extras) into a fresh virtual environment where `pixelpipe --help` and one moderation work.

Installing torch and the rest from scratch would download GBs each run. uv installs from its cache instead
(~/.cache/uv, hard links), which scripts/setup.sh warms by building the suite's own environment with the same uv:
a run takes about a minute, the first on a machine downloads what the cache lacks, once. requirements.lock
constrains the resolution, so the environment gets the CI pins, and a test checks that nothing outside the lock
was needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
# First run on a machine with a cold uv cache: torch and CUDA wheels are GBs to download.
pytestmark = [pytest.mark.packaging, pytest.mark.timeout(1800)]

# Git-ignored outputs of builds and runs at the repository root (.gitignore), and caches anywhere.
_ROOT_IGNORED = {".git", "build", "data", "out", "dist", ".venv", "venv"}
_IGNORED = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n in _IGNORED or n.endswith((".egg-info", ".pyc"))}
    if Path(directory) == REPO:
        ignored |= _ROOT_IGNORED & set(names)
    return ignored


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_normalize(name)] = version
    return pins


def _package_files(src: Path) -> set[str]:
    """The paths inside the wheel of every file in the package folders, as pyproject.toml maps them."""
    setuptools = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = set()
    for package, folder in setuptools["package-dir"].items():
        root = src / folder
        for path in root.rglob("*"):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(p in _IGNORED or p.startswith(".") for p in parts) and path.suffix != ".pyc":
                files.add("/".join([*package.split("."), *parts]))
    return files


@dataclass(frozen=True)
class Built:
    src: Path
    wheel: Path
    log: str


@dataclass(frozen=True)
class Installed:
    venv: Path
    elsewhere: Path  # a working directory outside the checkout, so only the installed package can be imported
    env: dict[str, str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    # A clean copy: an in-tree build reuses build/ and *.egg-info, whose stale files would reach the wheel.
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    # The build environment is the suite's: the pinned setuptools, no index, no pip configuration of the machine.
    # PYTHONDONTWRITEBYTECODE only makes setuptools warn that it skips byte-compiling, which wheels never hold.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONDONTWRITEBYTECODE"}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    out = tmp / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    result = subprocess.run(
        command, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-5000:]
    [wheel] = out.glob("pixelpipe-*.whl")
    return Built(src=src, wheel=wheel, log=result.stdout)


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            pytest.fail("uv is missing: it is in the test extra and requirements.lock (source scripts/setup.sh)")
        return found
    return find_uv_bin()


def _run(command: list[str | Path], timeout: float, **kwargs: object) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout[-8000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    # Beside the suite's environment, so on the file system of uv's cache (~/.cache) and hard links work.
    cache = Path(os.environ.get("PIXELPIPE_CACHE_DIR") or Path.home() / ".cache" / "pixelpipe")
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("wheel-test-*"):  # left by a run that was killed; a day old, so not a concurrent one
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    venv = Path(tempfile.mkdtemp(prefix="wheel-test-", dir=cache))
    try:
        uv = _uv()
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
        env["UV_NO_PROGRESS"] = "1"
        _run([uv, "venv", "--quiet", "--allow-existing", "--python", sys.executable, venv], timeout=120, env=env)
        # The wheel and what it declares, no extras: what `pip install pixelpipe` gives, at the pins of the lock.
        install = [uv, "pip", "install", "--python", venv / "bin" / "python", "--constraint", LOCK, built.wheel]
        # From the cache alone when it has everything (seconds, no index); else from the index, once per machine.
        offline = subprocess.run([*map(str, install), "--offline"], capture_output=True, timeout=300, env=env)
        if offline.returncode != 0:
            _run(install, timeout=1500, env=env)
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        run_env = env | {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "HF_HUB_OFFLINE": "1",
            "PIXELPIPE_CACHE_DIR": str(elsewhere / "cache"),
        }
        yield Installed(venv=venv, elsewhere=elsewhere, env=run_env)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_wheel_builds_without_warnings(built: Built) -> None:
    warnings = [line for line in built.log.splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert not warnings, "the build warned:\n" + "\n".join(warnings)


def test_wheel_holds_every_module_and_data_file_of_the_package_folders(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = {n for n in wheel.namelist() if not n.startswith("pixelpipe-") and not n.endswith("/")}
    expected = _package_files(built.src)
    # The data files that the runtime opens by path, named here so that a change of mapping cannot drop them all.
    for data in (
        "pixelpipe/schemas/ImageRequest.avsc",
        "pixelpipe/schemas/v1/ImageRequest.avsc",
        "pixelpipe/sinks/clickhouse/migrations/0001_raw_tables.sql",
        "pixelpipe/analytics/dashboards/throughput.sql",
        "pixelpipe/analytics/grafana/dashboards/pixelpipe.json",
        "pixelpipe/analytics/grafana/provisioning/datasources/clickhouse.yaml",
        "pixelpipe/analytics/experiments.example.json",
        "pixelpipe/tools/stack/maven/kafka.xml",
    ):
        assert data in expected, f"{data} is not in the source tree any more: update this test"
    missing, extra = sorted(expected - names), sorted(names - expected)
    assert not missing, f"missing from the wheel (list the package or its data in pyproject.toml): {missing}"
    assert not extra, f"in the wheel but not in the package folders: {extra}"


def test_install_needs_nothing_outside_the_lock(installed: Installed) -> None:
    freeze = _run(
        [_uv(), "pip", "freeze", "--python", installed.venv / "bin" / "python"], timeout=60, env=installed.env
    )
    pins = _lock_pins()
    found = {}
    for line in freeze.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            found[_normalize(name)] = version
    unpinned = sorted(f"{name}=={version}" for name, version in found.items() if name not in pins)
    assert not unpinned, f"the wheel's dependencies need packages that requirements.lock does not pin: {unpinned}"
    assert all(found[name] == pins[name] for name in found)
    # The runtime closure has the moderation models and the render stack, with no test or stack tools.
    assert {"alt-profanity-check", "nudenet", "torch", "diffusers", "matplotlib"} <= set(found)
    assert not {"pytest", "moto", "ruff", "uv"} & set(found)


def test_installed_pixelpipe_help(installed: Installed) -> None:
    out = _run(["pixelpipe", "--help"], timeout=120, cwd=installed.elsewhere, env=installed.env)
    assert "Usage: pixelpipe" in out
    for command in ("worker", "publish", "stack", "demo", "analyze", "clickhouse"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), f"no {command} command in:\n{out}"


MODERATE = textwrap.dedent(
    """
    import importlib.resources
    import json

    from PIL import Image

    import pixelpipe
    from pixelpipe.processors.moderation import OUTPUT_IMAGE, ImageModerator, PromptModerator

    prompts = PromptModerator()
    benign = prompts.check("a watercolour of a lighthouse at dawn")
    violent = prompts.check("a gory massacre of villagers")
    [image] = ImageModerator().check([Image.new("RGB", (96, 64), (40, 120, 200))], OUTPUT_IMAGE)
    data = [
        importlib.resources.files(package).joinpath(name).is_file()
        for package, name in (
            ("pixelpipe.schemas", "ImageRequest.avsc"),
            ("pixelpipe.sinks.clickhouse", "migrations/0001_raw_tables.sql"),
            ("pixelpipe.analytics", "grafana/dashboards/pixelpipe.json"),
            ("pixelpipe.tools.stack", "maven/kafka.xml"),
        )
    ]
    print("VERDICTS", json.dumps({
        "module": pixelpipe.__file__,
        "benign": benign.allowed,
        "violent": violent.rejected_categories,
        "image": image.allowed,
        "data": data,
    }))
    """
)


def test_installed_pixelpipe_moderates(installed: Installed) -> None:
    out = _run(
        [installed.venv / "bin" / "python", "-c", MODERATE], timeout=300, cwd=installed.elsewhere, env=installed.env
    )
    [line] = [line for line in out.splitlines() if line.startswith("VERDICTS ")]
    verdicts = json.loads(line.removeprefix("VERDICTS "))
    assert Path(verdicts["module"]).is_relative_to(installed.venv), verdicts["module"]
    assert verdicts["benign"] is True
    assert "violence" in verdicts["violent"]
    assert verdicts["image"] is True
    assert all(verdicts["data"]), verdicts["data"]
