import io
import json
import shutil
import struct
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from pixelpipe.core.codec import (
    SCHEMA_DIR,
    SCHEMA_NAMES,
    Codec,
    CodecError,
    InMemorySchemaRegistry,
    UnknownEncodingError,
    UnknownSchemaError,
    current_schemas,
    schema_fingerprint,
)
from tests.samples import sample_records

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_single_object_round_trip(name):
    codec = Codec()
    data = codec.encode(name, sample_records()[name])
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == current_schemas()[name].fingerprint
    decoded = codec.decode(data)
    assert decoded.name == name
    assert decoded.record == sample_records()[name]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_registry_framing_round_trip(name):
    registry = InMemorySchemaRegistry()
    producer_side, consumer_side = Codec(registry), Codec(registry)
    data = producer_side.encode(name, sample_records()[name])
    assert data[0] == 0
    (schema_id,) = struct.unpack(">I", data[1:5])
    assert json.loads(registry.schema_text(schema_id))["name"] == name
    assert consumer_side.decode(data).record == sample_records()[name]


def test_registry_framing_decodes_without_registry_only_single_object():
    single_object = Codec().encode("StageMetric", sample_records()["StageMetric"])
    framed = Codec(InMemorySchemaRegistry()).encode("StageMetric", sample_records()["StageMetric"])
    assert Codec(InMemorySchemaRegistry()).decode(single_object).name == "StageMetric"
    with pytest.raises(UnknownSchemaError, match="schema id 1, but no registry"):
        Codec().decode(framed)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_current_schema_reads_what_v1_wrote(name):
    v1_schema = parse_schema(json.loads((SCHEMA_DIR / "v1" / f"{name}.avsc").read_text()))
    data = (FIXTURES / "v1" / f"{name}.bin").read_bytes()
    assert data[2:10] == schema_fingerprint(v1_schema)
    record = Codec().decode_as(name, data)
    expected = sample_records()[name]
    for field in v1_schema["fields"]:
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
    assert decoded.record == record | {"reply_topic": None}
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
    data = Codec().encode("ImageRequest", sample_records()["ImageRequest"])
    with pytest.raises(CodecError, match="ImageRequest: body does not decode"):
        Codec().decode(data[:-20])
    with pytest.raises(CodecError, match="3 bytes left after the record"):
        Codec().decode(data + b"abc")


def test_decode_as_refuses_another_event():
    data = Codec().encode("StageMetric", sample_records()["StageMetric"])
    with pytest.raises(CodecError, match="expected a ImageResult, got a StageMetric"):
        Codec().decode_as("ImageResult", data)


def test_encode_refuses_records_that_break_the_schema():
    bad = sample_records()["ImageRequest"] | {"kind": "UPSCALE"}
    with pytest.raises(CodecError, match="ImageRequest: record does not match the schema"):
        Codec().encode("ImageRequest", bad)
    with pytest.raises(UnknownSchemaError, match="unknown schema 'Nope'"):
        Codec().encode("Nope", {})
