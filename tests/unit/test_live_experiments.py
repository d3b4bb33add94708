"""Experiments as live configuration without a broker: definitions to and from their events, the stages' view of
the file overlaid by the topic's table, moderation assigning live experiments with the revision in force (stable
under ramps), a render waiting for the revision a request was assigned under, and the null model's simulated
failures."""

import dataclasses
import datetime as dt
import json
import threading

import pytest

from pixelpipe.core.codec import Codec
from pixelpipe.core.events import ExperimentDefinition, ImageRequest, ImageResult
from pixelpipe.core.experiments import parse_experiments
from pixelpipe.core.live_experiments import LiveExperiments, from_definition, stopped, to_definition
from pixelpipe.core.registry import ModelEntry, ModelError
from pixelpipe.core.settings import ModerationSettings, StageSettings, TopicSettings
from pixelpipe.processors import render
from pixelpipe.processors.messages import Inbound, StageContext
from pixelpipe.processors.models import DiffusionModels
from pixelpipe.processors.moderation_stage import ModerationStage
from pixelpipe.processors.render import GenerateStage
from pixelpipe.processors.stamp import ModerationStamp
from tests.unit.test_stages import LIMITS, AllowEveryPrompt, RegistryOnlyModels, request

CODEC = Codec()


def rollout(percent: float, revision: int):
    (experiment,) = parse_experiments(
        {
            "experiments": [
                {
                    "key": "candidate",
                    "start": "2026-01-01",
                    "description": "tiny-sd-b against tiny-sd",
                    "variants": [
                        {"name": "control", "weight": 100 - percent},
                        {"name": "treatment", "weight": percent, "overrides": {"model": "tiny-sd-b", "steps": 3}},
                    ],
                }
            ]
        }
    ).values()
    return dataclasses.replace(experiment, revision=revision)


def table(*experiments):
    return {e.key.encode(): CODEC.encode(to_definition(e, e.revision, "test")) for e in experiments}


def test_a_definition_reads_back_as_the_experiment_it_was_made_from():
    experiment = rollout(25, 3)
    event = CODEC.decode_as(ExperimentDefinition, CODEC.encode(to_definition(experiment, 3, "test")))
    assert (event.revision, event.state, event.applied_by) == (3, "RUNNING", "test")
    assert from_definition(event) == experiment
    assert parse_experiments({"experiments": [experiment.to_json()]})["candidate"] == dataclasses.replace(
        experiment, revision=0
    )


def test_a_stopped_experiment_assigns_no_one_and_ends_now():
    experiment = stopped(rollout(25, 3))
    assert experiment.stopped and experiment.end is not None
    assert not experiment.is_active(dt.datetime.now(dt.UTC))
    assert from_definition(to_definition(experiment, 4, "test")).stopped


def test_the_stages_see_the_file_overlaid_by_the_topic_and_each_change_as_it_arrives():
    (from_file,) = parse_experiments(
        {"experiments": [{"key": "file-only", "start": "2026-01-01", "variants": [{"name": "a"}, {"name": "b"}]}]}
    ).values()
    data = {}
    live = LiveExperiments({"file-only": from_file, "candidate": rollout(50, 0)}, data, CODEC)
    assert live["candidate"].revision == 0
    data.update(table(rollout(5, 1)))
    assert (live["candidate"].revision, live["candidate"].weights["treatment"]) == (1, 5)
    data.update(table(rollout(25, 2)))
    assert (live["candidate"].revision, live["candidate"].weights["treatment"]) == (2, 25)
    assert sorted(live) == ["candidate", "file-only"]


def moderated(requests, experiments):
    """The requests as moderation forwards them (decoded from the forwarded bytes)."""
    topics = TopicSettings()
    context = StageContext(topics, LIMITS, StageSettings(), CODEC, "worker", ModerationStamp("key"))
    stage = ModerationStage(
        context, ModerationSettings(), AllowEveryPrompt(), None, None, RegistryOnlyModels.registry, experiments
    )
    messages = [
        Inbound(CODEC.encode(r), r.request_id.encode(), topics.requests, 0, i, 1000.0, appended_s=1000.0 + i)
        for i, r in enumerate(requests)
    ]
    forwarded = [e for e in stage.handle_batch(messages) if e.topic in topics.render()]
    return {e.key.decode(): (e.topic, CODEC.decode_as(ImageRequest, e.value)) for e in forwarded}


def test_moderation_assigns_live_experiments_with_the_revision_in_force_and_a_ramp_keeps_the_treated_users():
    users = [request(user_id=f"user-{i}") for i in range(400)]
    at_5 = moderated(users, LiveExperiments({}, table(rollout(5, 1)), CODEC))
    at_25 = moderated(users, LiveExperiments({}, table(rollout(25, 2)), CODEC))
    treated_5 = {rid for rid, (_, r) in at_5.items() if r.experiments == {"candidate": "treatment"}}
    treated_25 = {rid for rid, (_, r) in at_25.items() if r.experiments == {"candidate": "treatment"}}
    assert 0.02 < len(treated_5) / len(users) < 0.09 and 0.19 < len(treated_25) / len(users) < 0.31
    assert treated_5 <= treated_25  # buckets from the hash: nobody treated at 5 % is moved back at 25 %
    assert {r.experiment_revisions["candidate"] for _, r in at_5.values()} == {1}
    assert {r.experiment_revisions["candidate"] for _, r in at_25.values()} == {2}
    # The variant's model is the one moderation charges and the render stage will run; the request is what it was.
    (rid, (_, forwarded)) = next((rid, v) for rid, v in at_25.items() if rid in treated_25)
    original = next(r for r in users if r.request_id == rid)
    assert forwarded.prompt == original.prompt and forwarded.model == original.model == "tiny-sd"


def test_moderation_leaves_a_request_that_names_its_arm_and_file_experiments_to_the_sdk():
    named = request(experiments={"candidate": "control"})
    plain = request()
    (file_experiment,) = parse_experiments({"experiments": [rollout(50, 0).to_json()]}).values()
    went = moderated([named, plain], LiveExperiments({}, table(rollout(100, 4)), CODEC))
    assert went[named.request_id][1].experiments == {"candidate": "control"}
    assert went[named.request_id][1].experiment_revisions == {"candidate": 4}
    went = moderated([plain], {"candidate": file_experiment})
    assert went[plain.request_id][1].experiments == {} and went[plain.request_id][1].experiment_revisions == {}


def test_a_null_model_with_a_failure_rate_fails_that_share_of_its_calls_and_the_same_calls_each_time():
    entry = ModelEntry.from_json("flaky", {"kind": "null", "failure_rate": 0.2})
    models = DiffusionModels(RegistryOnlyModels.registry.__class__({"flaky": entry}))

    def fails(seed):
        try:
            models.generate("flaky", ["p"], width=8, height=8, steps=1, seeds=[seed])
        except ModelError:
            return True
        return False

    failed = [fails(seed) for seed in range(500)]
    assert 0.14 < sum(failed) / len(failed) < 0.26
    assert [fails(seed) for seed in range(50)] == failed[:50]
    with pytest.raises(ModelError, match="'failure_rate' must be between 0 and 1"):
        ModelEntry.from_json("bad", {"kind": "null", "failure_rate": 1.5})
    with pytest.raises(ModelError, match="'failure_rate' is for null models only"):
        ModelEntry.from_json("bad", {"kind": "stable-diffusion", "path": "/m", "failure_rate": 0.1})


def assigned(revision, **fields):
    """A request as moderation forwards it: in the candidate's treatment, assigned under ``revision``."""
    r = request(experiments={"candidate": "treatment"}, **fields)
    r.experiment_revisions["candidate"] = revision
    return r


def planned(stage, requests):
    """The render stage's plan of ``requests``, stamped for its topic: the chunks' models, and what ended early."""
    messages = []
    for offset, r in enumerate(requests):
        value = stage.context.codec.encode(r)
        messages.append(
            Inbound(value, r.request_id.encode(), "t", 0, offset, 1000.0, headers=STAMP.headers("t", value))
        )
    take = stage.plan(messages)
    ended = [CODEC.decode_as(ImageResult, e.value) for e in take.emissions if e.topic == TopicSettings().results]
    return [chunk.params.model for chunk in take.chunks], ended


STAMP = ModerationStamp("key")


@pytest.fixture
def render_stage(tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"tiny-sd": {"kind": "null"}, "tiny-sd-b": {"kind": "null"}}))
    context = StageContext(TopicSettings(), LIMITS, StageSettings(), CODEC, "worker", STAMP)
    data = {}
    live = LiveExperiments({}, data, CODEC)
    stage = GenerateStage(context, DiffusionModels.from_file(registry), None, None, live)
    stage.unread_experiments = live.unread
    return stage, data


def test_a_render_waits_for_the_definition_moderation_assigned_it_under_and_renders_the_variant(render_stage):
    stage, data = render_stage
    treated = assigned(1)
    # Moderation assigned it under the candidate's first definition, which this worker reads a moment later.
    threading.Timer(0.3, lambda: data.update(table(rollout(5, 1)))).start()
    models, ended = planned(stage, [treated, request()])
    assert sorted(models) == ["tiny-sd", "tiny-sd-b"] and ended == []


def test_a_treated_request_that_ends_before_its_render_is_recorded_with_the_variant_s_model(render_stage):
    stage, data = render_stage
    data.update(table(rollout(25, 1)))
    expired = assigned(1)
    expired.deadline = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    _, (failed,) = planned(stage, [expired])
    assert (failed.status, failed.error_code, failed.model) == ("FAILED", "DEADLINE_EXCEEDED", "tiny-sd-b")


def test_a_render_whose_definition_never_arrives_fails_retryably_naming_the_experiment(render_stage, monkeypatch):
    stage, data = render_stage
    monkeypatch.setattr(render, "ASSIGNED_REVISION_WAIT_S", 0.2)
    data.update(table(rollout(5, 1)))
    treated = assigned(3)
    models, ended = planned(stage, [treated, request()])
    assert models == ["tiny-sd"]
    (failed,) = ended
    assert (failed.request_id, failed.status, failed.error_code) == (
        treated.request_id,
        "FAILED",
        "EXPERIMENT_UNAVAILABLE",
    )
    assert "candidate revision 3 (this worker holds 1)" in failed.error_message
