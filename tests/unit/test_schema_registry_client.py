"""HttpSchemaRegistry against a small in-process server that speaks the two Confluent REST calls it uses."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from pixelpipe.core.codec import Codec, HttpSchemaRegistry, UnknownSchemaError, codec_from_settings
from pixelpipe.core.events import EVENT_TYPES
from pixelpipe.core.settings import KafkaSettings
from tests.samples import sample_records


class FakeRegistry(BaseHTTPRequestHandler):
    schemas: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path.startswith("/subjects/pixelpipe.v1.") and self.path.endswith("/versions")
        if body["schema"] not in self.schemas:
            self.schemas.append(body["schema"])
        self._reply(200, {"id": self.schemas.index(body["schema"]) + 1})

    def do_GET(self):
        schema_id = int(self.path.rsplit("/", 1)[1])
        if 1 <= schema_id <= len(self.schemas):
            self._reply(200, {"schema": self.schemas[schema_id - 1]})
        else:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def registry_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


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
