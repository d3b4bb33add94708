"""The documentation site: `mkdocs build --strict` succeeds (a broken link or anchor, a stale snippet, a page left out
of the navigation or an SDK name that no longer exists fails it), the pages generated from the code say what the
code says, every repository path the pages name exists, the analysts' example queries run on the current ClickHouse
schema, and `pixelpipe docs` serves it."""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from pixelpipe.cli import main
from pixelpipe.core.clickhouse import ChdbClient, connect
from pixelpipe.core.settings import Settings
from pixelpipe.producers import Publisher
from pixelpipe.schemas import SCHEMA_DIR
from pixelpipe.sinks.clickhouse.migrate import apply_migrations
from pixelpipe.tools.stack import free_port
from pixelpipe.tools.stack.settings import StackSettings

ROOT = Path(__file__).resolve().parents[2]
QUIET = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, printed on every build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", ROOT / "mkdocs.yml", "--site-dir", out],
        cwd=ROOT,
        env=QUIET,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-6000:]}"
    return out


def _text(site: Path, page: str) -> str:
    """A built page's article as plain text, whitespace collapsed."""
    article = (site / page / "index.html").read_text().split("<article", 1)[1].split("</article>", 1)[0]
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", article)))


def _rows(site: Path, page: str) -> list[list[str]]:
    """Every table row of a built page, as the plain text of its cells."""
    source = (site / page / "index.html").read_text()
    return [
        [re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", cell))).strip() for cell in cells]
        for row in re.findall(r"<tr>(.*?)</tr>", source, re.S)
        if (cells := re.findall(r"<td[^>]*>(.*?)</td>", row, re.S))
    ]


def test_every_page_of_the_navigation_is_built(site: Path):
    nav_pages = re.findall(r"([\w/-]+)\.md$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav_pages) > 30
    missing = [page for page in nav_pages if not (site / page.removesuffix("index") / "index.html").is_file()]
    assert not missing, missing


def test_the_configuration_page_is_every_setting_with_its_default_and_meaning(site: Path):
    rows = {row[0]: row[1:] for row in _rows(site, "operators/configuration")}
    for section in [*Settings.sections(), StackSettings]:
        for field in dataclasses.fields(section):
            default = str(field.default) if field.default != "" else "empty"
            meaning = re.sub(r"\s+", " ", field.metadata["doc"].replace("`", ""))
            assert rows.get(field.metadata["env"]) == [default, meaning], field.metadata["env"]


def _records(kind: object) -> Iterator[dict]:
    """The records of an Avro type, the ones declared inside its fields included (StoredImage, CategoryScore)."""
    if isinstance(kind, list):
        for branch in kind:
            yield from _records(branch)
    elif isinstance(kind, dict):
        if kind["type"] == "record":
            yield kind
            for field in kind["fields"]:
                yield from _records(field["type"])
        yield from _records(kind.get("items"))
        yield from _records(kind.get("values"))


def test_the_contracts_page_has_every_field_of_every_schema(site: Path):
    text = _text(site, "upstream/contracts-reference")
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        schema = json.loads(path.read_text())
        assert f"schemas/{path.name}" in text and schema["doc"] in text, path.name
        for record in _records(schema):
            for field in record["fields"]:
                assert field["name"] in text and field.get("doc", "") in text, (path.name, field["name"])


def test_the_sdk_reference_is_read_from_the_source(site: Path):
    text = _text(site, "upstream/sdk-reference")
    for name in (
        "Publisher",
        "new_request",
        "PixelpipeClient",
        "AsyncPixelpipeClient",
        "CancelOutcome",
        "results.collect",
    ):
        assert f"pixelpipe.producers.{name}" in text
    bare = re.sub(r"\s", "", text)
    for method in (Publisher.publish, Publisher.cancel, Publisher.close):
        assert re.sub(r"[`\s]", "", inspect.getdoc(method) or "") in bare, method


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_the_cli_reference_has_every_command_and_option(site: Path):
    source = (site / "upstream/cli-reference/index.html").read_text()
    text = _text(site, "upstream/cli-reference")
    for path, command in _commands(main):
        assert f'id="pixelpipe-{"-".join(path)}"' in source, path
        options = [opt for parameter in command.params if isinstance(parameter, click.Option) for opt in parameter.opts]
        assert all(option in text for option in options), (path, options)


def test_every_repository_path_the_pages_name_exists():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folders = {name.split("/", 1)[0] for name in tracked.splitlines() if "/" in name}
    stale = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks show commands and output
        for name in re.findall(r"`([^`\s]+)`", prose):
            if name.split("/", 1)[0] not in folders or "/" not in name or re.search(r"[*<>…{}$]|\bvN\b", name):
                continue  # not a path, or a pattern: `analytics/dashboards/*.sql`, `tests/fixtures/vN/`
            if not (ROOT / name.split(":", 1)[0]).exists():
                stale.append(f"{page.relative_to(ROOT)}: {name}")
    assert not stale, "pages name paths that do not exist:\n" + "\n".join(stale)


def test_the_example_queries_run_on_the_current_schema(tmp_path: Path):
    queries = re.findall(r"```sql\n(.*?)```", (ROOT / "docs/analysts/queries.md").read_text(), re.S)
    assert len(queries) >= 5
    client = connect(f"chdb://{tmp_path}")
    assert isinstance(client, ChdbClient)
    try:
        apply_migrations(client)
        for query in queries:
            client.execute(query)  # raises for a table or column the schema does not have
    finally:
        client.close()


def test_pixelpipe_docs_serves_the_site():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pixelpipe", "docs", "--port", str(port)],
        cwd=ROOT,
        env=QUIET,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180  # the first build, on a loaded 2-core machine
        page = None
        while page is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/operators/configuration/", timeout=5) as reply:
                    page = reply.read().decode()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert page is not None, f"pixelpipe docs served nothing (exit {server.poll()})"
        assert "PIXELPIPE_KAFKA_BOOTSTRAP" in page
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
