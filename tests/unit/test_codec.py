import io
import json
import shutil
import struct
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from pixelpipe.core.codec import (
    Codec,
    CodecError,
    InMemorySchemaRegistry,
    UnknownEncodingError,
    UnknownSchemaError,
    current_schemas,
    schema_fingerprint,
)
from pixelpipe.core.events import EVENT_TYPES, ImageResult, StageMetric
from pixelpipe.schemas import SCHEMA_DIR, SCHEMA_NAMES
from tests.samples import sample_records

FIXTURES = Path(__file__).parent.parent / "fixtures"


def sample_event(name):
    return EVENT_TYPES[name].from_avro(sample_records()[name])


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_single_object_round_trip(name):
    codec = Codec()
    data = codec.encode(sample_event(name))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == current_schemas()[name].fingerprint
    decoded = codec.decode(data)
    assert type(decoded) is EVENT_TYPES[name]
    assert decoded == sample_event(name)
    assert decoded.to_avro() == sample_records()[name]
    assert codec.decode_record(data) == (name, sample_records()[name])
    assert codec.encode_record(name, sample_records()[name]) == data


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_registry_framing_round_trip(name):
    registry = InMemorySchemaRegistry()
    producer_side, consumer_side = Codec(registry), Codec(registry)
    data = producer_side.encode(sample_event(name))
    assert data[0] == 0
    (schema_id,) = struct.unpack(">I", data[1:5])
    assert json.loads(registry.schema_text(schema_id))["name"] == name
    assert consumer_side.decode(data) == sample_event(name)


def test_registry_framing_decodes_without_registry_only_single_object():
    single_object = Codec().encode(sample_event("StageMetric"))
    framed = Codec(InMemorySchemaRegistry()).encode(sample_event("StageMetric"))
    assert isinstance(Codec(InMemorySchemaRegistry()).decode(single_object), StageMetric)
    with pytest.raises(UnknownSchemaError, match="schema id 1, but no registry"):
        Codec().decode(framed)


FROZEN = sorted((path.parent.name, path.stem) for path in SCHEMA_DIR.glob("v*/*.avsc"))


def test_every_schema_has_a_frozen_first_version_and_each_frozen_schema_a_fixture():
    assert {name for version, name in FROZEN if version == "v1"} == set(SCHEMA_NAMES)
    assert ("v2", "ImageResult") in FROZEN  # ImageResult 3 added CANCELLED
    assert {("v3", "ImageResult"), ("v2", "StageMetric")} <= set(FROZEN)  # ImageResult 4, StageMetric 3: the pool
    assert sorted((p.parent.name, p.stem) for p in FIXTURES.glob("v*/*.bin")) == FROZEN


@pytest.mark.parametrize(("version", "name"), FROZEN)
def test_current_schema_reads_what_each_earlier_version_wrote(version, name):
    old_schema = parse_schema(json.loads((SCHEMA_DIR / version / f"{name}.avsc").read_text()))
    data = (FIXTURES / version / f"{name}.bin").read_bytes()
    assert data[2:10] == schema_fingerprint(old_schema)
    decoded_name, record = Codec().decode_record(data)
    assert decoded_name == name
    assert type(Codec().decode(data)) is EVENT_TYPES[name]
    expected = sample_records()[name]
    for field in old_schema["fields"]:
        assert record[field["name"]] == expected[field["name"]], field["name"]
    current_fields = {f["name"] for f in current_schemas()[name].parsed["fields"]}
    assert set(record) == current_fields


def test_fingerprint_matches_the_avro_specification_vector():
    # CRC-64-AVRO of the canonical form of "int", as the Avro test suites list it.
    assert schema_fingerprint("int").hex() == "8f5c393f1ad57572"


def test_an_older_writer_schema_is_resolved_into_the_current_one(tmp_path):
    # A history folder whose ImageRequest lacks reply_topic: its events decode with the current default.
    shutil.copytree(SCHEMA_DIR, tmp_path / "schemas", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    old = json.loads((SCHEMA_DIR / "ImageRequest.avsc").read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] != "reply_topic"]
    (tmp_path / "schemas" / "v0").mkdir()
    (tmp_path / "schemas" / "v0" / "ImageRequest.avsc").write_text(json.dumps(old))
    parsed = parse_schema(old)
    record = {k: v for k, v in sample_records()["ImageRequest"].items() if k != "reply_topic"}
    body = io.BytesIO()
    schemaless_writer(body, parsed, record)
    decoded = Codec(schema_dir=tmp_path / "schemas").decode(b"\xc3\x01" + schema_fingerprint(parsed) + body.getvalue())
    assert decoded.to_avro() == record | {"reply_topic": None}
    with pytest.raises(UnknownSchemaError):
        Codec().decode(b"\xc3\x01" + schema_fingerprint(parsed) + body.getvalue())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "starts with nothing"),
        (b'{"prompt": "json"}', "starts with 7b22"),
        (b"\xc3\x02" + bytes(8), "starts with c302"),
        (b"\xc3\x01\x01", "starts with c301 \\(3 bytes\\)"),
    ],
)
def test_unknown_encodings_are_refused_naming_the_magic(data, message):
    with pytest.raises(UnknownEncodingError, match=message):
        Codec().decode(data)


def test_unknown_fingerprint_is_refused_naming_it():
    with pytest.raises(UnknownSchemaError, match="fingerprint 0102030405060708 matches no shipped schema"):
        Codec().decode(b"\xc3\x01" + bytes(range(1, 9)) + b"\x00")


def test_unknown_schema_id_is_refused_naming_it():
    registry = InMemorySchemaRegistry()
    with pytest.raises(UnknownSchemaError, match="schema id 77 is not registered"):
        Codec(registry).decode(b"\x00" + struct.pack(">I", 77) + b"\x00")


def test_truncated_and_padded_bodies_are_refused():
    data = Codec().encode(sample_event("ImageRequest"))
    with pytest.raises(CodecError, match="ImageRequest: body does not decode"):
        Codec().decode(data[:-20])
    with pytest.raises(CodecError, match="3 bytes left after the record"):
        Codec().decode(data + b"abc")


def test_decode_as_refuses_another_event():
    data = Codec().encode(sample_event("StageMetric"))
    with pytest.raises(CodecError, match="expected a ImageResult, got a StageMetric"):
        Codec().decode_as(ImageResult, data)


def test_encode_refuses_records_that_break_the_schema():
    bad = sample_records()["ImageRequest"] | {"kind": "UPSCALE"}
    with pytest.raises(CodecError, match="ImageRequest: record does not match the schema"):
        Codec().encode_record("ImageRequest", bad)
    with pytest.raises(CodecError, match="ImageRequest: record does not match the schema"):
        Codec().encode(EVENT_TYPES["ImageRequest"].from_avro(bad))
    with pytest.raises(UnknownSchemaError, match="unknown schema 'Nope'"):
        Codec().encode_record("Nope", {})


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_a_timestamp_out_of_range_is_a_codec_error(name):
    # 2**62 ms is a valid Avro long but no datetime: fastavro raises OverflowError while converting it.
    data = Codec().encode_record(name, sample_records()[name] | {"event_time": 2**62})
    with pytest.raises(CodecError, match=f"{name}: body does not decode \\(OverflowError"):
        Codec().decode(data)


def test_a_writer_schema_that_does_not_resolve_is_a_codec_error():
    # A registry schema named like ours whose `kind` is an int: it cannot be resolved into the current enum.
    incompatible = json.loads((SCHEMA_DIR / "ImageRequest.avsc").read_text())
    for field in incompatible["fields"]:
        if field["name"] == "kind":
            field["type"] = "int"
    registry = InMemorySchemaRegistry()
    schema_id = registry.register("pixelpipe.v1.ImageRequest", json.dumps(incompatible))
    record = sample_records()["ImageRequest"] | {"kind": 1}
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(incompatible), record)
    with pytest.raises(CodecError, match="ImageRequest: body does not decode \\(SchemaResolutionError"):
        Codec(registry).decode(b"\x00" + struct.pack(">I", schema_id) + body.getvalue())


def test_a_registry_schema_that_does_not_parse_is_a_codec_error():
    registry = InMemorySchemaRegistry()
    schema_id = registry.register("pixelpipe.v1.ImageRequest", "{not json")
    with pytest.raises(UnknownSchemaError, match=f"schema id {schema_id} is not a valid Avro schema"):
        Codec(registry).decode(b"\x00" + struct.pack(">I", schema_id) + b"\x00")


@pytest.mark.parametrize("value", [None, "a string"])
def test_a_value_that_is_not_bytes_is_a_codec_error(value):
    with pytest.raises(UnknownEncodingError, match="expected bytes"):
        Codec().decode(value)
