"""The operator's JSON files (pools, experiments, the model registry, the moderation policy) each refuse a missing,
unreadable or broken file with their own error, naming what the file is and where."""

import re
from pathlib import Path

import pytest

from pixelpipe.core.experiments import ExperimentConfigError, load_experiments
from pixelpipe.core.pools import PoolConfigError, load_pools
from pixelpipe.core.registry import ModelError, read_registry_json
from pixelpipe.processors.moderation import ModerationPolicy, PolicyError

READERS = [
    pytest.param(load_pools, PoolConfigError, "pools file", id="pools"),
    pytest.param(load_experiments, ExperimentConfigError, "experiments file", id="experiments"),
    pytest.param(read_registry_json, ModelError, "model registry", id="registry"),
    pytest.param(ModerationPolicy.from_file, PolicyError, "moderation policy", id="moderation policy"),
]


@pytest.mark.parametrize(("read", "error", "what"), READERS)
def test_a_missing_file_is_named_with_what_it_should_hold(tmp_path, read, error, what):
    missing = tmp_path / "absent.json"
    with pytest.raises(error, match=f"{what} {re.escape(str(missing))} does not exist"):
        read(missing)


@pytest.mark.parametrize(("read", "error", "what"), READERS)
def test_a_file_that_is_not_json_says_where_it_broke(tmp_path, read, error, what):
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,}')
    with pytest.raises(error, match=rf"{what} {re.escape(str(broken))} is not valid JSON: .*line 1 column 9"):
        read(broken)


@pytest.mark.parametrize(("read", "error", "what"), READERS)
def test_a_file_that_cannot_be_read_says_why(tmp_path, read, error, what):
    not_text = tmp_path / "binary.json"
    not_text.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(error, match=f"{what} {re.escape(str(not_text))} cannot be read"):
        read(not_text)
    with pytest.raises(error, match=f"{what} {re.escape(str(tmp_path))} cannot be read"):  # a directory
        read(Path(tmp_path))
