"""Kafka (KRaft), ClickHouse, an S3 endpoint, Prometheus, the lag exporter and the gateway as local processes."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pixelpipe.core.settings import KafkaSettings, ModelSettings, Settings, TopicSettings, section_from_env
from pixelpipe.core.topics import grant_roles
from pixelpipe.tools.stack.settings import StackSettings

log = logging.getLogger(__name__)

MAVEN_DIR = Path(__file__).parent / "maven"
# The alert rules shipped in the repository (deploy/ is not installed with the package: a stack run from an
# installed wheel starts Prometheus without rules).
ALERT_RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "alerts.yml"
LOCAL_S3_ACCESS_KEY = "pixelpipe"
LOCAL_S3_SECRET_KEY = "pixelpipe-local-secret"  # the local stack's own credentials, never real ones
LOCAL_S3_REGION = "us-east-1"
LOCAL_KAFKA_USER = "pixelpipe"  # with PIXELPIPE_STACK_KAFKA_ACLS=1, the super user the tools connect as
LOCAL_KAFKA_PASSWORD = "pixelpipe-local-kafka-secret"
LOCAL_KAFKA_ROLES = ("publisher", "moderation", "renderer", "sink")  # a SASL user each, granted by ACLs


def local_kafka_password(user: str) -> str:
    return LOCAL_KAFKA_PASSWORD if user == LOCAL_KAFKA_USER else f"pixelpipe-local-{user}-secret"


class StackError(RuntimeError):
    """A local service could not be set up, started or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    healthy: bool
    endpoint: str
    skipped: str = ""  # why an optional service does not run here; empty when it should


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind ``port`` now (as servers do, with SO_REUSEADDR: connections of an earlier one
    still in TIME_WAIT do not hold the port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system reports free now (for a process about to listen on it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scrape_ports(stack: StackSettings) -> list[int]:
    """The ports the local Prometheus scrapes besides the lag exporter (PIXELPIPE_STACK_SCRAPE_PORTS), in order."""
    return [int(port) for port in stack.scrape_ports.split(",") if port.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


class LocalService:
    """One server process: subclasses say how to prepare, run and probe it."""

    name = ""
    start_timeout_s = 90.0

    def __init__(self, stack: StackSettings) -> None:
        self.stack = stack
        self.dir = Path(stack.dir).expanduser().resolve() / self.name
        self.cache = Path(stack.cache_dir).expanduser()
        self.pid_file = self.dir / "pid"
        self.log_file = self.dir / "service.log"

    # -- what subclasses define ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration and initialise data on first start."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The process's environment; None inherits this one's."""
        return None

    @property
    def port(self) -> int:
        raise NotImplementedError

    def request(self) -> None:
        """One real client request; raises while the service is not ready."""
        raise NotImplementedError

    def probe(self) -> bool:
        """True when the service answers a real request."""
        if not port_open(self.port):
            return False
        try:
            self.request()
        except Exception:  # any client error means: not ready yet
            return False
        return True

    def after_ready(self) -> None:
        """One-time set-up that needs the running server."""

    def skipped(self) -> str:
        """Why this service does not run here (empty: it does); ``up`` leaves a skipped service stopped."""
        return ""

    # -- lifecycle -------------------------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def status(self) -> ServiceStatus:
        pid = self.pid()
        skipped = self.skipped() if pid is None else ""
        return ServiceStatus(self.name, pid, pid is not None and self.probe(), self.endpoint, skipped)

    def start(self) -> None:
        if self.pid() is not None:
            self.wait_ready()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group: `down` stops it and its children together
            )
        self.pid_file.write_text(str(process.pid))
        log.info("service starting", extra={"service": self.name, "pid": process.pid})
        self.wait_ready(process)
        self.after_ready()

    def wait_ready(self, process: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.probe():
                return
            if process is not None and process.poll() is not None:
                raise StackError(f"{self.name} exited with code {process.returncode}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise StackError(f"{self.name} not ready after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 30.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            log.warning("service ignored SIGTERM, killing", extra={"service": self.name, "pid": pid})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # also reaps any child left in the group
        self.pid_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def maven_classpath(self, artifact: str) -> str:
        """Resolve ``maven/<artifact>.xml`` into the cache once, with Maven; returns a java -cp value."""
        lib = self.cache / "maven" / artifact / "lib"
        if not any(lib.glob("*.jar")):
            if shutil.which("mvn") is None:
                raise StackError(f"{self.name}: Maven is needed to fetch {artifact}; run scripts/setup.sh")
            lib.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    "mvn",
                    "-q",
                    "-f",
                    str(MAVEN_DIR / f"{artifact}.xml"),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={lib}",
                ],
                check=True,
                cwd=lib,
            )
        return f"{lib}/*"


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError("Java 17 or newer is needed for Kafka and s3proxy; run scripts/setup.sh")
    return java


class Kafka(LocalService):
    """Apache Kafka 4.x, one combined broker and controller in KRaft mode."""

    name = "kafka"

    @property
    def port(self) -> int:
        return self.stack.kafka_port

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_endpoint(self) -> str:
        """A second listener that authenticates with SASL/PLAIN, for testing clients' credentials."""
        return f"127.0.0.1:{self.port + 2}"

    def prepare(self) -> None:
        controller = f"127.0.0.1:{self.port + 1}"
        users = [LOCAL_KAFKA_USER, *LOCAL_KAFKA_ROLES] if self.stack.kafka_acls else [LOCAL_KAFKA_USER]
        accounts = " ".join(f'user_{user}="{local_kafka_password(user)}"' for user in users)
        plain_login = f"org.apache.kafka.common.security.plain.PlainLoginModule required {accounts};"
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{self.endpoint},CONTROLLER://{controller},SASL_PLAINTEXT://{self.sasl_endpoint}",
            "advertised.listeners": f"PLAINTEXT://{self.endpoint},SASL_PLAINTEXT://{self.sasl_endpoint}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain_login,
            "log.dirs": str(self.dir / "data"),
            "num.partitions": str(self.stack.default_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        if self.stack.kafka_acls:
            properties |= self._authorizer_properties(accounts)
        (self.dir / "server.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
        (self.dir / "log4j2.properties").write_text(
            "status = error\nappender.out.type = Console\nappender.out.name = out\n"
            "appender.out.layout.type = PatternLayout\nappender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\nrootLogger.appenderRef.out.ref = out\n"
        )
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            formatted = subprocess.run(
                [
                    *self._java_command(),
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    # One argument: a base64url id may start with "-", which argparse would take for an option.
                    f"--cluster-id={cluster_id}",
                    "--config",
                    str(self.dir / "server.properties"),
                ],
                cwd=self.dir,
                capture_output=True,
                text=True,
            )
            if formatted.returncode != 0:
                raise StackError(f"kafka: formatting storage failed:\n{formatted.stdout}{formatted.stderr}")

    def _authorizer_properties(self, accounts: str) -> dict[str, str]:
        """Every request authorised by ACLs. The broker talks to its controller and to itself as the super user,
        over SASL: were those PLAINTEXT, their principal (ANONYMOUS) would be the super user, and so would every
        client of the PLAINTEXT listener, which instead is allowed nothing."""
        admin = f'username="{LOCAL_KAFKA_USER}" password="{LOCAL_KAFKA_PASSWORD}"'
        login = f"org.apache.kafka.common.security.plain.PlainLoginModule required {admin} {accounts};"
        return {
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{LOCAL_KAFKA_USER}",
            "listener.security.protocol.map": ",".join(
                ("PLAINTEXT:PLAINTEXT", "CONTROLLER:SASL_PLAINTEXT", "SASL_PLAINTEXT:SASL_PLAINTEXT")
            ),
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": login,
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": login,
        }

    def sasl_env(self, user: str = LOCAL_KAFKA_USER) -> dict[str, str]:
        """The PIXELPIPE_KAFKA_* variables of a client of the SASL listener: the super user, or one of the roles."""
        return {
            "PIXELPIPE_KAFKA_BOOTSTRAP": self.sasl_endpoint,
            "PIXELPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "PIXELPIPE_KAFKA_SASL_MECHANISM": "PLAIN",
            "PIXELPIPE_KAFKA_SASL_USERNAME": user,
            "PIXELPIPE_KAFKA_SASL_PASSWORD": local_kafka_password(user),
        }

    def grant_roles(self, topics: TopicSettings, consumer_group: str, sink_group: str) -> None:
        """Each role's ACLs on these topics, for its own user (PIXELPIPE_STACK_KAFKA_ACLS=1)."""
        admin = section_from_env(KafkaSettings, self.sasl_env())
        principals = {role: f"User:{role}" for role in LOCAL_KAFKA_ROLES}
        grant_roles(admin, topics, principals, consumer_group, sink_group)

    def _java_command(self) -> list[str]:
        return [
            _java(),
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            self.maven_classpath("kafka"),
        ]

    def command(self) -> list[str]:
        return [*self._java_command(), "kafka.Kafka", str(self.dir / "server.properties")]

    def request(self) -> None:
        from confluent_kafka.admin import AdminClient

        AdminClient({"bootstrap.servers": self.endpoint}).list_topics(timeout=3)


class ClickHouse(LocalService):
    """Debian's clickhouse-server with a configuration of our own (no systemd, no system paths)."""

    name = "clickhouse"

    @property
    def endpoint(self) -> str:
        return f"clickhouse://default@127.0.0.1:{self.port}/default"

    def prepare(self) -> None:
        for sub in ("data", "tmp", "user_files", "format_schemas"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # <yandex> is the root both the 18.x server and current releases accept.
        (self.dir / "config.xml").write_text(f"""<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{self.port}</tcp_port>
  <http_port>{self.stack.clickhouse_http_port}</http_port>
  <path>{self.dir / "data"}/</path>
  <tmp_path>{self.dir / "tmp"}/</tmp_path>
  <user_files_path>{self.dir / "user_files"}/</user_files_path>
  <format_schema_path>{self.dir / "format_schemas"}/</format_schema_path>
  <users_config>{self.dir / "users.xml"}</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
""")
        (self.dir / "users.xml").write_text("""<yandex>
  <profiles><default><allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
""")

    def command(self) -> list[str]:
        binary = shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise StackError("clickhouse-server is not installed; run scripts/setup.sh (Debian package)")
        return [binary, f"--config-file={self.dir / 'config.xml'}"]

    @property
    def port(self) -> int:
        return self.stack.clickhouse_port

    def request(self) -> None:
        from clickhouse_driver import Client

        Client("127.0.0.1", port=self.port, connect_timeout=2).execute("SELECT 1")


class ObjectStorage(LocalService):
    """An S3 API endpoint: s3proxy on a filesystem directory, or moto's server where s3proxy cannot be had."""

    name = "s3"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _use_s3proxy(self) -> bool:
        try:
            self.maven_classpath("s3proxy")
        except (StackError, subprocess.CalledProcessError) as e:
            log.warning("s3proxy unavailable, using moto server", extra={"reason": str(e)})
            return False
        return shutil.which("java") is not None

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "s3proxy.conf").write_text(
            f"s3proxy.endpoint={self.endpoint}\n"
            "s3proxy.authorization=aws-v2-or-v4\n"
            f"s3proxy.identity={LOCAL_S3_ACCESS_KEY}\n"
            f"s3proxy.credential={LOCAL_S3_SECRET_KEY}\n"
            "jclouds.provider=filesystem\n"
            f"jclouds.filesystem.basedir={self.dir / 'data'}\n"
        )

    def command(self) -> list[str]:
        if self._use_s3proxy():
            return [
                _java(),
                "-Xmx256m",
                "-cp",
                self.maven_classpath("s3proxy"),
                "org.gaul.s3proxy.Main",
                "--properties",
                str(self.dir / "s3proxy.conf"),
            ]
        return [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]

    def client(self):  # noqa: ANN201 - boto3 clients are dynamically typed
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=LOCAL_S3_REGION,
            aws_access_key_id=LOCAL_S3_ACCESS_KEY,
            aws_secret_access_key=LOCAL_S3_SECRET_KEY,
            config=Config(
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=5,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    @property
    def port(self) -> int:
        return self.stack.s3_port

    def request(self) -> None:
        self.client().list_buckets()

    def after_ready(self) -> None:
        client = self.client()
        if self.stack.s3_bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.stack.s3_bucket)


class LagExporter(LocalService):
    """``pixelpipe lag-exporter``: the lag of every pixelpipe consumer group, for Prometheus, whether or not any
    of a group's members is running."""

    name = "lag-exporter"
    start_timeout_s = 60.0

    @property
    def port(self) -> int:
        return self.stack.lag_exporter_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pixelpipe", "lag-exporter"]

    def environment(self) -> dict[str, str]:
        kafka = Kafka(self.stack)
        env = {"PIXELPIPE_KAFKA_BOOTSTRAP": kafka.endpoint, **(kafka.sasl_env() if self.stack.kafka_acls else {})}
        return os.environ | env | {"PIXELPIPE_METRICS_PORT": str(self.port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"}

    def request(self) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as answer:
            answer.read()


class Prometheus(LocalService):
    """Debian's prometheus, scraping the targets listed in ``targets/*.json`` (file service discovery: a test or
    a tool adds a file and Prometheus picks it up) with the repository's alert rules."""

    name = "prometheus"

    def __init__(self, stack: StackSettings, rules: Sequence[Path] | None = None) -> None:
        super().__init__(stack)
        self.rules = list(rules) if rules is not None else ([ALERT_RULES] if ALERT_RULES.exists() else [])
        self.targets_dir = self.dir / "targets"

    @property
    def port(self) -> int:
        return self.stack.prometheus_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        ports = [*scrape_ports(self.stack), self.stack.lag_exporter_port]
        self.add_targets("stack", [f"127.0.0.1:{port}" for port in ports])
        interval = f"{self.stack.prometheus_interval_s:g}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(path) for path in self.rules],
            "scrape_configs": [
                {
                    "job_name": "pixelpipe",
                    "file_sd_configs": [{"files": [str(self.targets_dir / "*.json")], "refresh_interval": "5s"}],
                },
                {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]},
            ],
        }
        # JSON is YAML: no YAML writer needed.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))

    def add_targets(self, name: str, targets: Sequence[str], labels: dict[str, str] | None = None) -> Path:
        """Scrape ``targets`` (host:port) from now on, as ``targets/<name>.json``; returns the file."""
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        path = self.targets_dir / f"{name}.json"
        temporary = path.with_suffix(".tmp")  # written whole, then renamed: Prometheus never reads half a file
        temporary.write_text(json.dumps([{"targets": list(targets), "labels": labels or {}}]))
        temporary.replace(path)
        return path

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        if binary is None:
            raise StackError("prometheus is not installed; run scripts/setup.sh (Debian package)")
        return [
            binary,
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def request(self) -> None:
        with urllib.request.urlopen(f"{self.endpoint}/-/ready", timeout=2) as answer:
            answer.read()


class Gateway(LocalService):
    """``pixelpipe gateway`` on the stack's Kafka and object store, where a model registry exists (the gateway maps
    calls onto the registry's models and refuses to start without one). Its keys file and one key, for user
    ``local``, are made on first start and kept in its directory; ``pixelpipe stack env`` exports the key. Its
    metrics are served on the last of the stack's scrape ports. Optional: skipped without a registry, with
    PIXELPIPE_STACK_GATEWAY_PORT=0, or where its port is taken, so ``up`` never fails for it."""

    name = "gateway"
    start_timeout_s = 120.0

    def __init__(self, stack: StackSettings, registry: Path, clients: Callable[[], dict[str, str]]) -> None:
        super().__init__(stack)
        self.registry = registry.expanduser().resolve()
        self.clients = clients
        self.keys_file = self.dir / "keys.json"
        self.key_file = self.dir / "api-key"

    @property
    def port(self) -> int:
        return self.stack.gateway_port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def skipped(self) -> str:
        if not self.port:
            return "PIXELPIPE_STACK_GATEWAY_PORT is 0"
        if not self.registry.is_file():
            return f"no model registry at {self.registry} (PIXELPIPE_MODEL_REGISTRY; `pixelpipe models init-tiny`)"
        if self.pid() is None and not port_bindable(self.port):
            return f"port {self.port} is taken (PIXELPIPE_STACK_GATEWAY_PORT)"
        return ""

    def api_key(self) -> str | None:
        """The stack's key for the gateway; None before its first start."""
        return self.key_file.read_text().strip() if self.key_file.exists() else None

    def prepare(self) -> None:
        from pixelpipe.gateway.keys import KeyStore

        if self.api_key() is None:
            secret, _ = KeyStore(self.keys_file).create("local", name="pixelpipe stack")
            self.key_file.touch(mode=0o600)
            self.key_file.write_text(secret)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pixelpipe", "gateway"]

    def environment(self) -> dict[str, str]:
        ports = scrape_ports(self.stack)
        return (
            os.environ
            | self.clients()
            | {
                "PIXELPIPE_MODEL_REGISTRY": str(self.registry),
                "PIXELPIPE_GATEWAY_KEYS_FILE": str(self.keys_file),
                "PIXELPIPE_GATEWAY_HOST": "127.0.0.1",
                "PIXELPIPE_GATEWAY_PORT": str(self.port),
                "PIXELPIPE_METRICS_PORT": str(ports[-1] if ports else 0),
                "PIXELPIPE_METRICS_HOST": "127.0.0.1",
            }
        )

    def request(self) -> None:
        call = urllib.request.Request(f"{self.endpoint}/models", headers={"Authorization": f"Bearer {self.api_key()}"})
        with urllib.request.urlopen(call, timeout=2) as answer:
            answer.read()


class LocalStack:
    """The services together, started in order and stopped in reverse."""

    def __init__(self, stack: StackSettings, registry: Path | None = None) -> None:
        self.stack = stack
        self.kafka = Kafka(stack)
        self.prometheus = Prometheus(stack)
        models = section_from_env(ModelSettings, os.environ)
        self.gateway = Gateway(stack, registry or Path(models.registry), self._servers_env)
        self.services: list[LocalService] = [
            self.kafka,
            ClickHouse(stack),
            ObjectStorage(stack),
            LagExporter(stack),
            self.prometheus,
            self.gateway,
        ]

    def up(self) -> list[ServiceStatus]:
        for service in self.services:
            if not service.skipped():
                service.start()
        return self.status()

    def down(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def status(self) -> list[ServiceStatus]:
        return [service.status() for service in self.services]

    def moderation_stamp_key(self) -> str:
        """This stack's moderation stamp key, made on first use and kept in its directory, so the workers and the
        demo it serves share one."""
        path = Path(self.stack.dir).expanduser().resolve() / "moderation-stamp.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(32))
        return path.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """The PIXELPIPE_* variables that point every pixelpipe client at this stack (with ACLs, as the super
        user: the tools create topics and grant roles), and at its gateway once that was started."""
        return self._servers_env() | self._gateway_client_env()

    def _servers_env(self) -> dict[str, str]:
        """The variables that point a process at the stack's servers (the gateway's own environment starts here)."""
        return {
            "PIXELPIPE_KAFKA_BOOTSTRAP": self.kafka.endpoint,
            **(self.kafka.sasl_env() if self.stack.kafka_acls else {}),
            "PIXELPIPE_CLICKHOUSE_URL": self.services[1].endpoint,
            "PIXELPIPE_OBJECT_STORE_URL": f"s3://{self.stack.s3_bucket}/images",
            "PIXELPIPE_S3_ENDPOINT_URL": self.services[2].endpoint,
            "PIXELPIPE_S3_REGION": LOCAL_S3_REGION,
            "PIXELPIPE_S3_ACCESS_KEY_ID": LOCAL_S3_ACCESS_KEY,
            "PIXELPIPE_S3_SECRET_ACCESS_KEY": LOCAL_S3_SECRET_KEY,
            "PIXELPIPE_MODERATION_STAMP_KEY": self.moderation_stamp_key(),
            "PIXELPIPE_PROMETHEUS_URL": self.prometheus.endpoint,
        }

    def _gateway_client_env(self) -> dict[str, str]:
        """The gateway's URL and key (and its keys file, for `pixelpipe keys create`), once it was started."""
        key = self.gateway.api_key()
        if key is None:
            return {}
        return {
            "PIXELPIPE_GATEWAY_URL": self.gateway.endpoint,
            "PIXELPIPE_GATEWAY_API_KEY": key,
            "PIXELPIPE_GATEWAY_KEYS_FILE": str(self.gateway.keys_file),
        }


@contextlib.contextmanager
def stack_unless_kafka_answers(
    settings: Settings, stack: StackSettings, echo: Callable[[str], None], keep: bool = False
) -> Iterator[Settings]:
    """Start the local stack for the block when no Kafka answers at the settings' bootstrap (its first server),
    and stop it afterwards unless ``keep``; a Kafka that already answers is used as it is and left running. Yields
    ``settings``, with the stack's moderation stamp key where they name none, for the workers the block starts.
    The stack's gateway is left out: the tools that use this start their own."""
    local = LocalStack(dataclasses.replace(stack, gateway_port=0))
    if not settings.moderation.stamp_key:
        settings = settings.updated(moderation_stamp_key=local.moderation_stamp_key())
    host, _, port = settings.kafka.bootstrap.split(",")[0].rpartition(":")
    if port_open(int(port), host):
        yield settings
        return
    echo(f"starting the local stack in {stack.dir} ...")
    local.up()
    try:
        yield settings
    finally:
        if not keep:
            local.down()
