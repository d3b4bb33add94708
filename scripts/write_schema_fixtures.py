"""Write one event per schema of a historical version folder (schemas/v1/, v2/, ...), for the compatibility tests.

    python scripts/write_schema_fixtures.py v2 [OUT_DIR]

Run once when a version is frozen (or a schema first appears in a folder); the files under
tests/fixtures/<version>/ never change after that. OUT_DIR (default tests/fixtures/<version>) lets a check write
them elsewhere and compare them with the frozen ones.

The events are written with fastavro and the historical schema directly: the codec encodes only the current
schemas, and these bytes must be what that older pixelpipe version put on the wire.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from fastavro import parse_schema, schemaless_writer

from pixelpipe.core.codec import SINGLE_OBJECT_MAGIC, schema_fingerprint
from pixelpipe.schemas import SCHEMA_DIR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.samples import sample_records  # noqa: E402


def main(version: str, out_dir: Path | None = None) -> None:
    out_dir = out_dir or ROOT / "tests" / "fixtures" / version
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sample_records()
    for path in sorted((SCHEMA_DIR / version).glob("*.avsc")):
        name = path.stem
        schema = parse_schema(json.loads(path.read_text()))
        body = io.BytesIO()
        schemaless_writer(body, schema, records[name])
        (out_dir / f"{name}.bin").write_bytes(SINGLE_OBJECT_MAGIC + schema_fingerprint(schema) + body.getvalue())
        print(f"wrote {out_dir / f'{name}.bin'}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else None)
