"""One settings object, read from ``PIXELPIPE_*`` environment variables, with defaults for the embedded run."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "PIXELPIPE_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def _setting(default: Any, doc: str, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = _setting("127.0.0.1:9092", "Kafka bootstrap servers, comma separated.")
    kafka_security_protocol: str = _setting("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    kafka_sasl_mechanism: str = _setting("", "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).")
    kafka_sasl_username: str = _setting("", "SASL user name.")
    kafka_sasl_password: str = _setting("", "SASL password.", secret=True)
    kafka_ssl_ca_location: str = _setting("", "CA bundle that signs the brokers' certificates.")
    schema_registry_url: str = _setting(
        "",
        "Confluent schema registry URL; when set, events use its framing instead of single-object encoding.",
    )
    topic_requests: str = _setting("pixelpipe.requests", "Topic upstream services publish ImageRequests to.")
    topic_generate: str = _setting("pixelpipe.generate", "Topic of moderated text-to-image requests.")
    topic_edit: str = _setting("pixelpipe.edit", "Topic of moderated image-to-image and inpaint requests.")
    topic_results: str = _setting("pixelpipe.results", "Topic of terminal ImageResults.")
    topic_metrics: str = _setting("pixelpipe.metrics", "Topic of per-stage StageMetrics.")
    topic_dead_letter: str = _setting("pixelpipe.dead-letter", "Topic of undecodable or exhausted events.")
    topic_partitions: int = _setting(8, "Partitions for topics pixelpipe creates.")
    # Storage and warehouse
    clickhouse_url: str = _setting(
        "chdb://./data/clickhouse", "chdb://DIR (embedded) or clickhouse://user:password@host:9000/db."
    )
    object_store_url: str = _setting("file://./data/objects", "file://DIR or s3://bucket/prefix.")
    s3_endpoint_url: str = _setting("", "S3 API endpoint; empty means AWS.")
    s3_region: str = _setting("us-east-1", "S3 region.")
    s3_access_key_id: str = _setting("", "S3 access key id; empty uses boto3's default chain.", secret=True)
    s3_secret_access_key: str = _setting("", "S3 secret access key.", secret=True)
    # Request limits enforced by the producer SDK and again by the processors
    max_prompt_chars: int = _setting(2000, "Longest prompt accepted, in characters.")
    max_image_side: int = _setting(2048, "Largest width or height accepted, in pixels.")
    max_steps: int = _setting(150, "Most denoising steps accepted.")
    # Processors
    model_registry: str = _setting("./data/models/registry.json", "Model registry file (name -> path, defaults).")
    experiments_file: str = _setting(
        "experiments.json", "Experiments file: variants' overrides applied by the processors, read by `analyze`."
    )
    moderation_policy: str = _setting("", "Moderation policy file (thresholds, rules); empty uses the defaults.")
    max_requests_per_user_per_minute: int = _setting(
        600, "Per moderation worker: a user's requests beyond this rate end FAILED (RATE_LIMITED); 0 turns it off."
    )
    max_batch: int = _setting(8, "Most compatible requests run in one model batch.")
    max_wait_ms: int = _setting(50, "Longest a request waits for its batch to fill.")
    max_source_pixels: int = _setting(4_194_304, "Largest edit source or mask accepted, in pixels.")
    device_hour_price_usd: float = _setting(1.0, "Price of one hour of this worker's device, for cost metrics.")
    retry_attempts: int = _setting(4, "Attempts at a transient failure (storage, broker) before giving up.")
    retry_backoff_ms: int = _setting(200, "First retry delay; doubles each attempt.")
    worker_id: str = _setting("", "This worker's name in metrics; empty uses host-pid.")
    consumer_group: str = _setting("pixelpipe", "Prefix of the workers' consumer groups (one group per stage set).")
    # Local stack
    stack_dir: str = _setting("./data/stack", "Where `pixelpipe stack` keeps each service's data and logs.")
    stack_kafka_port: int = _setting(9092, "Local Kafka broker port (the controller uses the next one).")
    stack_clickhouse_port: int = _setting(9000, "Local ClickHouse native-protocol port.")
    stack_clickhouse_http_port: int = _setting(8123, "Local ClickHouse HTTP port.")
    stack_s3_port: int = _setting(9100, "Local S3 endpoint port.")
    stack_s3_bucket: str = _setting("pixelpipe", "Bucket the local stack creates.")
    cache_dir: str = _setting("~/.cache/pixelpipe", "Downloaded server jars and the cached virtual environment.")
    # Logs
    log_level: str = _setting("WARNING", "Log level; logs are JSON lines on stderr.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            parse = {"int": int, "float": float}.get(str(f.type), str)
            try:
                values[f.name] = parse(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}: expected {f.type}, got {raw!r}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """These settings as PIXELPIPE_* variables, for starting another pixelpipe process with them."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked, safe to log."""
        return {
            f.name: ("***" if f.metadata["secret"] and getattr(self, f.name) else getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings for connecting and authenticating; shared by every Kafka client we make.

        librdkafka's own log lines go through Python logging, so they are JSON and follow the log level.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
            "logger": logging.getLogger("pixelpipe.kafka"),
        }
        if self.kafka_sasl_mechanism:
            conf |= {
                "sasl.mechanism": self.kafka_sasl_mechanism,
                "sasl.username": self.kafka_sasl_username,
                "sasl.password": self.kafka_sasl_password,
            }
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = self.kafka_ssl_ca_location
        return conf


def faust_broker_credentials(settings: Settings) -> Any:
    """The same SASL and TLS settings as ``kafka_client_config``, in the form Faust (aiokafka) takes; None for
    PLAINTEXT."""
    import ssl

    import faust

    protocol = settings.kafka_security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context else None


def settings_table() -> str:
    """The configuration table for the README: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        rows.append(f"| `{ENV_PREFIX}{f.name.upper()}` | `{f.default}` | {f.metadata['doc']} |")
    return "\n".join(rows)
