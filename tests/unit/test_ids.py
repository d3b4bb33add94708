"""Derived event ids are RFC 4122 name-based (version 5) UUIDs, so ids written before stay the ids written now."""

from __future__ import annotations

import uuid

import pytest

from pixelpipe.core.ids import _EVENT_NAMESPACE, derived_event_id


@pytest.mark.parametrize(
    ("source", "what"), [("req-1", "result"), ("a" * 128, "metric/OUTPUT_MODERATION"), ("r", "dead-letter/ü")]
)
def test_a_derived_id_is_uuid5_of_the_source_and_what(source: str, what: str) -> None:
    assert derived_event_id(source, what) == str(uuid.uuid5(_EVENT_NAMESPACE, f"{source}/{what}"))
