"""Faust's app and consumer, fitted to the pipeline: fetches that do not hold a message back (``FETCH_MAX_WAIT_MS``),
acknowledgement of only what a stream took, messages handed back by a stopping agent, commits before a rebalance
and a seek before a stream resumes (each a way Faust delivered events twice or lost them), and a global table that
apps of every consumer group read. Also the broker URL and credentials in Faust's form."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence, Set
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message

from pixelpipe.core.settings import KafkaSettings

# Longest a fetch waits at the broker for records; an empty fetch costs the worker about 1 ms, so the hundred a
# second of an idle worker take about a tenth of a core.
FETCH_MAX_WAIT_MS = 10
# What a fetch waits for, up to FETCH_MAX_WAIT_MS. With aiokafka's 1 byte, at a steady few hundred requests/s every
# fetch came back with a record or two: the fetches alone kept the worker busy and its queues grew (p50 468 ms at
# 450 requests/s); gathering up to 64 KB cut that to 73-96 ms (benchmarks/pipeline.py), for at most 10 ms a hop.
FETCH_MIN_BYTES = 64 * 1024


def broker_url(kafka: KafkaSettings) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in kafka.bootstrap.split(","))


def broker_credentials(kafka: KafkaSettings) -> Any:
    """The SASL and TLS settings of ``KafkaSettings.client_config`` in the form Faust (aiokafka) takes; None for
    PLAINTEXT."""
    protocol = kafka.security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_ca_location or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context else None


class _PromptFetchConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Faust fixes aiokafka's fetch wait at 1500 ms. aiokafka keeps one fetch in flight per broker, leaving out
        # the partitions whose records are not all read yet, so a message that arrives on one of those waited for
        # the fetch in flight to time out: up to 1.5 s at each stage at low rates. (Both set before the consumer
        # starts, which is when aiokafka reads them.)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        return consumer


class PipelineConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _PromptFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: Message) -> bool:
        # Faust acknowledges the events a stream skips (fetched under an older assignment, or met while a rebalance
        # holds the flow) as if they were processed, and a rebalance's commit then moved partitions past requests
        # nobody had rendered. An event no stream took is left unacknowledged: it is read again from the committed
        # offset, here or by the partition's next owner.
        if not message.tracked:
            return False
        return bool(super().ack(message))

    def hand_back(self, messages: Sequence[Message]) -> None:
        """Messages a stopping agent leaves unprocessed: never acknowledged, so no commit passes them and the
        partition's next owner reads them again, and not waited for by the stop (Faust's ``wait_empty`` waits for
        every message taken to be acknowledged)."""
        self._unacked_messages.difference_update(messages)

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        # Faust forgets the revoked partitions' acknowledged offsets before it waits for the streams and commits, so
        # the takes acknowledged since the last commit (up to broker_commit_interval of them) were delivered again
        # after every rebalance: moderated and rendered twice. They are committed first; what the takes in flight
        # acknowledge later, the wait that follows commits (stream_wait_empty).
        await self.maybe_wait_for_commit_to_finish()
        await self.force_commit(revoked)
        await super().on_partitions_revoked(revoked)

    async def perform_seek(self) -> None:
        # Faust's recovery resumes the stream partitions, then seeks them to their committed offsets, with the fetcher
        # already running (for the changelogs): what it delivered meanwhile was delivered again after the seek, and a
        # worker taking partitions over moderated and rendered part of its first takes twice. They wait for the seek.
        held = {tp for tp in self._get_active_partitions() if not self._is_changelog_tp(tp)}
        self.pause_partitions(held)
        try:
            await super().perform_seek()
        finally:
            self.resume_partitions(held)


class _PromptFetchTransport(aiokafka_driver.Transport):
    Consumer = PipelineConsumer


class SharedGlobalTable(faust.GlobalTable):
    """A global table over a topic of its own name, which apps of every consumer group read (the cancellations).
    Faust's assignor looks a global table's changelog up under the app's default name, whatever topic the table was
    given, and fails the assignment (silently: the worker then waits for partitions forever)."""

    def _changelog_topic_name(self) -> str:
        return self.changelog_topic.get_topic_name()


class PipelineApp(faust.App):
    """Faust's app, whose consumer fetches with a wait of ``FETCH_MAX_WAIT_MS`` and acknowledges only events a
    stream took; ``closers`` are called once it stopped (readers of the worker's own, such as its experiments
    mirror)."""

    closers: tuple[Callable[[], None], ...] = ()

    async def on_stop(self) -> None:
        await super().on_stop()
        for close in self.closers:
            close()

    def _new_transport(self) -> faust.types.TransportT:
        return _PromptFetchTransport(self.conf.broker_consumer, self)
