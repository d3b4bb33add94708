"""Where rollouts live on Kafka: their decisions on the rollouts topic (keyed by experiment key, so each rollout's
are in one partition, in order) and their experiments on the experiments topic (``live_experiments``)."""

from __future__ import annotations

import logging

from pixelpipe.core.codec import Codec, CodecError
from pixelpipe.core.events import RolloutDecision
from pixelpipe.core.experiments import Experiment
from pixelpipe.core.live_experiments import publish_experiments, read_experiments
from pixelpipe.core.settings import KafkaSettings, TopicSettings
from pixelpipe.core.topics import ensure_topics, publish_configuration, read_to_end

log = logging.getLogger(__name__)


class KafkaRolloutStore:
    """``rollouts.RolloutStore`` on the broker."""

    def __init__(self, kafka: KafkaSettings, topics: TopicSettings, codec: Codec) -> None:
        self.kafka = kafka
        self.topics = topics
        self.codec = codec
        self._topic_made = False

    def decisions(self) -> list[RolloutDecision]:
        decisions = []
        for key, value in read_to_end(self.kafka, self.topics.rollouts):
            if value is None:
                continue
            try:
                decisions.append(self.codec.decode_as(RolloutDecision, value))
            except CodecError as e:  # not a decision: no rollout can be built from it, the others still can
                log.warning("undecodable record on the rollouts topic skipped", extra={"key": key, "error": str(e)})
        return decisions

    def publish_decision(self, decision: RolloutDecision) -> None:
        if not self._topic_made:
            ensure_topics(self.kafka, self.topics, [self.topics.rollouts])
            self._topic_made = True
        publish_configuration(self.kafka, self.topics.rollouts, [(decision.rollout, self.codec.encode(decision))])

    def experiments(self) -> dict[str, Experiment]:
        return read_experiments(self.kafka, self.topics, self.codec)

    def publish_experiment(self, experiment: Experiment, applied_by: str) -> Experiment | None:
        published = publish_experiments(self.kafka, self.topics, self.codec, {experiment.key: experiment}, applied_by)
        return published.get(experiment.key)
