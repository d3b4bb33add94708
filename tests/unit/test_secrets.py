"""Secrets never shown: `pixelpipe config`, error messages and log lines mask URL passwords and secret parameters."""

import json
import logging
import os
import subprocess
import sys

import pytest

from pixelpipe.core.logs import JsonFormatter
from pixelpipe.core.settings import mask_secrets

PASSWORD = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("clickhouse://u:hunter2@h:9000/db", "clickhouse://u:***@h:9000/db"),
        ("clickhouse://u:p@ss@h:9000/db", "clickhouse://u:***@h:9000/db"),  # an @ in the password
        ("clickhouse://:pw@h/db", "clickhouse://:***@h/db"),
        ("clickhouse://h:9000/db?password=hunter2&secure=True", "clickhouse://h:9000/db?password=***&secure=True"),
        ("https://reg:8081/?api_key=k&design=1", "https://reg:8081/?api_key=***&design=1"),
        ("https://s3/b/k?X-Amz-Signature=ab&X-Amz-Expires=60", "https://s3/b/k?X-Amz-Signature=***&X-Amz-Expires=60"),
        ("connect to s3://id:key@bucket/x failed", "connect to s3://id:***@bucket/x failed"),
        # nothing secret: unchanged
        ("clickhouse://default@127.0.0.1:9000/default", "clickhouse://default@127.0.0.1:9000/default"),
        ("chdb://./data/clickhouse", "chdb://./data/clickhouse"),
        ("time 12:30, see http://h:8123/?query=1", "time 12:30, see http://h:8123/?query=1"),
    ],
)
def test_mask_secrets(text, shown):
    assert mask_secrets(text) == shown


def test_log_lines_mask_what_they_quote():
    record = logging.makeLogRecord(
        {"msg": "cannot connect to clickhouse://u:%s@h/db", "args": (PASSWORD,), "url": f"https://r/?token={PASSWORD}"}
    )
    line = JsonFormatter().format(record)
    assert PASSWORD not in line
    assert json.loads(line)["msg"] == "cannot connect to clickhouse://u:***@h/db"


def run(*args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIXELPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "pixelpipe", *args], env=clean | env, capture_output=True, text=True, timeout=120
    )


def test_pixelpipe_config_masks_every_url_credential():
    shown = run(
        "config",
        PIXELPIPE_CLICKHOUSE_URL=f"clickhouse://h:9000/db?user=u&password={PASSWORD}",
        PIXELPIPE_SCHEMA_REGISTRY_URL=f"https://svc:{PASSWORD}@registry:8081",
        PIXELPIPE_S3_ENDPOINT_URL=f"https://minio:9000/?access_key={PASSWORD}",
        PIXELPIPE_S3_SECRET_ACCESS_KEY=PASSWORD,
    )
    assert shown.returncode == 0, shown.stderr
    assert PASSWORD not in shown.stdout + shown.stderr
    settings = json.loads(shown.stdout)
    assert settings["clickhouse"]["url"] == "clickhouse://h:9000/db?user=u&password=***"
    assert settings["kafka"]["schema_registry_url"] == "https://svc:***@registry:8081"
    assert settings["objects"]["s3_secret_access_key"] == "***"


def test_the_migrate_command_does_not_quote_a_password_it_cannot_use():
    done = run("clickhouse", "migrate", PIXELPIPE_CLICKHOUSE_URL=f"http://u:{PASSWORD}@h:8123/db")
    assert done.returncode == 1
    assert "unsupported ClickHouse URL" in done.stderr and "http://u:***@h:8123/db" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
