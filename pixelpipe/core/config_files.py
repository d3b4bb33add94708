"""The JSON configuration files an operator writes (pools, experiments, the model registry, the moderation policy):
one reader, so each says the same thing when the file is missing, unreadable or not JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_file(path: str | Path, what: str, error: type[Exception], hint: str = "") -> Any:
    """The JSON value in the file at ``path``. Raises ``error`` naming ``what`` the file is and its path (then
    ``hint``, for a missing file) when it is missing, cannot be read, or is not JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None
