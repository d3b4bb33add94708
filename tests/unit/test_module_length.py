"""Modules of the runtime's busiest folders stay small enough to have one job: over MAX_LINES lines, a module is split,
or its docstring has a line that starts with ONE_JOB and says why it is one job all the same."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
CHECKED = ("pixelpipe.processors", "pixelpipe.gateway", "pixelpipe.analytics")
MAX_LINES = 500
ONE_JOB = "One job:"


def unexplained_length(source: str) -> int | None:
    """The module's line count when it is over MAX_LINES and its docstring has no line ``One job: <why>``."""
    lines = len(source.splitlines())
    if lines <= MAX_LINES:
        return None
    docstring = ast.get_docstring(ast.parse(source)) or ""
    explained = any(
        line.strip().startswith(ONE_JOB) and line.strip()[len(ONE_JOB) :].strip() for line in docstring.splitlines()
    )
    return None if explained else lines


def test_long_modules_are_split_or_say_why_they_are_one_job():
    folders = [ROOT / PACKAGE_DIRS[package] for package in CHECKED]
    long = {
        f"{path.relative_to(ROOT)}: {lines} lines"
        for folder in folders
        for path in sorted(folder.rglob("*.py"))
        if (lines := unexplained_length(path.read_text())) is not None
    }
    assert not long, (
        f"over {MAX_LINES} lines without a docstring line '{ONE_JOB} <why>'; split them by job, or say why each is "
        f"one: {sorted(long)}"
    )


def _module(docstring: str, lines: int) -> str:
    """A module of ``lines`` lines, its docstring included."""
    head = f'"""{docstring}"""'
    return "\n".join([head, *(f"x{i} = {i}" for i in range(lines - len(head.splitlines())))]) + "\n"


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        (_module("Short.", MAX_LINES), None),
        (_module("Long, with no reason.", MAX_LINES + 1), MAX_LINES + 1),
        (_module("Long.\n\nOne job: the parser of one grammar, whose rules refer to each other.", 600), None),
        (_module("Long.\n\nOne job:", 600), 600),  # the marker alone says nothing
        (_module("Long; One job: a phrase inside a line is no marker.", 600), 600),
    ],
)
def test_the_length_check_flags_only_long_modules_without_a_reason(source, flagged):
    assert unexplained_length(source) == flagged
