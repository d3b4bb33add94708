"""Decoded events to rows of the raw tables: every column, in order, with exact times and flattened maps."""

import dataclasses
import datetime as dt
import re

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import EVENT_TYPES
from pixelpipe.sinks.clickhouse.migrate import MIGRATIONS_DIR, split_statements
from pixelpipe.sinks.clickhouse.rows import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    ROLLOUT_COLUMNS,
    epoch_ms,
    metric_row,
    result_row,
    rollout_row,
)
from tests.samples import T0, sample_records

T0_MS = 1795609815123  # 2026-11-25T12:30:15.123Z


def decoded(name):
    codec = Codec()
    return codec.decode_as(EVENT_TYPES[name], codec.encode_record(name, sample_records()[name]))


def test_epoch_ms_is_exact_for_aware_naive_and_integer_times():
    assert epoch_ms(T0) == T0_MS
    assert epoch_ms(T0.replace(tzinfo=None)) == T0_MS
    assert epoch_ms(dt.datetime(1970, 1, 1, 0, 0, 0, 999000, tzinfo=dt.UTC)) == 999
    assert epoch_ms(42) == 42


def test_result_row():
    row = dict(zip(RESULT_COLUMNS, result_row(decoded("ImageResult")), strict=True))
    assert row == {
        "event_id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        "request_id": "req-0001",
        "schema_version": 1,
        "event_time_ms": T0_MS,
        "status": "REJECTED",
        "kind": "GENERATE",
        "user_id": "user-42",
        "image_uris": ["s3://pixelpipe/images/2026/11/25/req-0001/0.png"],
        "image_sha256": ["ab" * 32],
        "image_widths": [512],
        "image_heights": [768],
        "image_formats": ["PNG"],
        "image_bytes": [123456],
        "moderation_stage": "OUTPUT_IMAGE",
        "moderation_categories": ["sexual", "violence"],
        "moderation_scores": [0.875, 0.125],
        "error_code": "MODERATION_REJECTED",
        "error_message": "output image 0 rejected: sexual",
        "model": "sd-1.5",
        "experiment_keys": ["steps-test"],
        "experiment_variants": ["fast"],
        "variant": "steps-test:fast",
        "request_created_at_ms": T0_MS - 3000,
        "timing_stages": ["generate", "moderation"],  # sorted by stage, values follow their keys
        "timing_ms": [1834.25, 12.5],
        "steps": 30,
        "guidance": 7.5,
        "scheduler": "ddim",
        "width": 512,
        "height": 768,
        "seed": 2**40 + 7,
        "strength": 0.75,
        "batch_size": 4,
        "pool": "sd",
        "experiment_revisions": [2],
    }


def test_a_result_without_moderation_or_images_has_empty_arrays_and_an_empty_stage():
    record = dataclasses.replace(
        decoded("ImageResult"),
        status="SUCCEEDED",
        images=[],
        moderation_stage=None,
        moderation_scores=[],
        error_code=None,
        error_message=None,
        experiments={},
        variant=None,
        timings_ms={},
        steps=None,
    )
    row = dict(zip(RESULT_COLUMNS, result_row(record), strict=True))
    assert row["moderation_stage"] == ""
    assert row["image_uris"] == row["image_bytes"] == row["moderation_scores"] == []
    assert row["error_code"] is row["variant"] is None
    assert row["experiment_keys"] == row["timing_stages"] == []
    assert row["steps"] is None


def test_metric_row():
    row = dict(zip(METRIC_COLUMNS, metric_row(decoded("StageMetric")), strict=True))
    assert row == {
        "event_id": "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
        "request_id": "req-0001",
        "schema_version": 1,
        "event_time_ms": T0_MS,
        "stage": "GENERATE",
        "outcome": "OK",
        "queue_ms": 41.5,
        "compute_ms": 1834.25,
        "batch_size": 4,
        "device": "cuda:0",
        "device_seconds": 0.4585625,
        "cost_usd": 0.000318,
        "worker_id": "worker-gpu-1",
        "user_id": "user-42",
        "model": "sd-1.5",
        "experiment_keys": ["steps-test"],
        "experiment_variants": ["fast"],
        "variant": "steps-test:fast",
        "device_seconds_saved": None,
        "pool": "sd",
        "experiment_revisions": [2],
    }


def test_cancelled_rows_carry_the_status_the_outcome_and_the_device_time_saved():
    result = dataclasses.replace(decoded("ImageResult"), status="CANCELLED", images=[], moderation_scores=[])
    assert dict(zip(RESULT_COLUMNS, result_row(result), strict=True))["status"] == "CANCELLED"
    metric = dataclasses.replace(decoded("StageMetric"), outcome="CANCELLED", device_seconds_saved=1.25)
    row = dict(zip(METRIC_COLUMNS, metric_row(metric), strict=True))
    assert (row["outcome"], row["device_seconds"], row["device_seconds_saved"]) == ("CANCELLED", 0.4585625, 1.25)


def test_experiment_maps_flatten_in_key_order():
    record = dataclasses.replace(decoded("StageMetric"), experiments={"b": "2", "a": "1", "c": "3"})
    row = dict(zip(METRIC_COLUMNS, metric_row(record), strict=True))
    assert (row["experiment_keys"], row["experiment_variants"]) == (["a", "b", "c"], ["1", "2", "3"])


def test_experiment_revisions_follow_their_keys_with_0_for_a_key_without_one():
    record = dataclasses.replace(
        decoded("ImageResult"),
        experiments={"live": "t", "file": "c", "also-live": "c"},
        experiment_revisions={"live": 7, "also-live": 3},
    )
    row = dict(zip(RESULT_COLUMNS, result_row(record), strict=True))
    assert (row["experiment_keys"], row["experiment_revisions"]) == (["also-live", "file", "live"], [3, 0, 7])


def test_rollout_row_flattens_the_figures_and_the_plan():
    row = dict(zip(ROLLOUT_COLUMNS, rollout_row(decoded("RolloutDecision")), strict=True))
    assert row == {
        "event_id": "6b7c8d9e-0f1a-4b2c-9d3e-4f5a6b7c8d9e",
        "schema_version": 1,
        "event_time_ms": T0_MS,
        "rollout": "sd-lcm-rollout",
        "sequence": 1,
        "action": "START",
        "step": 0,
        "percent_before": 0.0,
        "percent_after": 5.0,
        "revision_before": 0,
        "revision_after": 1,
        "reason": "started by cli:ana",
        "figure_names": ["users_control"],
        "figure_values": [0.0],
        "decided_by": "cli:ana",
        "control_model": "sd-1.5",
        "treatment_name": "treatment",
        "treatment_model": "sd-lcm",
        "treatment_steps": 4,
        "treatment_guidance": None,
        "treatment_scheduler": "lcm",
        "step_percents": [5.0, 25.0, 50.0, 100.0],
        "min_users": 500,
        "alpha": 0.05,
        "guardrail_metrics": ["failure_rate"],
        "guardrail_margins": [0.01],
        "guardrail_relative": [0],
    }


def test_a_decision_after_start_has_no_plan_and_its_figures_in_name_order():
    record = dataclasses.replace(
        decoded("RolloutDecision"),
        sequence=2,
        action="ADVANCE",
        figures={"users_treatment": 812.0, "failure_rate.upper": 0.004, "users_control": 15_020.0},
        plan=None,
    )
    row = dict(zip(ROLLOUT_COLUMNS, rollout_row(record), strict=True))
    assert (row["action"], row["sequence"]) == ("ADVANCE", 2)
    assert row["figure_names"] == ["failure_rate.upper", "users_control", "users_treatment"]
    assert row["figure_values"] == [0.004, 15_020.0, 812.0]
    plan_columns = ROLLOUT_COLUMNS[ROLLOUT_COLUMNS.index("control_model") :]
    assert all(row[column] in (None, []) for column in plan_columns)


def test_columns_exist_in_the_raw_tables_and_leave_only_computed_ones_out():
    # 0006 declares the raw tables whole; later migrations add columns with ALTER TABLE ... ADD COLUMN.
    ddl = (MIGRATIONS_DIR / "0006_dedup_by_event_id.sql").read_text()
    later = [
        statement
        for path in sorted(MIGRATIONS_DIR.glob("*.sql"))
        if path.name > "0006"
        for statement in split_statements(path.read_text())
    ]
    for table, columns in (("results", RESULT_COLUMNS), ("stage_metrics", METRIC_COLUMNS)):
        body = ddl.split(f"CREATE TABLE IF NOT EXISTS {table}_0006\n(")[1].split("\n)")[0]
        lines = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("--")]
        declared = {line.split()[0]: line for line in lines}
        for alter in (s for s in later if s.split()[:3] == ["ALTER", "TABLE", table]):
            declared |= {added.split()[0]: added for added in re.findall(r"ADD COLUMN (\w+ [^,]+)", alter)}
        assert set(columns) <= set(declared)
        omitted = [line for name, line in declared.items() if name not in columns]
        assert all(" DEFAULT " in line or " MATERIALIZED " in line for line in omitted)


def test_rollout_columns_are_the_tables_but_its_computed_ones():
    ddl = (MIGRATIONS_DIR / "0009_rollouts.sql").read_text()
    body = ddl.split("CREATE TABLE IF NOT EXISTS rollout_decisions\n(")[1].split("\n)")[0]
    declared = re.findall(r"^    (\w+) [A-Z]", body, re.MULTILINE)  # a column's line, not an Enum8's continuation
    computed = re.findall(r"^    (\w+) .* DEFAULT ", body, re.MULTILINE)
    assert computed == ["event_time", "event_date"]
    assert [name for name in declared if name not in computed] == list(ROLLOUT_COLUMNS)
