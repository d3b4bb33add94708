"""The typed events against their contracts: every class has exactly its .avsc fields, with the same defaults."""

import dataclasses
import json

import pytest

from pixelpipe.core.events import (
    EVENT_TYPES,
    CategoryScore,
    DeadLetter,
    GuardrailLimit,
    ImageRequest,
    ImageResult,
    RolloutPlan,
    RolloutTreatment,
    StageMetric,
    StoredImage,
    VariantDefinition,
)
from pixelpipe.schemas import SCHEMA_DIR, SCHEMA_NAMES
from tests.samples import sample_records

NESTED = {
    cls.__name__: cls
    for cls in (StoredImage, CategoryScore, VariantDefinition, RolloutPlan, RolloutTreatment, GuardrailLimit)
}


def _records(schema):
    """The schema's record and every named record nested in it, by name."""
    found = {schema["name"]: schema}
    for field in schema["fields"]:
        kind = field["type"]
        if isinstance(kind, dict) and kind.get("type") == "array" and isinstance(kind["items"], dict):
            found[kind["items"]["name"]] = kind["items"]
    return found


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_each_event_class_has_its_schemas_fields_and_defaults(name):
    schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    for record_name, record in _records(schema).items():
        cls = EVENT_TYPES.get(record_name) or NESTED[record_name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert list(fields) == [f["name"] for f in record["fields"]], record_name
        for avro_field in record["fields"]:
            field = fields[avro_field["name"]]
            if "default" not in avro_field:
                continue
            if avro_field["name"] == "schema_version":
                assert isinstance(field.default, int) and field.default >= avro_field["default"]
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert default == avro_field["default"], (record_name, avro_field["name"])


def test_results_are_written_as_schema_version_4_the_version_that_added_the_pool():
    result = ImageResult(event_id="e", request_id="r", status="CANCELLED", user_id="", model="")
    assert (result.schema_version, result.pool) == (4, None)


def test_metrics_are_written_as_schema_version_3_the_version_that_added_the_pool():
    metric = StageMetric(
        event_id="e",
        request_id="r",
        stage="GENERATE",
        outcome="CANCELLED",
        queue_ms=0.0,
        compute_ms=0.0,
        device="none",
        device_seconds=0.0,
        cost_usd=0.0,
        worker_id="w",
        user_id="u",
        model="m",
    )
    assert (metric.schema_version, metric.device_seconds_saved, metric.pool) == (3, None, None)


def test_requests_are_written_as_schema_version_3_the_version_that_added_experiment_revisions():
    assert ImageRequest(request_id="r", kind="EDIT", user_id="u", prompt="p", model="m").schema_version == 3


def test_events_convert_to_and_from_avro_records():
    for name, record in sample_records().items():
        event = EVENT_TYPES[name].from_avro(record)
        assert event.to_avro() == record
    result = ImageResult.from_avro(sample_records()["ImageResult"])
    assert isinstance(result.images[0], StoredImage) and isinstance(result.moderation_scores[0], CategoryScore)


def test_a_dead_letter_has_one_id_per_message_and_stage_and_a_bounded_reason():
    where = {"value": b"x", "key": None, "topic": "t", "partition": 1, "offset": 7, "request_id": None}
    first = DeadLetter.of(reason="bad", stage="moderation", **where)
    again = DeadLetter.of(reason="bad again" * 1000, stage="moderation", **where)
    assert first.event_id == again.event_id  # a replay dead-letters under the same id
    assert DeadLetter.of(reason="bad", stage="clickhouse-sink", **where).event_id != first.event_id
    assert DeadLetter.of(reason="bad", stage="moderation", **where | {"offset": 8}).event_id != first.event_id
    assert len(again.error_reason) == 4000
