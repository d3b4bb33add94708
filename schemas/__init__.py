"""The contracts: Avro schemas in this folder (namespace pixelpipe.v1) and the one codec that reads and writes them."""

from pixelpipe.schemas.codec import (
    Codec,
    CodecError,
    Decoded,
    UnknownEncodingError,
    UnknownSchemaError,
)

__all__ = ["Codec", "CodecError", "Decoded", "UnknownEncodingError", "UnknownSchemaError"]
