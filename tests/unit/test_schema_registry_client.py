"""HttpSchemaRegistry against the registry test double (tests/schema_registry.py) over real HTTP."""

import pytest

from pixelpipe.core.codec import Codec, HttpSchemaRegistry, UnknownSchemaError, codec_from_settings
from pixelpipe.core.events import EVENT_TYPES
from pixelpipe.core.settings import KafkaSettings
from tests.samples import sample_records
from tests.schema_registry import schema_registry


@pytest.fixture
def registry_url():
    with schema_registry() as registry:
        yield registry.url


def test_events_round_trip_through_a_registry(registry_url):
    producer_side = Codec(HttpSchemaRegistry(registry_url))
    consumer_side = Codec(HttpSchemaRegistry(registry_url))
    for name, record in sample_records().items():
        data = producer_side.encode(EVENT_TYPES[name].from_avro(record))
        assert data[0] == 0
        assert consumer_side.decode(data).to_avro() == record


def test_the_codec_from_settings_frames_for_the_registry_only_when_one_is_set(registry_url):
    event = EVENT_TYPES["StageMetric"].from_avro(sample_records()["StageMetric"])
    framed = codec_from_settings(KafkaSettings(schema_registry_url=registry_url)).encode(event)
    single_object = codec_from_settings(KafkaSettings()).encode(event)
    assert framed[0] == 0 and single_object[:2] == b"\xc3\x01"
    assert codec_from_settings(KafkaSettings(schema_registry_url=registry_url)).decode(single_object) == event
    assert codec_from_settings(KafkaSettings(schema_registry_url=registry_url)).decode(framed) == event


def test_an_id_the_registry_does_not_know_is_refused(registry_url):
    with pytest.raises(UnknownSchemaError, match=f"schema id 999 is not in the registry at {registry_url}"):
        Codec(HttpSchemaRegistry(registry_url)).decode(b"\x00\x00\x00\x03\xe7\x00")
