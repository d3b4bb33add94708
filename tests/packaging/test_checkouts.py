"""Two checkouts on one machine each run their own code: scripts/setup.sh shares the dependencies (the environment
keyed by requirements.lock) and installs each checkout's pixelpipe in a small environment of its own (.venv).

Before, the shared environment's editable install pointed at whichever checkout ran setup.sh last, so a benchmark's
baseline checkout or a colleague's branch silently ran the other's code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]
WHERE = "import pixelpipe, pixelpipe.processors; print(pixelpipe.__file__); print(pixelpipe.processors.__file__)"


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _clone(at: Path, marker: str) -> Path:
    """A clone of this repository's HEAD with one commit of its own on top: a different commit, the same pins."""
    _git("clone", "--quiet", "--shared", str(REPO), str(at), cwd=REPO)
    (at / "pixelpipe" / "checkout_marker.py").write_text(f'MARKER = "{marker}"\n')
    _git("add", "pixelpipe/checkout_marker.py", cwd=at)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", marker, cwd=at)
    return at


def _where(checkout: Path, setup: bool) -> list[str]:
    """Where ``python`` finds pixelpipe, with the checkout's environment activated by setup.sh, or its own python
    run directly (as a process it spawned, or a later shell, would)."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    code = f"{WHERE}; from pixelpipe.checkout_marker import MARKER; print(MARKER)"
    if setup:
        command = ["bash", "-c", f'source scripts/setup.sh >/dev/null 2>&1 && python -c "{code}"']
    else:
        command = [str(checkout / ".venv" / "bin" / "python"), "-c", code]
    return subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True, text=True).stdout.split()


def test_two_checkouts_of_different_commits_each_run_their_own_code(tmp_path):
    first, second = _clone(tmp_path / "first", "first"), _clone(tmp_path / "second", "second")
    for checkout in (first, second):
        package, processors, marker = _where(checkout, setup=True)
        assert Path(package).is_relative_to(checkout) and Path(processors).is_relative_to(checkout)
        assert marker == checkout.name
    # The first checkout's environment still runs the first's code after the second's setup ran.
    package, processors, marker = _where(first, setup=False)
    assert Path(processors).is_relative_to(first) and marker == "first"
