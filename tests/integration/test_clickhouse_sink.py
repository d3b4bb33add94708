"""The ClickHouse sink against the real broker and the CI ClickHouse server (18.16), and on chDB: every event once
across a SIGKILL, bad events to the dead-letter topic, and every dashboard query on both engines."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from pixelpipe.analytics.dashboard import expand_macros
from pixelpipe.core.clickhouse import ChdbClient, ServerClient, connect
from pixelpipe.core.codec import Codec
from pixelpipe.core.events import (
    CategoryScore,
    DeadLetter,
    GuardrailLimit,
    ImageResult,
    RolloutDecision,
    RolloutPlan,
    RolloutTreatment,
    StageMetric,
    StoredImage,
)
from pixelpipe.core.topics import ensure_topics
from pixelpipe.sinks.clickhouse.migrate import apply_migrations, migrate, migration_files
from pixelpipe.sinks.clickhouse.rows import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    ROLLOUT_COLUMNS,
    metric_row,
    result_row,
    rollout_row,
)
from pixelpipe.sinks.clickhouse.sink import ClickHouseSink

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "analytics" / "dashboards").glob("*.sql"))


def events(count: int, seed: int = 0) -> tuple[list[ImageResult], list[StageMetric]]:
    """`count` ImageResults (succeeded, rejected, failed) and as many StageMetrics, times around now."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    results, metrics = [], []
    for i in range(count):
        status = ("SUCCEEDED", "SUCCEEDED", "REJECTED", "FAILED")[i % 4]
        common = {
            "request_id": f"req-{seed}-{i}",
            "schema_version": 1,
            "event_time": now - dt.timedelta(seconds=i % 120),
            "user_id": f"user-{i % 37}",
            "model": ("sd-1.5", "sd-turbo")[i % 2],
            "experiments": {"steps": ("control", "fast")[i % 3 % 2]},
            "variant": ("steps:control", "steps:fast")[i % 3 % 2],
            # each model in a pool of its own; a request rejected at moderation was routed to none
            "pool": None if status == "REJECTED" else ("sd", "turbo")[i % 2],
        }
        results.append(
            ImageResult(
                **common,
                event_id=f"res-{seed}-{i}",
                status=status,
                kind=("GENERATE", "EDIT")[i % 5 == 0],
                images=[
                    StoredImage(
                        uri=f"s3://b/{i}/{n}.png", sha256="ab" * 32, width=64, height=64, format="PNG", bytes=1000 + n
                    )
                    for n in range(1 + i % 2 if status == "SUCCEEDED" else 0)
                ],
                moderation_stage="PROMPT" if status == "REJECTED" else None,
                moderation_scores=[
                    CategoryScore(category="nsfw", score=0.9),
                    CategoryScore(category=("violence", "hate")[i % 3 % 2], score=0.95 if i % 8 == 2 else 0.1),
                ]
                if status == "REJECTED"
                else [],
                error_code=("DEADLINE_EXCEEDED", "OOM")[i % 8 == 3] if status == "FAILED" else None,
                error_message="failed" if status == "FAILED" else None,
                request_created_at=now - dt.timedelta(seconds=5),
                timings_ms={"moderation": 10.0 + i % 7, "generate": 800.0 + i % 100},
            )
        )
        metrics.append(
            StageMetric(
                **common,
                event_id=f"met-{seed}-{i}",
                stage=("MODERATION", "GENERATE", "EDIT", "OUTPUT_MODERATION")[i % 4],
                outcome=("OK", "OK", "REJECTED", "FAILED")[i % 4],
                queue_ms=float(i % 50),
                compute_ms=100.0 + i % 300,
                batch_size=1 + i % 8,
                device="cuda:0",
                device_seconds=0.25,
                cost_usd=0.001,
                worker_id="worker-1",
            )
        )
    return results, metrics


def cancelled_events(count: int) -> tuple[list[ImageResult], list[StageMetric]]:
    """``count`` CANCELLED results and their GENERATE metrics: the even ones stopped part way (0.5 device seconds
    spent, 1.5 saved), the odd ones cancelled before their render (nothing spent, saving unknown)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    results, metrics = [], []
    for i in range(count):
        common = {
            "request_id": f"req-c-{i}",
            "event_time": now,
            "user_id": f"user-{i}",
            "model": "sd-turbo",
            "pool": "turbo",
        }
        results.append(ImageResult(**common, event_id=f"res-c-{i}", status="CANCELLED", kind="GENERATE"))
        metrics.append(
            StageMetric(
                **common,
                event_id=f"met-c-{i}",
                stage="GENERATE",
                outcome="CANCELLED",
                queue_ms=5.0,
                compute_ms=0.0 if i % 2 else 500.0,
                device="none" if i % 2 else "cuda:0",
                device_seconds=0.0 if i % 2 else 0.5,
                cost_usd=0.0,
                worker_id="worker-1",
                device_seconds_saved=None if i % 2 else 1.5,
            )
        )
    return results, metrics


def rollout_decisions(rollout: str = "lcm-rollout") -> list[RolloutDecision]:
    """A rollout's START (its plan), an ADVANCE from 1 % to 5 % and a ROLLBACK, a second apart up to now."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    plan = RolloutPlan(
        control_model="sd-1.5",
        treatment=RolloutTreatment(name="treatment", model="sd-lcm", steps=4),
        steps=[1.0, 5.0, 25.0, 100.0],
        min_users=200,
        alpha=0.05,
        guardrails=[GuardrailLimit(metric="latency_p95", margin=0.2, relative=True)],
    )
    moves = [
        ("START", 0, 0.0, 1.0, "started by cli:ana", {}, plan),
        ("ADVANCE", 1, 1.0, 5.0, "every guardrail within its margin", {"users_control": 9800.0}, None),
        ("ROLLBACK", 1, 5.0, 0.0, "latency_p95 breached: +31 % > +20 %", {"latency_p95.lower": 0.31}, None),
    ]
    return [
        RolloutDecision(
            event_id=f"{rollout}-{sequence}",
            event_time=now - dt.timedelta(seconds=len(moves) - sequence),
            rollout=rollout,
            sequence=sequence,
            action=action,
            step=step,
            percent_before=before,
            percent_after=after,
            revision_before=sequence - 1,
            revision_after=sequence,
            reason=reason,
            figures=figures,
            decided_by="cli:ana" if action == "START" else "rollout-controller:test",
            plan=plan_,
        )
        for sequence, (action, step, before, after, reason, figures, plan_) in enumerate(moves, start=1)
    ]


def publish(settings, results, metrics, extra=()) -> None:
    codec = Codec()
    producer = Producer(settings.kafka.client_config() | {"linger.ms": 5})
    messages = [(settings.topics.results, codec.encode(r), r.request_id) for r in results]
    messages += [(settings.topics.metrics, codec.encode(m), m.request_id) for m in metrics]
    for topic, value, key in [*messages, *extra]:
        producer.produce(topic, value, key.encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def dead_letters(settings, expected: int, timeout_s: float = 30) -> list[DeadLetter]:
    consumer = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"test-{uuid.uuid4()}", "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([settings.topics.dead_letter])
    codec, found, deadline = Codec(), [], time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            found += [codec.decode_as(DeadLetter, m.value()) for m in consumer.consume(100, 1.0) if not m.error()]
    finally:
        consumer.close()
    return found


def make_topics(settings):
    topics = settings.topics
    ensure_topics(settings.kafka, topics, [topics.results, topics.metrics, topics.dead_letter], partitions=4)


@pytest.fixture
def server_url(clickhouse_url):
    """A migrated database of this test's own on the CI server."""
    migrate(clickhouse_url)
    return clickhouse_url


@pytest.fixture(params=["server", "chdb"])
def warehouse(request, tmp_path):
    client = ServerClient(request.getfixturevalue("server_url")) if request.param == "server" else None
    client = client or connect(f"chdb://{tmp_path / 'chdb'}")
    if isinstance(client, ChdbClient):
        apply_migrations(client)
    try:
        yield client
    finally:
        client.close()


def dedup_counts(client) -> list[tuple]:
    return client.execute(
        "SELECT (SELECT count() FROM results_dedup), (SELECT uniqExact(event_id) FROM results_dedup),"
        " (SELECT count() FROM stage_metrics_dedup), (SELECT uniqExact(event_id) FROM stage_metrics_dedup)"
    )


def test_every_event_lands_exactly_once_across_a_sigkill(topic_settings, server_url):
    make_topics(topic_settings)
    results, metrics = events(5000)
    env = os.environ | {
        "PIXELPIPE_KAFKA_BOOTSTRAP": topic_settings.kafka.bootstrap,
        "PIXELPIPE_CLICKHOUSE_URL": server_url,
        "PIXELPIPE_TOPIC_RESULTS": topic_settings.topics.results,
        "PIXELPIPE_TOPIC_METRICS": topic_settings.topics.metrics,
        "PIXELPIPE_TOPIC_DEAD_LETTER": topic_settings.topics.dead_letter,
        "PIXELPIPE_TOPIC_ROLLOUTS": topic_settings.topics.rollouts,
        "PIXELPIPE_LOG_LEVEL": "INFO",
        "PIXELPIPE_SINK_GROUP_ID": f"sink-{uuid.uuid4().hex[:8]}",
        # Small batches, so the kill lands mid-stream, between some insert and its commit.
        "PIXELPIPE_SINK_MAX_BATCH_ROWS": "500",
        "PIXELPIPE_SINK_MAX_BATCH_WAIT_MS": "100",
    }
    command = [sys.executable, "-m", "pixelpipe.sinks.cli", "sink"]
    client = ServerClient(server_url)
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The first half arrives while the first sink starts and runs; it is killed once it has loaded some, and the
    # second half is published after the kill, so it cannot have seen everything.
    sent, deadline = 0, time.monotonic() + 40
    try:
        while client.execute("SELECT count() FROM results")[0][0] < 500 and time.monotonic() < deadline:
            if sent < 2500:
                publish(topic_settings, results[sent : sent + 250], metrics[sent : sent + 250])
                sent += 250
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    publish(topic_settings, results[sent:], metrics[sent:])
    (raw_results,) = client.execute("SELECT count() FROM results")[0]
    assert 500 <= raw_results <= sent < 5000

    second = subprocess.run([*command, "--max-idle", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "dead_letters=0" in second.stdout

    assert dedup_counts(client) == [(5000, 5000, 5000, 5000)]
    assert {e for (e,) in client.execute("SELECT event_id FROM results_dedup")} == {r.event_id for r in results}
    assert {e for (e,) in client.execute("SELECT event_id FROM stage_metrics_dedup")} == {m.event_id for m in metrics}
    client.close()


def test_rollout_decisions_and_experiment_revisions_land_once(topic_settings, warehouse):
    make_topics(topic_settings)  # not the rollouts topic: the sink makes it
    results, metrics = events(40, seed=5)
    for event in (*results, *metrics):  # a live experiment at revision 2 or 3, and one of the experiments file
        event.experiments |= {"lcm-rollout": "treatment"}
        event.experiment_revisions = {"lcm-rollout": 2 + int(event.request_id.endswith(("0", "5")))}
    publish(topic_settings, results, metrics)
    settings = topic_settings.updated(sink_group_id=f"sink-{uuid.uuid4().hex[:8]}")
    first = ClickHouseSink(settings.kafka, settings.topics, settings.sink, warehouse, max_idle_s=2.0).run()
    assert first.rows_by_table == {"results": 40, "stage_metrics": 40}

    # The sink made the rollouts topic, so the decisions published now (the last one twice, and one that does not
    # decode) are its next batch.
    codec = Codec()
    decisions = rollout_decisions()
    extra = [(settings.topics.rollouts, codec.encode(d), d.rollout) for d in [*decisions, decisions[-1]]]
    publish(settings, [], [], [*extra, (settings.topics.rollouts, b"\xc3\x01garbage", "lcm-rollout")])
    second = ClickHouseSink(settings.kafka, settings.topics, settings.sink, warehouse, max_idle_s=2.0).run()
    assert (second.rows_by_table, second.dead_letters) == ({"rollout_decisions": 4}, 1)
    (letter,) = dead_letters(settings, 1)
    assert "RolloutDecision does not decode" in letter.error_reason
    # keyed by the experiment key: the dead letter names no request
    assert (letter.original_key, letter.request_id, letter.topic) == (b"lcm-rollout", None, settings.topics.rollouts)

    rows = warehouse.execute(
        "SELECT sequence, toString(action), percent_after, revision_after, reason, figure_names, figure_values,"
        " decided_by, treatment_model, treatment_steps, step_percents, guardrail_metrics, guardrail_relative"
        " FROM rollout_decisions_dedup ORDER BY sequence"
    )
    expected = [
        (
            d.sequence,
            d.action,
            d.percent_after,
            d.revision_after,
            d.reason,
            sorted(d.figures),
            [d.figures[name] for name in sorted(d.figures)],
            d.decided_by,
            d.plan and d.plan.treatment.model,
            d.plan and d.plan.treatment.steps,
            d.plan.steps if d.plan else [],
            [g.metric for g in d.plan.guardrails] if d.plan else [],
            [1] if d.plan else [],
        )
        for d in decisions
    ]
    assert rows == expected
    times = warehouse.execute("SELECT event_time_ms FROM rollout_decisions_dedup ORDER BY sequence")
    assert [t for (t,) in times] == [int(d.event_time.timestamp() * 1000) for d in decisions]

    # Each key's revision next to it; the rows of one allocation are those of its revision.
    for table, events_ in (("results_dedup", results), ("stage_metrics_dedup", metrics)):
        stored = warehouse.execute(f"SELECT event_id, experiment_keys, experiment_revisions FROM {table}")
        assert {e: (keys, revisions) for e, keys, revisions in stored} == {
            e.event_id: (["lcm-rollout", "steps"], [e.experiment_revisions["lcm-rollout"], 0]) for e in events_
        }
    step = "SELECT count() FROM results_dedup WHERE experiment_revisions[indexOf(experiment_keys, 'lcm-rollout')] = 3"
    assert warehouse.execute(step) == [(sum(r.experiment_revisions["lcm-rollout"] == 3 for r in results),)]


def test_bad_events_go_to_the_dead_letter_topic_and_the_rest_is_loaded(topic_settings, warehouse):
    make_topics(topic_settings)
    results, metrics = events(200)
    metrics[7].batch_size = 70_000  # overflows UInt16
    results[11].images = [dataclasses.replace(results[0].images[0], width=-1)]  # a negative UInt16
    garbage = b"\xc3\x01not an event"
    wrong_kind = Codec().encode(metrics[0])
    extra = [
        (topic_settings.topics.results, garbage, "req-garbage"),
        (topic_settings.topics.results, wrong_kind, "req-x"),
    ]
    publish(topic_settings, results, metrics, extra)

    settings = topic_settings.updated(sink_group_id=f"sink-{uuid.uuid4().hex[:8]}", sink_max_batch_rows=1000)
    stats = ClickHouseSink(settings.kafka, settings.topics, settings.sink, warehouse, max_idle_s=2.0).run()

    assert stats.dead_letters == 4
    assert dedup_counts(warehouse) == [(199, 199, 199, 199)]
    letters = {letter.original_key: letter for letter in dead_letters(topic_settings, 4)}
    assert set(letters) == {b"req-garbage", b"req-x", b"req-0-7", b"req-0-11"}
    assert letters[b"req-garbage"].original_value == garbage
    assert letters[b"req-garbage"].request_id == "req-garbage"
    assert "matches no shipped schema" in letters[b"req-garbage"].error_reason
    assert "expected a ImageResult, got a StageMetric" in letters[b"req-x"].error_reason
    assert letters[b"req-0-7"].error_reason.startswith("ClickHouse refused event met-0-7 for stage_metrics")
    assert "batch_size" in letters[b"req-0-7"].error_reason
    assert letters[b"req-0-11"].error_reason.startswith("ClickHouse refused event res-0-11 for results")
    assert all(letter.stage == "clickhouse-sink" and letter.topic for letter in letters.values())


def test_an_event_out_of_range_is_dead_lettered_and_the_forty_around_it_land(topic_settings, warehouse):
    make_topics(topic_settings)
    results, metrics = events(40, seed=7)
    codec = Codec()
    # Valid Avro that no decoder can turn into a datetime: it used to stop the sink on every restart.
    poison_result = codec.encode_record("ImageResult", results[0].to_avro() | {"event_time": 2**62})
    poison_metric = codec.encode_record("StageMetric", metrics[0].to_avro() | {"event_time": 2**62})
    poison = [
        (topic_settings.topics.results, poison_result, "req-poison"),
        (topic_settings.topics.metrics, poison_metric, "req-poison-m"),
    ]
    publish(topic_settings, results[:20], metrics[:20], poison)
    publish(topic_settings, results[20:], metrics[20:])

    settings = topic_settings.updated(sink_group_id=f"sink-{uuid.uuid4().hex[:8]}")
    stats = ClickHouseSink(settings.kafka, settings.topics, settings.sink, warehouse, max_idle_s=2.0).run()

    assert (stats.rows, stats.dead_letters) == (80, 2)
    assert dedup_counts(warehouse) == [(40, 40, 40, 40)]
    letters = {letter.original_key: letter for letter in dead_letters(topic_settings, 2)}
    assert letters[b"req-poison"].original_value == poison_result
    assert letters[b"req-poison"].topic == topic_settings.topics.results
    assert "ImageResult does not decode" in letters[b"req-poison"].error_reason
    assert "OverflowError" in letters[b"req-poison"].error_reason
    assert letters[b"req-poison-m"].original_value == poison_metric
    # The offsets were committed past the poison once its dead letter was stored: a restart reads nothing again.
    again = ClickHouseSink(settings.kafka, settings.topics, settings.sink, warehouse, max_idle_s=2.0).run()
    assert (again.rows, again.dead_letters) == (0, 0)


# -- dashboards ----------------------------------------------------------------------------------------------
def normalised(rows):
    def value(v):
        if isinstance(v, dt.datetime):
            return v.strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(v, float):
            return round(v, 6) if math.isfinite(v) else None
        return v

    return [tuple(value(v) for v in row) for row in rows]


def test_every_dashboard_query_runs_on_the_ci_server_and_on_chdb(server_url, tmp_path):
    assert {path.stem for path in DASHBOARDS} >= {
        "throughput",
        "latency_by_stage",
        "queue_vs_compute",
        "rejection_rate_by_category",
        "error_rate_by_code",
        "cost_per_image",
        "batch_size_distribution",
        "latency_by_stage_over_time",
        "experiment_exposures",
        "cancellations",
        "rollout_decisions",
    }
    codec = Codec()
    results, metrics = events(400)
    cancelled_results, cancelled_metrics = cancelled_events(20)
    results, metrics = results + cancelled_results, metrics + cancelled_metrics
    # Decoded records carry every default, as the sink sees them; the first 50 are inserted twice (redelivered).
    result_rows = [result_row(codec.decode_as(ImageResult, codec.encode(r))) for r in results]
    metric_rows = [metric_row(codec.decode_as(StageMetric, codec.encode(m))) for m in metrics]
    decisions = rollout_decisions()
    decision_rows = [rollout_row(codec.decode_as(RolloutDecision, codec.encode(d))) for d in decisions]
    server = ServerClient(server_url)
    chdb = connect(f"chdb://{tmp_path / 'chdb'}")
    apply_migrations(chdb)
    for client in (server, chdb):
        client.insert("results", RESULT_COLUMNS, result_rows)
        client.insert("results", RESULT_COLUMNS, result_rows[:50])
        client.insert("stage_metrics", METRIC_COLUMNS, metric_rows)
        client.insert("stage_metrics", METRIC_COLUMNS, metric_rows[:50])
        client.insert("rollout_decisions", ROLLOUT_COLUMNS, decision_rows)
        client.insert("rollout_decisions", ROLLOUT_COLUMNS, decision_rows[-1:])

    now = dt.datetime.now(dt.UTC)
    answers = {}
    for path in DASHBOARDS:
        sql = expand_macros(path.read_text(), now - dt.timedelta(hours=1), now + dt.timedelta(minutes=1))
        answers[path.stem] = on_server = normalised(server.execute(sql))
        assert on_server, path.name
        assert normalised(chdb.execute(sql)) == on_server, path.name
    server.close()
    chdb.close()

    assert sum(row[1] for row in answers["throughput"]) == 420
    assert sum(row[5] for row in answers["throughput"]) == 20  # cancelled
    assert sum(row[2] for row in answers["batch_size_distribution"]) == 420
    assert sum(row[2] for row in answers["rejection_rate_by_category"]) == 100
    assert sum(row[3] for row in answers["rejection_rate_by_category"]) == pytest.approx(100 / 420)
    assert answers["cancellations"] == [("GENERATE", "turbo", "sd-turbo", 20, 5.0, 15.0, 10)]
    assert {row[0]: row[1] for row in answers["error_rate_by_code"]} == {"DEADLINE_EXCEEDED": 50, "OOM": 50}
    cost_usd, images = Counter(), Counter()
    for pool, _, _, total_usd, total_images, _ in answers["cost_per_image"]:
        cost_usd[pool] += total_usd
        images[pool] += total_images
    # 200 successes, the odd ones (pool turbo) with two images; the rejected requests' cost is in no pool
    assert images == {"": 0, "sd": 100, "turbo": 200}
    assert dict(cost_usd) == pytest.approx({"": 0.1, "sd": 0.1, "turbo": 0.2})
    assert {row[1] for row in answers["queue_vs_compute"]} == {"", "sd", "turbo"}
    assert {row[1] for row in answers["latency_by_stage_over_time"]} == {
        "MODERATION",
        "GENERATE",
        "EDIT",
        "OUTPUT_MODERATION",
    }
    # Each decision once, the latest first.
    listed = [(row[1], row[2], row[4], row[5]) for row in answers["rollout_decisions"]]
    assert listed == [(d.rollout, d.action, d.percent_after, d.revision_after) for d in reversed(decisions)]
    exposed = {(("control", "fast")[i % 3 % 2], f"user-{i % 37}") for i in range(400)}
    assert sum(row[3] for row in answers["experiment_exposures"]) == len(exposed)


def test_the_sink_refuses_to_start_before_the_migrations(tmp_path):
    env = os.environ | {"PIXELPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'empty'}"}
    done = subprocess.run(
        [sys.executable, "-m", "pixelpipe.sinks.cli", "sink"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "run `pixelpipe clickhouse migrate`" in done.stderr
    migrated = subprocess.run(
        [sys.executable, "-m", "pixelpipe.sinks.cli", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    names = [path.stem for path in migration_files()]
    assert names[-1] == "0009_rollouts"
    assert f"applied: {', '.join(names)}\n" in migrated.stdout
