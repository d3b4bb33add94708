"""The one Avro codec: single-object encoding, or the schema-registry framing when a registry is configured.

Both wire formats decode here, always into the *current* shipped schema of the event's name, so a consumer
built today reads what an older producer wrote.

- single-object encoding: ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema + body.
  The fingerprint must belong to a schema shipped in ``schemas/`` (``*.avsc`` now, ``v*/`` before).
- schema-registry framing: ``00`` + 4-byte big-endian schema id + body; the writer schema comes from the registry.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pixelpipe.core.events import EVENT_TYPES, Event, Record
from pixelpipe.core.settings import KafkaSettings, mask_secrets
from pixelpipe.schemas import NAMESPACE, SCHEMA_DIR, SCHEMA_NAMES

E = TypeVar("E", bound=Event)

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
REGISTRY_MAGIC = b"\x00"
_SINGLE_OBJECT_HEADER_LEN = 10
_REGISTRY_HEADER_LEN = 5


class CodecError(ValueError):
    """Bytes that cannot be decoded, or a record that cannot be encoded."""


class UnknownEncodingError(CodecError):
    """The bytes start with neither known magic."""


class UnknownSchemaError(CodecError):
    """The fingerprint or schema id names no schema this codec can read."""


def schema_fingerprint(parsed_schema: Any) -> bytes:
    """CRC-64-AVRO of the parsing canonical form, as the 8 little-endian bytes the wire carries."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed_schema), "CRC-64-AVRO"))


@dataclass(frozen=True)
class ShippedSchema:
    name: str
    version: str  # "current" or the history folder, e.g. "v1"
    json_text: str
    parsed: Any
    fingerprint: bytes  # little-endian, as it appears on the wire

    @property
    def full_name(self) -> str:
        return f"{NAMESPACE}.{self.name}"


def _load(path: Path, version: str) -> ShippedSchema:
    text = path.read_text()
    parsed = parse_schema(json.loads(text))
    return ShippedSchema(path.stem, version, text, parsed, schema_fingerprint(parsed))


@cache
def current_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, ShippedSchema]:
    """The schemas producers write today, by short name."""
    return {name: _load(schema_dir / f"{name}.avsc", "current") for name in SCHEMA_NAMES}


@cache
def shipped_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[bytes, ShippedSchema]:
    """Every schema any pixelpipe version has written, current and historical, by fingerprint."""
    known = {s.fingerprint: s for s in current_schemas(schema_dir).values()}
    for folder in sorted(schema_dir.glob("v*/")):
        for path in sorted(folder.glob("*.avsc")):
            schema = _load(path, folder.name)
            known.setdefault(schema.fingerprint, schema)
    return known


class SchemaRegistry(Protocol):
    """The two calls the codec needs from a Confluent-compatible schema registry."""

    def register(self, subject: str, schema_json: str) -> int: ...

    def schema_text(self, schema_id: int) -> str: ...


class InMemorySchemaRegistry:
    """A registry held in this process: ids are assigned in registration order. For tests and embedded runs."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._texts: dict[int, str] = {}
        self._lock = threading.Lock()

    def register(self, subject: str, schema_json: str) -> int:
        with self._lock:
            key = (subject, schema_json)
            if key not in self._ids:
                self._ids[key] = len(self._texts) + 1
                self._texts[self._ids[key]] = schema_json
            return self._ids[key]

    def schema_text(self, schema_id: int) -> str:
        try:
            return self._texts[schema_id]
        except KeyError:
            raise UnknownSchemaError(f"schema id {schema_id} is not registered") from None


class HttpSchemaRegistry:
    """A client of the Confluent schema registry REST API (``POST /subjects/S/versions``, ``GET /schemas/ids/N``)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self._url = url.rstrip("/")
        self._timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            self._url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
            return json.loads(response.read())

    def register(self, subject: str, schema_json: str) -> int:
        return int(self._call("POST", f"/subjects/{subject}/versions", {"schema": schema_json})["id"])

    def schema_text(self, schema_id: int) -> str:
        try:
            return str(self._call("GET", f"/schemas/ids/{schema_id}")["schema"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                where = mask_secrets(self._url)
                raise UnknownSchemaError(f"schema id {schema_id} is not in the registry at {where}") from None
            raise


class Codec:
    """Encodes typed events and decodes either wire format into the current schema's typed event.

    With ``registry`` set, ``encode`` writes the registry framing (subjects follow the record-name strategy);
    without it, the single-object encoding. ``decode`` reads both either way. ``encode_record`` and
    ``decode_record`` work on plain Avro records, for tools that write raw events (fixtures, benchmarks).
    """

    def __init__(self, registry: SchemaRegistry | None = None, schema_dir: Path = SCHEMA_DIR) -> None:
        self._registry = registry
        self._current = current_schemas(schema_dir)
        self._by_fingerprint = shipped_schemas(schema_dir)
        self._registry_ids: dict[str, int] = {}
        self._registry_writers: dict[int, ShippedSchema] = {}

    @property
    def uses_registry(self) -> bool:
        return self._registry is not None

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, event: Event) -> bytes:
        return self.encode_record(event.schema_name, event.to_avro())

    def encode_record(self, name: str, record: Record) -> bytes:
        schema = self._schema(name)
        out = io.BytesIO()
        if self._registry is None:
            out.write(SINGLE_OBJECT_MAGIC)
            out.write(schema.fingerprint)
        else:
            out.write(REGISTRY_MAGIC)
            out.write(struct.pack(">I", self._registry_id(schema)))
        try:
            schemaless_writer(out, schema.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CodecError(f"{name}: record does not match the schema: {e}") from e
        return out.getvalue()

    def _schema(self, name: str) -> ShippedSchema:
        try:
            return self._current[name]
        except KeyError:
            raise UnknownSchemaError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}") from None

    def _registry_id(self, schema: ShippedSchema) -> int:
        if schema.name not in self._registry_ids:
            assert self._registry is not None
            self._registry_ids[schema.name] = self._registry.register(schema.full_name, schema.json_text)
        return self._registry_ids[schema.name]

    # -- decoding --------------------------------------------------------------------------------------------
    def decode(self, data: bytes) -> Event:
        """The typed event in ``data``; every failure, whatever raised it, is a CodecError naming the reason."""
        name, record = self.decode_record(data)
        try:
            return EVENT_TYPES[name].from_avro(record)
        except Exception as e:
            raise CodecError(f"{name}: record does not fit the event: {e!r}") from e

    def decode_as(self, event_type: type[E], data: bytes) -> E:
        """Decode and insist on one event type, for topics that carry only that event."""
        event = self.decode(data)
        if not isinstance(event, event_type):
            raise CodecError(f"expected a {event_type.schema_name}, got a {event.schema_name}")
        return event

    def decode_record(self, data: bytes) -> tuple[str, Record]:
        """The schema name and the plain record, read into the current schema.

        Raises CodecError for any bytes that do not decode. Only a schema registry that cannot be reached raises
        something else: that says nothing about the bytes, which may decode once it answers.
        """
        if not isinstance(data, bytes | bytearray):
            # A tombstone (null value) or a caller's mistake: either way there is no event to read.
            raise UnknownEncodingError(f"not an Avro event: expected bytes, got {type(data).__name__}")
        writer, header_len = self._writer_schema(data)
        reader = self._current[writer.name]
        body = io.BytesIO(data)
        body.seek(header_len)
        try:
            # Reading with the writer schema alone is much faster; resolve only when the schemas differ.
            record = schemaless_reader(
                body, writer.parsed, None if writer.fingerprint == reader.fingerprint else reader.parsed
            )
        except Exception as e:
            # fastavro raises whatever its readers hit: EOFError, OverflowError (a timestamp of 2**62 ms is valid
            # Avro but no datetime), SchemaResolutionError, UnicodeDecodeError, ValueError... All are about the bytes.
            raise CodecError(f"{writer.name}: body does not decode ({type(e).__name__}: {e})") from e
        if body.tell() != len(data):
            raise CodecError(f"{writer.name}: {len(data) - body.tell()} bytes left after the record")
        return writer.name, record

    def _writer_schema(self, data: bytes) -> tuple[ShippedSchema, int]:
        if data[:2] == SINGLE_OBJECT_MAGIC and len(data) >= _SINGLE_OBJECT_HEADER_LEN:
            fingerprint = data[2:_SINGLE_OBJECT_HEADER_LEN]
            try:
                return self._by_fingerprint[fingerprint], _SINGLE_OBJECT_HEADER_LEN
            except KeyError:
                raise UnknownSchemaError(
                    f"single-object encoding with fingerprint {fingerprint.hex()} matches no shipped schema"
                ) from None
        if data[:1] == REGISTRY_MAGIC and len(data) >= _REGISTRY_HEADER_LEN:
            (schema_id,) = struct.unpack(">I", data[1:_REGISTRY_HEADER_LEN])
            return self._registry_writer(schema_id), _REGISTRY_HEADER_LEN
        raise UnknownEncodingError(
            f"not an Avro event: starts with {data[:2].hex() or 'nothing'} ({len(data)} bytes); expected "
            f"c301 + 8-byte fingerprint (single-object) or 00 + 4-byte schema id (schema registry)"
        )

    def _registry_writer(self, schema_id: int) -> ShippedSchema:
        if schema_id in self._registry_writers:
            return self._registry_writers[schema_id]
        if self._registry is None:
            raise UnknownSchemaError(f"schema-registry framing with schema id {schema_id}, but no registry is set")
        text = self._registry.schema_text(schema_id)
        try:
            parsed = parse_schema(json.loads(text))
        except Exception as e:  # invalid JSON or not an Avro schema: nothing written with it can be read
            reason = f"{type(e).__name__}: {e}"
            raise UnknownSchemaError(f"schema id {schema_id} is not a valid Avro schema ({reason})") from e
        name = parsed["name"].rsplit(".", 1)[-1] if isinstance(parsed, dict) else ""
        if name not in self._current:
            raise UnknownSchemaError(f"schema id {schema_id} is {name or 'not a record'}, not a pixelpipe event")
        writer = ShippedSchema(name, f"registry:{schema_id}", "", parsed, schema_fingerprint(parsed))
        self._registry_writers[schema_id] = writer
        return writer


def codec_from_settings(kafka: KafkaSettings) -> Codec:
    """The codec every pixelpipe process uses: registry framing when a schema registry URL is set, else the
    single-object encoding."""
    return Codec(HttpSchemaRegistry(kafka.schema_registry_url) if kafka.schema_registry_url else None)
