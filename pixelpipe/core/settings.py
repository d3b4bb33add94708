"""Settings by concern, read from ``PIXELPIPE_*`` environment variables, with defaults for the embedded run.

Each concern is a small frozen dataclass (Kafka, topics, ClickHouse, object store, request limits, models,
experiments, moderation, stages, sink, operations, logs); ``Settings`` gathers them and each component takes only the
parts it needs. Every field names its environment variable, so the variables stay flat and stable while the code
groups them. The local stack's settings belong to the tools (``pixelpipe.tools.stack.settings``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

ENV_PREFIX = "PIXELPIPE_"

S = TypeVar("S")


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def setting(env: str, default: Any, doc: str, secret: bool = False) -> Any:
    """A field read from ``PIXELPIPE_<env>``."""
    return field(default=default, metadata={"env": ENV_PREFIX + env, "doc": doc, "secret": secret})


def section_from_env(cls: type[S], environ: Mapping[str, str]) -> S:
    """One concern's settings from ``environ``; variables not set keep their defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = environ.get(f.metadata["env"])
        if raw is None:
            continue
        parse = {"int": int, "float": float}.get(str(f.type), str)
        try:
            values[f.name] = parse(raw)
        except ValueError:
            raise ConfigError(f"{f.metadata['env']}: expected {f.type}, got {raw!r}") from None
    return cls(**values)


def section_env(section: Any) -> dict[str, str]:
    return {f.metadata["env"]: str(getattr(section, f.name)) for f in dataclasses.fields(section)}


def section_redacted(section: Any) -> dict[str, Any]:
    """A section's values, safe to show: secrets masked whole, and every URL (a secret or not: a registry or an
    endpoint may carry credentials too) with its password and secret query parameters masked."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, str) and "://" in value:
            value = mask_secrets(value)
        elif f.metadata["secret"] and value:
            value = MASK
        shown[f.name] = value
    return shown


MASK = "***"
# Query parameters that carry credentials: clickhouse-driver takes ?password=, presigned URLs carry signatures.
_SECRET_PARAMETER = re.compile(
    r"(?i)(?:[\w-]*[-_.])?(?:pass(?:word|wd)?|pwd|secret|token|signature|sig|credential|(?:api|access|secret)[-_]?key)"
)
# The password of scheme://user:password@host (up to the host's @, so a password may hold an @ itself), and a query
# parameter's value.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s/]+@")
_QUERY_PARAMETER = re.compile(r"([?&;]([^\s=&;#]+)=)[^\s&;#\"']+")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it and the values of secret query parameters masked: for a URL
    shown to people, and for log lines and error messages, which may quote one (a connection string, say)."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    return _QUERY_PARAMETER.sub(
        lambda match: match[1] + MASK if _SECRET_PARAMETER.fullmatch(match[2]) else match[0],
        text,
    )


def settings_table(sections: Iterable[type]) -> str:
    """The configuration table in Markdown, variable, default and meaning, as the documentation's configuration page
    shows it (docs/hooks.py) and `pixelpipe config --markdown` prints it."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for section in sections:
        for f in dataclasses.fields(section):
            default = f"`{f.default}`" if f.default != "" else "empty"
            rows.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['doc']} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = setting("KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers, comma separated.")
    security_protocol: str = setting(
        "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str = setting("KAFKA_SASL_MECHANISM", "", "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).")
    sasl_username: str = setting("KAFKA_SASL_USERNAME", "", "SASL user name.")
    sasl_password: str = setting("KAFKA_SASL_PASSWORD", "", "SASL password.", secret=True)
    ssl_ca_location: str = setting("KAFKA_SSL_CA_LOCATION", "", "CA bundle that signs the brokers' certificates.")
    schema_registry_url: str = setting(
        "SCHEMA_REGISTRY_URL",
        "",
        "Confluent schema registry URL; when set, events are written in its framing instead of the single-object "
        "encoding (both are always read).",
    )

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings for connecting and authenticating; shared by every Kafka client we make.

        librdkafka's own log lines go through Python logging, so they are JSON and follow the log level.
        """
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol,
            "logger": logging.getLogger("pixelpipe.kafka"),
        }
        if self.sasl_mechanism:
            conf |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username,
                "sasl.password": self.sasl_password,
            }
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        return conf


@dataclass(frozen=True)
class TopicSettings:
    requests: str = setting("TOPIC_REQUESTS", "pixelpipe.requests", "Topic upstream services publish ImageRequests to.")
    generate: str = setting("TOPIC_GENERATE", "pixelpipe.generate", "Topic of moderated text-to-image requests.")
    edit: str = setting("TOPIC_EDIT", "pixelpipe.edit", "Topic of moderated image-to-image and inpaint requests.")
    generate_long: str = setting(
        "TOPIC_GENERATE_LONG",
        "pixelpipe.generate.long",
        "Topic of moderated text-to-image requests over PIXELPIPE_LONG_REQUEST_COMPUTE: the long lane.",
    )
    edit_long: str = setting(
        "TOPIC_EDIT_LONG",
        "pixelpipe.edit.long",
        "Topic of moderated edits over PIXELPIPE_LONG_REQUEST_COMPUTE: the long lane.",
    )
    results: str = setting("TOPIC_RESULTS", "pixelpipe.results", "Topic of terminal ImageResults.")
    metrics: str = setting("TOPIC_METRICS", "pixelpipe.metrics", "Topic of per-stage StageMetrics.")
    dead_letter: str = setting(
        "TOPIC_DEAD_LETTER", "pixelpipe.dead-letter", "Topic of undecodable or exhausted events."
    )
    cancellations: str = setting(
        "TOPIC_CANCELLATIONS",
        "pixelpipe.cancellations",
        "Compacted topic of Cancellations keyed by request id; every render worker reads it whole.",
    )
    model_pools: str = setting(
        "TOPIC_MODEL_POOLS",
        "pixelpipe.model-pools",
        "Compacted topic of ModelPools keyed by pool name: which models each pool's render workers serve; every "
        "moderation worker reads it whole.",
    )
    experiments: str = setting(
        "TOPIC_EXPERIMENTS",
        "pixelpipe.experiments",
        "Compacted topic of ExperimentDefinitions keyed by experiment key: the experiments in force, which every "
        "worker reads whole (`pixelpipe experiments apply`).",
    )
    rollouts: str = setting(
        "TOPIC_ROLLOUTS",
        "pixelpipe.rollouts",
        "Topic of RolloutDecisions keyed by experiment key: each guarded rollout's decisions, from which the "
        "controller resumes.",
    )
    gateway_usage: str = setting(
        "TOPIC_GATEWAY_USAGE",
        "pixelpipe.gateway.usage",
        "Topic where gateway instances report the calls they admitted per key, so rate limits hold across instances.",
    )
    partitions: int = setting("TOPIC_PARTITIONS", 8, "Partitions for topics pixelpipe creates.")
    reply_prefix: str = setting(
        "REPLY_TOPIC_PREFIX",
        "pixelpipe.replies.",
        "Prefix every request's reply topic must start with; checked by the SDK and again by every stage.",
    )

    def pipeline(self) -> list[str]:
        """Every topic of the pipeline."""
        return [
            self.requests,
            *self.render(),
            self.results,
            self.metrics,
            self.dead_letter,
            self.cancellations,
            self.model_pools,
            self.experiments,
            self.rollouts,
        ]

    def render(self) -> list[str]:
        """The topics moderation forwards to and the render stages read: each kind's own and its long lane's."""
        return [self.generate, self.edit, self.generate_long, self.edit_long]


@dataclass(frozen=True)
class ClickHouseSettings:
    url: str = setting(
        "CLICKHOUSE_URL",
        "chdb://./data/clickhouse",
        "chdb://DIR (embedded) or clickhouse://user:password@host:9000/db.",
        secret=True,  # the URL may carry the password; shown masked
    )


@dataclass(frozen=True)
class ObjectStoreSettings:
    url: str = setting("OBJECT_STORE_URL", "file://./data/objects", "file://DIR or s3://bucket/prefix.")
    s3_endpoint_url: str = setting("S3_ENDPOINT_URL", "", "S3 API endpoint; empty means AWS.")
    s3_region: str = setting("S3_REGION", "us-east-1", "S3 region.")
    s3_access_key_id: str = setting(
        "S3_ACCESS_KEY_ID", "", "S3 access key id; empty uses boto3's default chain.", secret=True
    )
    s3_secret_access_key: str = setting("S3_SECRET_ACCESS_KEY", "", "S3 secret access key.", secret=True)


@dataclass(frozen=True)
class RequestLimits:
    """Limits checked by the producer SDK on what is sent, by every stage on what it reads, and by the render stages
    on what will run; edit sources are also read no further than ``max_source_bytes``."""

    max_prompt_chars: int = setting(
        "MAX_PROMPT_CHARS", 2000, "Longest prompt accepted, in characters, before and after normalisation."
    )
    max_negative_prompt_chars: int = setting(
        "MAX_NEGATIVE_PROMPT_CHARS", 2000, "Longest negative prompt accepted, in characters."
    )
    max_name_chars: int = setting(
        "MAX_NAME_CHARS", 128, "Longest event id, user id, model name, experiment key or variant name accepted."
    )
    max_uri_chars: int = setting("MAX_URI_CHARS", 1024, "Longest edit source or mask URI accepted, in characters.")
    max_reference_images: int = setting(
        "MAX_REFERENCE_IMAGES",
        4,
        "Most reference images one edit may carry besides its source (for models that take several images).",
    )
    max_experiments: int = setting("MAX_EXPERIMENTS", 32, "Most experiment assignments one request may carry.")
    max_image_side: int = setting("MAX_IMAGE_SIDE", 2048, "Largest width or height accepted, in pixels.")
    max_steps: int = setting("MAX_STEPS", 150, "Most denoising steps accepted.")
    max_source_pixels: int = setting("MAX_SOURCE_PIXELS", 4_194_304, "Largest edit source or mask accepted, in pixels.")
    max_source_bytes: int = setting(
        "MAX_SOURCE_BYTES",
        33_554_432,
        "Largest edit source or mask accepted, in bytes; reading stops past it.",
    )
    max_request_compute: float = setting(
        "MAX_REQUEST_COMPUTE",
        60.0,
        "Most compute one request may ask for, in device seconds as its model's compute_fit charges them (the "
        "registry; a family's default fit is an H100's: FLUX.1 at 1024x1024, 28 steps is 5.2 s an image); beyond it, "
        "FAILED INVALID_REQUEST.",
    )


@dataclass(frozen=True)
class ModelSettings:
    registry: str = setting(
        "MODEL_REGISTRY", "./data/models/registry.json", "Model registry file (name -> path, defaults)."
    )


@dataclass(frozen=True)
class ExperimentSettings:
    file: str = setting(
        "EXPERIMENTS_FILE",
        "experiments.json",
        "Experiments file: stamped by the SDK, variants' overrides applied by the processors, read by `analyze`.",
    )


@dataclass(frozen=True)
class ModerationSettings:
    policy: str = setting(
        "MODERATION_POLICY", "", "Moderation policy file (thresholds, rules); empty uses the defaults."
    )
    max_requests_per_user_per_minute: int = setting(
        "MAX_REQUESTS_PER_USER_PER_MINUTE",
        600,
        "Per user, across all moderation workers: a user's requests beyond this rate end FAILED (RATE_LIMITED); 0 "
        "turns it off.",
    )
    stamp_key: str = setting(
        "MODERATION_STAMP_KEY",
        "",
        "Secret key of the stamp (HMAC-SHA256) moderation puts on what it forwards; the render stages render only "
        "stamped requests. Every worker needs it: none starts without one.",
        secret=True,
    )
    rate_limit_burst: int = setting(
        "RATE_LIMIT_BURST",
        10,
        "Most requests of one user moderation lets through at once, before the per-minute rate paces them.",
    )
    max_user_compute_per_minute: float = setting(
        "MAX_USER_COMPUTE_PER_MINUTE",
        600.0,
        "Per user, across all moderation workers: a user's compute (device seconds a minute, as "
        "PIXELPIPE_MAX_REQUEST_COMPUTE counts them) beyond this rate ends FAILED (RATE_LIMITED); up to a minute's "
        "worth at once; 0 turns it off.",
    )
    long_request_compute: float = setting(
        "LONG_REQUEST_COMPUTE",
        10.0,
        "Requests over this compute (device seconds) go to the long lane (PIXELPIPE_TOPIC_GENERATE_LONG, "
        "PIXELPIPE_TOPIC_EDIT_LONG), which renders beside the others; 0 turns the lane off.",
    )
    image_detector: str = setting(
        "IMAGE_DETECTOR",
        "nudenet",
        "Detector for edit sources and output images: nudenet, or null (finds nothing, costs nothing; for capacity "
        "tests of the pipeline only, never where images must be moderated).",
    )


@dataclass(frozen=True)
class StageSettings:
    max_batch: int = setting("MAX_BATCH", 8, "Most compatible requests run in one model call.")
    take_events: int = setting(
        "TAKE_EVENTS", 32, "Most events a render stage takes from its stream at once, to group into batches."
    )
    max_wait_ms: int = setting("MAX_WAIT_MS", 50, "Longest a render stage waits for its events to fill a take.")
    moderation_take_events: int = setting(
        "MODERATION_TAKE_EVENTS", 256, "Most requests moderation takes at once (one profanity-model call for all)."
    )
    moderation_max_wait_ms: int = setting(
        "MODERATION_MAX_WAIT_MS", 5, "Longest moderation waits for its requests to fill a take."
    )
    device_hour_price_usd: float = setting(
        "DEVICE_HOUR_PRICE_USD", 1.0, "Price of one hour of this worker's device, for cost metrics."
    )
    reply_timeout_ms: int = setting(
        "REPLY_TIMEOUT_MS",
        5000,
        "Longest a worker tries to send a result's copy to its reply topic; then the copy is logged and dropped.",
    )
    storage_retry_budget_s: float = setting(
        "STORAGE_RETRY_BUDGET_S",
        120.0,
        "Longest a storage read or write is retried, never past the request's deadline; the stage waits meanwhile.",
    )
    retry_backoff_ms: int = setting("RETRY_BACKOFF_MS", 200, "First retry delay; doubles each attempt, up to 5 s.")
    worker_id: str = setting("WORKER_ID", "", "This worker's name in metrics; empty uses host-pid.")
    consumer_group: str = setting(
        "CONSUMER_GROUP", "pixelpipe", "Prefix of the workers' consumer groups (one group per stage set and pool)."
    )
    pool: str = setting(
        "POOL",
        "default",
        "The model pool a render worker serves: it loads that pool's models and reads its render topics "
        "(`pixelpipe worker --pool`); `default` reads the render topics' own names.",
    )


@dataclass(frozen=True)
class SinkSettings:
    group_id: str = setting("SINK_GROUP_ID", "pixelpipe.clickhouse-sink", "The ClickHouse sink's consumer group.")
    max_batch_rows: int = setting("SINK_MAX_BATCH_ROWS", 50_000, "Rows the sink gathers before an insert.")
    max_batch_wait_ms: int = setting("SINK_MAX_BATCH_WAIT_MS", 1000, "Longest the sink holds rows before an insert.")
    insert_retry_s: float = setting(
        "SINK_INSERT_RETRY_S", 120.0, "How long the sink retries an insert while ClickHouse does not answer."
    )


@dataclass(frozen=True)
class GatewaySettings:
    host: str = setting("GATEWAY_HOST", "127.0.0.1", "Address `pixelpipe gateway` listens on.")
    port: int = setting("GATEWAY_PORT", 8080, "Port `pixelpipe gateway` listens on.")
    instance_id: str = setting(
        "GATEWAY_INSTANCE_ID",
        "",
        "This gateway's name: its reply topic is the reply prefix + `gateway.` + this; empty uses host-port. Keep "
        "it stable across restarts and distinct per instance.",
    )
    keys_file: str = setting(
        "GATEWAY_KEYS_FILE", "./data/gateway/keys.json", "API keys (hashes only), written by `pixelpipe keys`."
    )
    timeout_s: float = setting(
        "GATEWAY_TIMEOUT_S", 120.0, "A call's deadline: the request's deadline in the pipeline; past it, 504."
    )
    max_lag: int = setting(
        "GATEWAY_MAX_LAG",
        1000,
        "Requests waiting for moderation (consumer lag on the requests topic) past which calls get 503; 0 turns "
        "it off.",
    )
    url_expiry_s: int = setting("GATEWAY_URL_EXPIRY_S", 3600, "Lifetime of the URLs of `response_format=url`.")
    url_signing_key: str = setting(
        "GATEWAY_URL_SIGNING_KEY",
        "",
        "Secret that signs the gateway's own `/v1/files/...` URLs (file:// object stores); empty: `url` is refused "
        "there. S3 stores presign with their credentials.",
        secret=True,
    )
    default_size: str = setting("GATEWAY_DEFAULT_SIZE", "512x512", "Size of generations with size=auto.")
    default_model: str = setting(
        "GATEWAY_DEFAULT_MODEL", "", "Model of calls that name none; empty uses the registry's first."
    )
    usage_sync_s: float = setting(
        "GATEWAY_USAGE_SYNC_S",
        0.25,
        "How often a gateway reports the calls it admitted per key to PIXELPIPE_TOPIC_GATEWAY_USAGE and charges "
        "the other instances' reports to its rate limits; 0 turns sharing off (each instance limits alone).",
    )


@dataclass(frozen=True)
class OpsSettings:
    metrics_port: int = setting(
        "METRICS_PORT",
        0,
        "Port of this process's /metrics, /healthz and /readyz (0: none served). Processes on one host need "
        "distinct ports: the local stack's Prometheus scrapes 9400-9403 (the demo's workers and sink, the stack's "
        "gateway).",
    )
    metrics_host: str = setting("METRICS_HOST", "0.0.0.0", "Address the metrics and health server listens on.")
    liveness_bound_s: float = setting(
        "LIVENESS_BOUND_S",
        30.0,
        "/healthz fails when the worker's event loop (the sink's poll loop) has not run for this long.",
    )
    lag_interval_s: float = setting(
        "LAG_INTERVAL_S", 5.0, "How often a process measures its consumer groups' lag (a background thread)."
    )
    prometheus_url: str = setting(
        "PROMETHEUS_URL", "http://127.0.0.1:9090", "Prometheus that `pixelpipe top` reads (the local stack's)."
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = setting("LOG_LEVEL", "WARNING", "Log level; logs are JSON lines on stderr.")


@dataclass(frozen=True)
class Settings:
    """Every runtime setting, by concern."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    clickhouse: ClickHouseSettings = field(default_factory=ClickHouseSettings)
    objects: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    models: ModelSettings = field(default_factory=ModelSettings)
    experiments: ExperimentSettings = field(default_factory=ExperimentSettings)
    moderation: ModerationSettings = field(default_factory=ModerationSettings)
    stages: StageSettings = field(default_factory=StageSettings)
    sink: SinkSettings = field(default_factory=SinkSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    logs: LogSettings = field(default_factory=LogSettings)

    @classmethod
    def sections(cls) -> list[type]:
        return [f.default_factory for f in dataclasses.fields(cls)]  # type: ignore[misc]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        return cls(**{f.name: section_from_env(f.default_factory, environ) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]

    def _sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_env(self) -> dict[str, str]:
        """These settings as PIXELPIPE_* variables, for starting another pixelpipe process with them."""
        env: dict[str, str] = {}
        for section in self._sections().values():
            env |= section_env(section)
        return env

    def redacted(self) -> dict[str, dict[str, Any]]:
        """The settings by concern with every secret masked, safe to log."""
        return {name: section_redacted(section) for name, section in self._sections().items()}

    def updated(self, **changes: Any) -> Settings:
        """A copy with some settings changed, named as their variables without the prefix, in lower case
        (``topic_partitions=4`` sets ``PIXELPIPE_TOPIC_PARTITIONS``)."""
        sections = self._sections()
        for key, value in changes.items():
            env = ENV_PREFIX + key.upper()
            for name, section in sections.items():
                match = [f.name for f in dataclasses.fields(section) if f.metadata["env"] == env]
                if match:
                    sections[name] = dataclasses.replace(section, **{match[0]: value})
                    break
            else:
                raise ConfigError(f"no setting {env}")
        return Settings(**sections)
