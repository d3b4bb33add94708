"""The moderation stamp: only the key's holder makes one, and it holds for the exact bytes and the topic it was made
for."""

import pytest

from pixelpipe.core.settings import ConfigError
from pixelpipe.processors.stamp import STAMP_HEADER, ModerationStamp


def test_a_stamp_verifies_only_on_the_bytes_and_the_topic_it_was_made_for_and_with_its_key():
    stamp = ModerationStamp("k1")
    headers = stamp.headers("pixelpipe.generate", b"request bytes")
    assert stamp.verify("pixelpipe.generate", b"request bytes", headers)
    assert not stamp.verify("pixelpipe.generate", b"request bytez", headers)
    assert not stamp.verify("pixelpipe.edit", b"request bytes", headers)
    assert not stamp.verify("pixelpipe.generate.long", b"request bytes", headers)
    assert not ModerationStamp("k2").verify("pixelpipe.generate", b"request bytes", headers)
    assert not stamp.verify("pixelpipe.generate", b"request bytes", {})
    assert not stamp.verify("pixelpipe.generate", b"request bytes", {STAMP_HEADER: None})
    assert not stamp.verify("pixelpipe.generate", b"request bytes", {STAMP_HEADER: b"0" * 64})


def test_no_stamp_without_a_key():
    with pytest.raises(ConfigError, match="PIXELPIPE_MODERATION_STAMP_KEY is empty"):
        ModerationStamp("")
