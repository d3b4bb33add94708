"""Every migration applies, once, on the CI ClickHouse server (18.16) and on chDB's current engine; the dedup
views count each event once and the materialized views fill the rollups."""

from __future__ import annotations

import datetime
import time

import pytest

from pixelpipe.core.clickhouse import ChdbClient, ClickHouseClient, ServerClient
from pixelpipe.sinks.clickhouse.migrate import (
    apply_migrations,
    delete_expired_events,
    migration_files,
    server_version,
)

pytestmark = pytest.mark.integration

# Events from now: with a table TTL, rows already past it are dropped as they are inserted.
_NOW_MS = int(time.time()) * 1000

# SQL literals per column; rows go in with INSERT ... SELECT because the native driver wants inline VALUES data
# as Python rows, and aliases keep chDB from seeing two identical `[]` columns.
_RESULT = {
    "event_id": "'res-1'",
    "request_id": "'req-1'",
    "schema_version": "1",
    "event_time_ms": f"{_NOW_MS + 123}",
    "status": "'SUCCEEDED'",
    "kind": "'GENERATE'",
    "user_id": "'user-1'",
    "image_uris": "['s3://pixelpipe/req-1/0.png', 's3://pixelpipe/req-1/1.png']",
    "image_sha256": "['aa', 'bb']",
    "image_widths": "[512, 512]",
    "image_heights": "[512, 512]",
    "image_formats": "['PNG', 'PNG']",
    "image_bytes": "[1000, 2000]",
    "moderation_stage": "''",
    "moderation_categories": "['nsfw']",
    "moderation_scores": "[0.01]",
    "error_code": "NULL",
    "error_message": "NULL",
    "model": "'sd-turbo'",
    "experiment_keys": "['steps']",
    "experiment_variants": "['fast']",
    "variant": "'steps:fast'",
    "request_created_at_ms": f"{_NOW_MS - 2000}",
    "timing_stages": "['GENERATE']",
    "timing_ms": "[120.5]",
}
_REJECTED = _RESULT | {
    "event_id": "'res-2'",
    "request_id": "'req-2'",
    "status": "'REJECTED'",
    **{f"image_{name}": "[]" for name in ("uris", "sha256", "widths", "heights", "formats", "bytes")},
    "moderation_stage": "'PROMPT'",
    "moderation_categories": "['violence', 'nsfw']",
    "moderation_scores": "[0.2, 0.9]",
    "variant": "NULL",
}
_METRIC = {
    "event_id": "'met-1'",
    "request_id": "'req-1'",
    "schema_version": "1",
    "event_time_ms": f"{_NOW_MS}",
    "stage": "'GENERATE'",
    "outcome": "'OK'",
    "queue_ms": "5.0",
    "compute_ms": "100.0",
    "batch_size": "2",
    "device": "'cuda:0'",
    "device_seconds": "0.1",
    "cost_usd": "0.004",
    "worker_id": "'worker-1'",
    "user_id": "'user-1'",
    "model": "'sd-turbo'",
    "experiment_keys": "['steps']",
    "experiment_variants": "['fast']",
    "variant": "'steps:fast'",
}


def _insert(client: ClickHouseClient, table: str, rows: list[dict[str, str]]) -> None:
    columns = ", ".join(rows[0])
    selects = " UNION ALL ".join(
        "SELECT " + ", ".join(f"{value} AS {name}" for name, value in row.items()) for row in rows
    )
    client.execute(f"INSERT INTO {table} ({columns}) {selects}")


def _check_migrations(client: ClickHouseClient) -> None:
    names = [path.stem for path in migration_files()]
    assert apply_migrations(client, ttl_days=30) == names
    assert apply_migrations(client, ttl_days=30) == []
    assert sorted(name for (name,) in client.execute("SELECT name FROM schema_migrations")) == names

    # A redelivered event arrives as a second insert of the same row.
    _insert(client, "results", [_RESULT, _REJECTED])
    _insert(client, "results", [_RESULT])
    _insert(client, "stage_metrics", [_METRIC])
    _insert(client, "stage_metrics", [_METRIC])

    assert client.execute("SELECT count() FROM results") == [(3,)]
    assert client.execute("SELECT count(), uniqExact(event_id) FROM results_dedup") == [(2, 2)]
    assert client.execute("SELECT count() FROM stage_metrics_dedup") == [(1,)]
    assert client.execute("SELECT event_time_ms, toUnixTimestamp(event_time) FROM stage_metrics_dedup") == [
        (_NOW_MS, _NOW_MS // 1000)
    ]

    # Both results are user-1's in steps:fast; the first exposure is the earlier request of the two.
    assert client.execute("SELECT experiment, variant, user_id, first_exposure_ms FROM experiment_exposures") == [
        ("steps", "fast", "user-1", min(int(_RESULT["request_created_at_ms"]), int(_REJECTED["request_created_at_ms"])))
    ]

    latency = client.execute(
        "SELECT toString(stage), model, variant, uniqExactMerge(events),"
        " quantilesMerge(0.5, 0.95, 0.99)(compute_ms_q) FROM stage_latency_1m"
        " GROUP BY minute, stage, model, variant"
    )
    assert latency == [("GENERATE", "sd-turbo", "steps:fast", 1, [100.0, 100.0, 100.0])]

    # Sums in the rollup see the redelivered metric and result twice (see 0003_rollups.sql): 2 x 0.004 USD
    # over 2 x 2 images.
    cost = client.execute("SELECT model, variant, total_cost_usd, total_images, usd_per_image FROM cost_per_image")
    assert [(model, variant, images) for model, variant, _, images, _ in cost] == [("sd-turbo", "steps:fast", 4)]
    assert cost[0][2] == pytest.approx(0.008)
    assert cost[0][4] == pytest.approx(0.002)

    rejections = client.execute(
        "SELECT toString(moderation_stage), category, model, variant, uniqExactMerge(rejections)"
        " FROM rejections_1h GROUP BY hour, moderation_stage, category, model, variant"
    )
    assert rejections == [("PROMPT", "nsfw", "sd-turbo", "", 1)]

    # Table TTL only where the engine has it (not 18.16); deleting expired events works everywhere, a year ahead.
    (create,) = client.execute("SHOW CREATE TABLE results")[0]
    assert ("TTL event_date + toIntervalDay(30)" in create) == (server_version(client) >= (19, 6))
    next_year = datetime.date.today() + datetime.timedelta(days=365)
    deleted = delete_expired_events(client, ttl_days=30, today=next_year)
    assert sorted(deleted) == ["results", "stage_metrics"] and all(deleted.values())
    assert client.execute("SELECT count() FROM results") == [(0,)]
    assert client.execute("SELECT count() FROM stage_metrics") == [(0,)]


def test_migrations_on_the_ci_server(server_client: ServerClient) -> None:
    _check_migrations(server_client)


def test_migrations_on_chdb(chdb_client: ChdbClient) -> None:
    _check_migrations(chdb_client)


_DAY_MS = 86_400_000


def _replays(event_id: str, statuses: list[str], days_ago: list[int]) -> list[dict[str, str]]:
    """One result per status, each written on another day: what redelivery and a looped reply topic produce."""
    return [
        _RESULT
        | {
            "event_id": f"'{event_id}'",
            "status": f"'{status}'",
            "event_time_ms": f"{_NOW_MS - days * _DAY_MS}",
            # a FAILED replay names no image
            **(
                {f"image_{n}": "[]" for n in ("uris", "sha256", "widths", "heights", "formats", "bytes")}
                if status == "FAILED"
                else {}
            ),
        }
        for status, days in zip(statuses, days_ago, strict=True)
    ]


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_replays_of_an_event_collapse_whatever_their_status_or_day(backend, request):
    client = request.getfixturevalue(f"{backend}_client")
    apply_migrations(client)
    # Each in an insert of its own, as separate deliveries arrive; over 31 days apart, so in different months too.
    for row in _replays("res-a", ["SUCCEEDED", "FAILED"], [0, 40]) + _replays("res-b", ["FAILED", "REJECTED"], [35, 1]):
        _insert(client, "results", [row])
    _insert(client, "stage_metrics", [_METRIC])
    _insert(client, "stage_metrics", [_METRIC | {"outcome": "'FAILED'", "event_time_ms": f"{_NOW_MS - 40 * _DAY_MS}"}])
    # The best status wins, whatever the order and the day: SUCCEEDED over REJECTED over FAILED.
    assert client.execute("SELECT event_id, toString(status) FROM results_dedup ORDER BY event_id") == [
        ("res-a", "SUCCEEDED"),
        ("res-b", "REJECTED"),
    ]
    assert client.execute("SELECT count() FROM stage_metrics_dedup") == [(1,)]


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_rekeying_keeps_the_rows_the_views_and_the_ttl(backend, request):
    client = request.getfixturevalue(f"{backend}_client")
    assert apply_migrations(client, ttl_days=30, until="0005_what_ran")[-1] == "0005_what_ran"
    for row in [*_replays("res-a", ["SUCCEEDED", "FAILED"], [0, 1]), _REJECTED]:
        _insert(client, "results", [row])
    _insert(client, "stage_metrics", [_METRIC])
    assert client.execute("SELECT count() FROM results_dedup") == [(3,)]  # the old keys kept both replays of res-a

    # no ttl_days: the tables keep theirs
    assert apply_migrations(client, until="0006_dedup_by_event_id") == ["0006_dedup_by_event_id"]
    assert client.execute("SELECT event_id, toString(status) FROM results_dedup ORDER BY event_id") == [
        ("res-2", "REJECTED"),
        ("res-a", "SUCCEEDED"),
    ]
    assert client.execute("SELECT count() FROM stage_metrics_dedup") == [(1,)]
    (create,) = client.execute("SHOW CREATE TABLE results")[0]
    assert ("TTL event_date + toIntervalDay(30)" in create) == (server_version(client) >= (19, 6))
    # The rollups are fed by the new tables: one more success with two images, one more metric.
    images_before = client.execute("SELECT sum(images) FROM cost_1h")[0][0]
    _insert(client, "results", [_RESULT | {"event_id": "'res-new'"}])
    _insert(client, "stage_metrics", [_METRIC | {"event_id": "'met-new'"}])
    assert client.execute("SELECT sum(images) FROM cost_1h")[0][0] == images_before + 2
    assert client.execute("SELECT uniqExactMerge(events) FROM stage_latency_1m") == [(2,)]


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_cancellations_arrive_on_tables_that_hold_rows_and_a_success_still_wins_its_replays(backend, request):
    client = request.getfixturevalue(f"{backend}_client")
    assert apply_migrations(client, until="0006_dedup_by_event_id")[-1] == "0006_dedup_by_event_id"
    _insert(client, "results", [_RESULT])
    _insert(client, "stage_metrics", [_METRIC])

    assert apply_migrations(client, until="0007_cancellations") == ["0007_cancellations"]
    cancelled = {"status": "'CANCELLED'", **{f"image_{n}": "[]" for n in ("uris", "sha256", "widths", "heights")}}
    cancelled |= {"image_formats": "[]", "image_bytes": "[]"}
    _insert(client, "results", [_RESULT | cancelled | {"event_id": "'res-c'", "request_id": "'req-c'"}])
    _insert(client, "results", [_RESULT | cancelled])  # a replay of res-1 that met a cancellation
    stopped = {"outcome": "'CANCELLED'", "device_seconds_saved": "0.3"}
    _insert(client, "stage_metrics", [_METRIC | stopped | {"event_id": "'met-c'", "request_id": "'req-c'"}])
    assert client.execute("SELECT event_id, toString(status) FROM results_dedup ORDER BY event_id") == [
        ("res-1", "SUCCEEDED"),  # its images were stored and reported: the success wins
        ("res-c", "CANCELLED"),
    ]
    assert client.execute(
        "SELECT event_id, toString(outcome), device_seconds_saved FROM stage_metrics_dedup ORDER BY event_id"
    ) == [("met-1", "OK", None), ("met-c", "CANCELLED", 0.3)]


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_pools_arrive_on_tables_and_rollups_that_hold_rows(backend, request):
    client = request.getfixturevalue(f"{backend}_client")
    assert apply_migrations(client, until="0007_cancellations")[-1] == "0007_cancellations"
    _insert(client, "results", [_RESULT])
    _insert(client, "stage_metrics", [_METRIC])

    assert apply_migrations(client, until="0008_pools") == ["0008_pools"]
    # A request of pool sd: its render metric and result, and moderation's metric, which carries the pool it routed to.
    routed = {"request_id": "'req-p'", "pool": "'sd'"}
    _insert(client, "results", [_RESULT | routed | {"event_id": "'res-p'"}])
    _insert(client, "stage_metrics", [_METRIC | routed | {"event_id": "'met-p'"}])
    moderated = {"event_id": "'met-pm'", "stage": "'MODERATION'", "compute_ms": "10.0", "cost_usd": "0.001"}
    _insert(client, "stage_metrics", [_METRIC | routed | moderated])
    # A request moderation rejected before routing: no pool.
    _insert(client, "stage_metrics", [_METRIC | moderated | {"event_id": "'met-r'", "outcome": "'REJECTED'"}])

    assert client.execute("SELECT event_id, pool FROM results_dedup ORDER BY event_id") == [
        ("res-1", None),  # written before pools
        ("res-p", "sd"),
    ]
    assert client.execute("SELECT event_id, pool FROM stage_metrics_dedup ORDER BY event_id") == [
        ("met-1", None),
        ("met-p", "sd"),
        ("met-pm", "sd"),
        ("met-r", None),
    ]
    latency = client.execute(
        "SELECT toString(stage) AS stage_name, pool, uniqExactMerge(events), quantilesMerge(0.5)(compute_ms_q)"
        " FROM stage_latency_1m GROUP BY stage_name, pool ORDER BY stage_name, pool"
    )
    assert latency == [
        ("GENERATE", "", 1, [100.0]),
        ("GENERATE", "sd", 1, [100.0]),
        ("MODERATION", "", 1, [10.0]),
        ("MODERATION", "sd", 1, [10.0]),
    ]
    # Each pool's cost over its images: the old rows count with no pool, moderation's cost with the pool it chose.
    cost = client.execute("SELECT pool, model, total_cost_usd, total_images FROM cost_per_image ORDER BY pool")
    assert [(pool, model, images) for pool, model, _, images in cost] == [("", "sd-turbo", 2), ("sd", "sd-turbo", 2)]
    assert [total for _, _, total, _ in cost] == pytest.approx([0.005, 0.005])


_DECISION = {
    "event_id": "'lcm-2'",
    "schema_version": "1",
    "event_time_ms": f"{_NOW_MS}",
    "rollout": "'steps'",
    "sequence": "2",
    "action": "'ADVANCE'",
    "step": "1",
    "percent_before": "1.0",
    "percent_after": "5.0",
    "revision_before": "2",
    "revision_after": "3",
    "reason": "'every guardrail within its margin'",
    "figure_names": "['users_control', 'users_treatment']",
    "figure_values": "[9800.0, 201.0]",
    "decided_by": "'rollout-controller:a'",
}


@pytest.mark.parametrize("backend", ["server", "chdb"])
def test_rollouts_arrive_on_tables_that_hold_rows(backend, request):
    client = request.getfixturevalue(f"{backend}_client")
    assert apply_migrations(client, until="0008_pools")[-1] == "0008_pools"
    _insert(client, "results", [_RESULT])
    _insert(client, "stage_metrics", [_METRIC])

    assert apply_migrations(client) == ["0009_rollouts"]
    # Rows written before read a revision of 0 per key; the new ones carry the revision in force, per key.
    stepped = {"request_id": "'req-r'", "experiment_revisions": "[3]"}
    _insert(client, "results", [_RESULT | stepped | {"event_id": "'res-r'"}])
    _insert(client, "stage_metrics", [_METRIC | stepped | {"event_id": "'met-r'"}])
    for table, before, after in (("results_dedup", "res-1", "res-r"), ("stage_metrics_dedup", "met-1", "met-r")):
        rows = client.execute(f"SELECT event_id, experiment_keys, experiment_revisions FROM {table} ORDER BY event_id")
        assert rows == [(before, ["steps"], [0]), (after, ["steps"], [3])]
    step = "experiment_revisions[indexOf(experiment_keys, 'steps')]"
    assert client.execute(f"SELECT event_id FROM results_dedup WHERE {step} = 3") == [("res-r",)]

    # A decision published twice is one row in the view; the plan's columns are empty on a decision after START.
    _insert(client, "rollout_decisions", [_DECISION])
    _insert(client, "rollout_decisions", [_DECISION])
    assert client.execute("SELECT count() FROM rollout_decisions") == [(2,)]
    assert client.execute(
        "SELECT rollout, sequence, toString(action), percent_after, revision_after, figure_names, figure_values,"
        " treatment_model, step_percents, toUnixTimestamp(event_time) FROM rollout_decisions_dedup"
    ) == [
        (
            "steps",
            2,
            "ADVANCE",
            5.0,
            3,
            ["users_control", "users_treatment"],
            [9800.0, 201.0],
            None,
            [],
            _NOW_MS // 1000,
        )
    ]
