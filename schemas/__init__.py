"""The contracts: Avro schemas (namespace pixelpipe.v1) in this folder, and frozen copies of earlier versions in
``v1/``, ``v2/``, ...: folder ``vN`` holds each schema as its version N was, for the schemas that had one. The codec
(``pixelpipe.core.codec``) and the typed events (``pixelpipe.core.events``) are built on them."""

from pathlib import Path

SCHEMA_DIR = Path(__file__).parent
NAMESPACE = "pixelpipe.v1"
SCHEMA_NAMES = (
    "ImageRequest",
    "ImageResult",
    "StageMetric",
    "DeadLetter",
    "Cancellation",
    "ModelPool",
    "ExperimentDefinition",
    "RolloutDecision",
)
