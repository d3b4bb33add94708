"""Fixtures the integration tests share beyond the servers: the README's demo, run once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pixelpipe.core.settings import Settings
from tests.conftest import with_own_topics


@dataclass(frozen=True)
class DemoRun:
    """What `pixelpipe demo --requests 20` left in ``cwd``: chDB under data/clickhouse, images under data/objects."""

    cwd: Path
    env: dict[str, str]
    done: subprocess.CompletedProcess[str]

    @property
    def clickhouse_url(self) -> str:
        return f"chdb://{self.cwd / 'data' / 'clickhouse'}"


@pytest.fixture(scope="session")
def demo_run(servers: Settings, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo on the test servers with embedded ClickHouse and file storage, in a directory of its own; the
    tests that read what it wrote (the demo's own summary, the dashboards) share the one run."""
    cwd = tmp_path_factory.mktemp("demo")
    env = (
        os.environ
        | with_own_topics(servers).to_env()
        | {
            "PIXELPIPE_CLICKHOUSE_URL": "chdb://./data/clickhouse",
            "PIXELPIPE_OBJECT_STORE_URL": "file://./data/objects",
            "PIXELPIPE_MODEL_REGISTRY": "./data/models/registry.json",
            "PIXELPIPE_EXPERIMENTS_FILE": "./experiments.json",
            "PIXELPIPE_CONSUMER_GROUP": f"demo-{uuid.uuid4().hex[:8]}",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "pixelpipe", "demo", "--requests", "20"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return DemoRun(cwd, env, done)
