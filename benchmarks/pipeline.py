"""Requests/s through every stage of one worker process, and the latency it adds at half that rate.

    python benchmarks/pipeline.py [--requests 20000] [--nudenet-requests 300] [--latency-seconds 10] [--side 64]
    python benchmarks/pipeline.py --baseline [REF] [--runs 3] [--requests 20000] [--latency-rate 100]

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards) with the
null model (a registry written here; no simulated time) and objects on the local filesystem. One `pixelpipe worker`
process runs every stage (moderation, generate, edit); each detector gets its own worker and fresh topics:

  saturation  N text-to-image requests are published before the worker starts, so the backlog measures the worker
              alone; the rate runs from the first terminal result on the results topic to the last.
  latency     the same worker, idle again, gets requests published with the producer SDK at half the saturated
              rate (or --latency-rate); added latency is a result's arrival at this process minus its request's
              publish time.

Both run with nudenet's image detector and with the null detector (PIXELPIPE_IMAGE_DETECTOR=null, which finds
nothing and costs nothing), so the null row measures the pipeline and the detector's time is printed apart: its
milliseconds per request from the results' `output_moderation` timings, and their share of the saturated wall time.
Kafka, this client and the worker share the machine's cores: the load average is printed with the figures.

`--metrics off,on` (the default) runs each detector's worker twice in turn, without and with its metrics
(PIXELPIPE_METRICS_PORT set, so the stages observe every event, the lag monitor runs, and this process scrapes
/metrics every `--scrape-interval` seconds, 1 s by default: five times the local Prometheus' rate), and prints the
throughput the metrics cost (medians, when a mode is repeated: `--metrics off,on,off,on`). Rates move by more than
1 % from run to run, so each worker with metrics is also scraped back to back once idle, and the CPU one scrape
costs it is printed as a share of its CPU at saturation, at this run's and Prometheus' intervals.

`--baseline [REF]` compares this checkout's worker with REF's (e6ab4f0 by default, the hand-written librdkafka
consumer): REF is checked out in a temporary git worktree and installed without dependencies into a temporary folder
that the baseline's workers get as PYTHONPATH (checked: every pixelpipe module they import comes from there). Null
detector, metrics off; the two workers run alternately, `--runs` times each (3 by default), the latency phase at a
fixed 100 req/s (`--latency-rate`) so both see the same load; the table gives the medians of saturated requests/s,
the worker's CPU per request at saturation, the added latency's p50 and p99, and their ratio current/baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from tqdm import tqdm

from pixelpipe.core.codec import Codec, codec_from_settings
from pixelpipe.core.events import ImageResult
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import assign_from_start, ensure_topics
from pixelpipe.producers import Publisher, new_request
from pixelpipe.tools.processes import WorkerProcess
from pixelpipe.tools.stack import StackSettings, free_port, stack_unless_kafka_answers

STAGES = ["moderation", "generate", "edit"]
PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in fresh snow", "a bowl of ramen, studio lighting")
# Enough users that none reaches the per-user rate limit (600 a minute) in a run.
USERS = 2000
STARTUP_TIMEOUT_S = 180.0
PROMETHEUS_INTERVAL_S = 5.0  # the local stack's and docker-compose's scrape interval
PIPELINE_TOPICS = (
    *("requests", "generate", "edit", "generate_long", "edit_long"),
    *("results", "metrics", "dead_letter", "cancellations", "model_pools", "experiments", "rollouts"),
)
REPO = Path(__file__).resolve().parents[1]
# Prints the file of every pixelpipe module a worker imports (its CLI and its stages).
WHERE_FROM = """
import sys, pixelpipe.cli, pixelpipe.processors.app
print(*sorted({str(m.__file__) for n, m in sys.modules.items() if n.split(".")[0] == "pixelpipe"}), sep="\\n")
"""
BASELINE = "e6ab4f0"  # the last commit of the hand-written librdkafka consumer, before the Faust agents came back


@dataclass
class Arrivals:
    """Results read off the results topic as they come: when each request's first result arrived, and its bytes."""

    at_s: dict[str, float]
    values: dict[str, bytes]
    timestamps_ms: dict[str, int]  # the record's Kafka timestamp: when its stage produced it (or the broker appended)
    duplicates: int = 0


class ResultWatcher:
    """Reads the results topic (or ``topic``, a reply topic) from its start on a thread, noting each result's
    arrival by its key (the request id), without decoding during the run, so the client takes as little CPU from
    the worker as it can."""

    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        self._consumer = Consumer(
            settings.kafka.client_config()
            | {"group.id": f"bench-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False, "fetch.wait.max.ms": 5}
        )
        topic = topic or settings.topics.results
        assign_from_start(self._consumer, topic)
        self.arrivals = Arrivals({}, {}, {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="results", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        arrivals = self.arrivals
        while not self._stop.is_set():
            # poll returns as soon as one result is there (a batch consume would wait to fill or time out, which
            # the latencies would include), then whatever else came is taken at once.
            first = self._consumer.poll(0.1)
            now = time.time()
            if first is None:
                continue
            for message in [first, *self._consumer.consume(1000, timeout=0)]:
                if message.error():
                    continue
                key = message.key().decode()
                if key in arrivals.at_s:
                    arrivals.duplicates += 1
                    continue
                arrivals.at_s[key] = now
                arrivals.values[key] = message.value()
                arrivals.timestamps_ms[key] = message.timestamp()[1]

    def wait_for(self, request_ids: list[str], label: str, timeout_s: float, at_least: int | None = None) -> bool:
        """Show a progress bar until every id (or ``at_least`` of them) has a result; False when time ran out."""
        deadline = time.monotonic() + timeout_s
        wanted = len(request_ids) if at_least is None else at_least
        with tqdm(total=len(request_ids), unit="req", desc=label, leave=False, mininterval=1.0) as bar:
            while time.monotonic() < deadline:
                done = sum(1 for r in request_ids if r in self.arrivals.at_s)
                bar.update(done - bar.n)
                if done >= wanted:
                    return True
                time.sleep(0.25 if at_least is None else 0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


class CpuMeter:
    """CPU time the worker process used, and how busy the machine's cores were, since the meter was made: figures
    that say more than a rate alone while other jobs share the cores (Linux /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._worker_s, self._busy, self._total = self._read()

    def _read(self) -> tuple[float, int, int]:
        # /proc/PID/stat: utime and stime are fields 14 and 15 (in clock ticks), counted after the ")" of the name.
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        worker_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        # /proc/stat's first line: user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return worker_s, sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    def reading(self) -> tuple[float, float]:
        """The worker's CPU seconds and the share of all cores that were busy, since the start."""
        worker_s, busy, total = self._read()
        return worker_s - self._worker_s, (busy - self._busy) / max(1, total - self._total)


@dataclass
class Phase:
    requests: int
    rate: float  # requests/s: saturated, or as published
    detector_ms: float  # the image detector's mean time per request
    detector_share: float  # of the phase's wall time
    worker_cpu_ms: float  # the worker process's CPU time per request
    machine_busy: float  # share of all cores busy during the phase (worker, Kafka, this client, other jobs)
    latencies_ms: list[float]
    statuses: dict[str, int]
    hops_ms: dict[str, list[float]]  # where each request's latency went, hop by hop (see HOPS)


# The hops of a text-to-image request's latency, told apart by the Kafka timestamps of its generate event and its
# result and by the result's own timings (the render stage's queue wait).
HOPS = (
    "moderation",  # publish to the generate event: the moderation stage's fetch, take window, checks and send
    "render queue",  # the generate event to its render starting: fetch, take window, waiting for the model
    "render+store",  # the render's start to the result: model, encoding, output moderation, store, send
    "delivery",  # the result's timestamp to its arrival at this process
)


def encoded_requests(codec: Codec, count: int, side: int, models: Sequence[str] = ("null",)) -> list[tuple[str, bytes]]:
    """Text-to-image requests, encoded ahead so publishing costs the client little; request ``i`` asks for
    ``models[i % len(models)]`` (the null model by default)."""
    encoded = []
    for i in range(count):
        request = new_request(
            prompt=PROMPTS[i % len(PROMPTS)],
            model=models[i % len(models)],
            user_id=f"user-{i % USERS:04d}",
            width=side,
            height=side,
        )
        encoded.append((request.request_id, codec.encode(request)))
    return encoded


def publish(
    publisher: Publisher,
    requests: list[tuple[str, bytes]],
    rate: float | None,
    label: str,
    poisson: random.Random | None = None,
) -> list[float]:
    """Publish at ``rate`` requests/s (None: as fast as the SDK goes), evenly spaced, or as a Poisson process whose
    gaps ``poisson`` draws; returns each request's publish time."""
    published_s = []
    started = time.time()
    due_s = 0.0  # since ``started``
    for request_id, value in tqdm(requests, unit="req", desc=label, leave=False, mininterval=1.0):
        if rate is not None:
            pause = started + due_s - time.time()
            if pause > 0:
                time.sleep(pause)
            due_s += poisson.expovariate(rate) if poisson is not None else 1 / rate
        published_s.append(time.time())
        publisher.publish_encoded(request_id.encode(), value)
    publisher.flush()
    return published_s


def summarise(
    codec: Codec,
    arrivals: Arrivals,
    request_ids: list[str],
    meter: CpuMeter,
    published_s: list[float] | None,
    rate: float | None,
    forwarded: Arrivals | None = None,
) -> Phase:
    """The phase's figures from its results: statuses, the detector's time and the rate or the latencies."""
    worker_cpu_s, machine_busy = meter.reading()
    results = [codec.decode_as(ImageResult, arrivals.values[r]) for r in request_ids]
    statuses: dict[str, int] = {}
    for result in results:
        label = result.status if result.status == "SUCCEEDED" else f"{result.status}:{result.error_code}"
        statuses[label] = statuses.get(label, 0) + 1
    arrived = [arrivals.at_s[r] for r in request_ids]
    wall_s = max(arrived) - min(arrived)
    detector_ms = sum(r.timings_ms.get("output_moderation", 0.0) for r in results)
    latencies = [] if published_s is None else [(a - p) * 1000 for a, p in zip(arrived, published_s, strict=True)]
    hops: dict[str, list[float]] = {hop: [] for hop in HOPS}
    if published_s is not None and forwarded is not None:
        for request_id, result, sent_s in zip(request_ids, results, published_s, strict=True):
            generate_ms, result_ms = forwarded.timestamps_ms.get(request_id), arrivals.timestamps_ms[request_id]
            if generate_ms is None:  # refused by moderation: no generate event
                continue
            queue_ms = result.timings_ms.get("queue", 0.0)
            spans = (generate_ms - sent_s * 1000, queue_ms, result_ms - generate_ms - queue_ms)
            for hop, span in zip(HOPS, (*spans, arrivals.at_s[request_id] * 1000 - result_ms), strict=True):
                hops[hop].append(span)
    return Phase(
        requests=len(request_ids),
        rate=rate if rate is not None else (len(request_ids) - 1) / wall_s,
        detector_ms=detector_ms / len(results),
        detector_share=detector_ms / 1000 / wall_s if wall_s else 0.0,
        worker_cpu_ms=worker_cpu_s * 1000 / len(request_ids),
        machine_busy=machine_busy,
        latencies_ms=latencies,
        statuses=statuses,
        hops_ms=hops,
    )


class Scraper:
    """GETs a worker's /metrics every ``interval_s`` on a thread, as Prometheus would, and counts the scrapes."""

    def __init__(self, port: int, interval_s: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.scrapes = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            # Not serving yet (the worker is starting): try again next time.
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url, timeout=5) as answer:
                self.bytes += len(answer.read())
                self.scrapes += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ScrapeCost:
    cpu_ms: float  # the worker's CPU time per scrape, its idle CPU taken out
    bytes: int  # one /metrics answer


def scrape_cost(pid: int, port: int, scrapes: int = 300, idle_s: float = 3.0) -> ScrapeCost:
    """What serving one scrape costs the worker, measured on the worker itself while it is idle: its CPU over
    ``scrapes`` back-to-back GETs of /metrics, less what it spends over the same time with none (fetches, timers).
    A rate compared on and off moves by more than 1 % from run to run; this is the scrape alone."""
    url = f"http://127.0.0.1:{port}/metrics"
    meter = CpuMeter(pid)
    time.sleep(idle_s)
    idle_cpu_per_s = meter.reading()[0] / idle_s
    meter = CpuMeter(pid)
    started = time.perf_counter()
    size = 0
    for _ in tqdm(range(scrapes), unit="scrape", desc="scrape cost", leave=False, mininterval=1.0):
        with urllib.request.urlopen(url, timeout=5) as answer:
            size = len(answer.read())
    elapsed_s = time.perf_counter() - started
    cpu_s = meter.reading()[0] - idle_cpu_per_s * elapsed_s
    return ScrapeCost(cpu_ms=max(0.0, cpu_s) * 1000 / scrapes, bytes=size)


def observation_cost_us(rounds: int = 20_000) -> float:
    """Microseconds of metrics a text-to-image request costs a worker, measured in this process: what the stages
    observe for it (the MODERATION, GENERATE and OUTPUT_MODERATION work, one result with an image, its share of a
    take's events-in), folded into counts as a scrape does."""
    from pixelpipe.core.events import StoredImage
    from pixelpipe.processors.outcomes import Outcome, StageWork
    from pixelpipe.processors.telemetry import TELEMETRY

    image = StoredImage(uri="file:///x/0.png", sha256="0" * 64, width=64, height=64, format="PNG", bytes=100)
    succeeded = Outcome("SUCCEEDED", images=[image])
    works = [
        StageWork("MODERATION", "OK", 12.0, 0.4, "cpu", 0.0004, 64),
        StageWork("GENERATE", "OK", 30.0, 1.0, "cpu", 0.001, 8),
        StageWork("OUTPUT_MODERATION", "OK", 0.0, 0.0, "cpu", 0.0, 1),
    ]
    was = TELEMETRY.enabled
    TELEMETRY.enable()
    started = time.perf_counter()
    for i in range(rounds):
        if i % 32 == 0:  # once a take (32 requests, the render stages' take; moderation takes up to 256)
            TELEMETRY.events_in("moderation", 32, pool=None)
            TELEMETRY.events_in("generate", 32, pool="default")
        for work in works:
            TELEMETRY.work(work, 1e-7, pool="default")
        TELEMETRY.result(succeeded, "GENERATE", pool="default")
    TELEMETRY.fold()
    elapsed = time.perf_counter() - started
    TELEMETRY.enable(was)
    return elapsed / rounds * 1e6


def with_own_topics(base: Settings, suffix: str) -> Settings:
    """``base`` with every topic of the pipeline and the consumer group the run's own, named with ``suffix`` (unique
    to the run), so that deleting them afterwards (``delete_own_topics``) touches nothing else on a shared Kafka."""
    return base.updated(
        **{f"topic_{name}": f"bench.{name}.{suffix}" for name in PIPELINE_TOPICS}, consumer_group=f"bench-{suffix}"
    )


def delete_own_topics(settings: Settings, suffix: str) -> None:
    """Delete the topics named with ``suffix``: those of ``with_own_topics``, the pools' render topics made from
    them, and the workers' own (Faust's changelogs), named after the consumer group."""
    admin = AdminClient(settings.kafka.client_config())
    own = [t for t in admin.list_topics(timeout=10).topics if suffix in t]
    if not own:
        return
    # Waited for: the broker would not delete them if this process ended first.
    for deleted in admin.delete_topics(own).values():
        deleted.result(timeout=30)


def run_detector(
    base: Settings,
    workdir: Path,
    detector: str,
    requests: int,
    latency_s: float,
    side: int,
    profile_dir: Path | None,
    echo: Callable[..., None],
    metrics: bool = False,
    scrape_interval_s: float = 1.0,
    latency_rate: float | None = None,
    label: str | None = None,
    worker_env: Mapping[str, str] | None = None,
) -> tuple[Phase, Phase, ScrapeCost | None] | None:
    """One worker's saturation and latency phases on fresh topics; the latency phase publishes at ``latency_rate``
    requests/s (None: half the saturated rate). ``label`` names the run in progress bars and the worker's log (the
    detector by default); ``worker_env`` is added to the worker's environment (--baseline's PYTHONPATH)."""
    label = label or detector
    suffix = f"{label}-{uuid.uuid4().hex[:8]}"
    settings = with_own_topics(base, suffix).updated(image_detector=detector)
    ensure_topics(settings.kafka, settings.topics)
    codec = codec_from_settings(settings.kafka)
    watcher = ResultWatcher(settings)
    forwarded = ResultWatcher(settings, settings.topics.generate)
    log_path = workdir / f"worker-{label}{'-metrics' if metrics else ''}.log"
    port = free_port() if metrics else 0
    env = {"PIXELPIPE_METRICS_PORT": str(port), "PIXELPIPE_METRICS_HOST": "127.0.0.1", **(worker_env or {})}
    scraper = Scraper(port, scrape_interval_s) if metrics else None
    try:
        with Publisher(settings, codec=codec) as publisher:
            backlog = encoded_requests(codec, requests, side)
            publish(publisher, backlog, None, f"{label}: publishing the backlog")
            with WorkerProcess(settings, STAGES, log_path, env) as worker:
                ids = [r for r, _ in backlog]
                phase = f"{label}: saturation"
                started = watcher.wait_for(ids, phase, STARTUP_TIMEOUT_S, at_least=1)
                # Measured from the first result on: the steady state, not the worker's start.
                meter = CpuMeter(worker.process.pid)
                with profiled(worker.process.pid, profile_dir and profile_dir / f"worker-{label}.txt", echo):
                    done = started and watcher.wait_for(ids, phase, STARTUP_TIMEOUT_S + requests / 20)
                if not done:
                    echo(f"{label}: results missing; worker log {log_path}:\n{worker.log_tail()}")
                    return None
                saturation = summarise(codec, watcher.arrivals, ids, meter, None, None)
                rate = latency_rate or saturation.rate / 2
                paced = encoded_requests(codec, max(1, int(rate * latency_s)), side)
                meter = CpuMeter(worker.process.pid)
                with profiled(worker.process.pid, profile_dir and profile_dir / f"worker-{label}-paced.txt", echo):
                    published_s = publish(publisher, paced, rate, f"{label}: {rate:,.0f} req/s")
                ids = [r for r, _ in paced]
                if not watcher.wait_for(ids, f"{label}: latency", 60 + latency_s):
                    echo(f"{label}: results missing; worker log {log_path}:\n{worker.log_tail()}")
                    return None
                latency = summarise(codec, watcher.arrivals, ids, meter, published_s, rate, forwarded.arrivals)
                scraped = scrape_cost(worker.process.pid, port) if metrics else None
    finally:
        watcher.close()
        forwarded.close()
        if scraper is not None:
            scraper.close()
            size = scraper.bytes / max(1, scraper.scrapes)
            echo(f"{label}: metrics scraped {scraper.scrapes} times ({size:,.0f} B each)")
        delete_own_topics(settings, suffix)
    if watcher.arrivals.duplicates:
        echo(f"{label}: {watcher.arrivals.duplicates} duplicate results (redeliveries)")
    return saturation, latency, scraped


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, echo: Callable[..., None]) -> Iterator[None]:
    """Sample ``pid`` with py-spy (when ``out`` is given) for the block: collapsed stacks of every thread, on-CPU
    only, without pausing the worker."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking"]
    spy = subprocess.Popen([*command, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(60)
        echo(f"profile of the worker: {out}")


@contextlib.contextmanager
def baseline_worker_env(ref: str, echo: Callable[..., None]) -> Iterator[dict[str, str]]:
    """The environment that makes a `pixelpipe worker` run ``ref``'s code: a git worktree of ``ref`` in a temporary
    folder, installed (no dependencies, this venv's) into a folder of its own that PYTHONPATH puts before the
    editable install of this checkout. Checked in a child started as the workers are (interpreter, environment and
    working directory): it must import every pixelpipe package from there."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        tree, site = Path(tmp) / "tree", Path(tmp) / "site"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(tree), ref], check=True, capture_output=True)
        try:
            sha = subprocess.run([*git, "rev-parse", "--short", ref], check=True, capture_output=True, text=True)
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile"]
            subprocess.run([*pip, "--target", str(site), str(tree)], check=True, capture_output=True)
            # Compiled here, once, rather than by each worker at its start.
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(site / "pixelpipe")], check=True)
            env = {"PYTHONPATH": str(site)}
            imported = subprocess.run(
                [sys.executable, "-c", WHERE_FROM],
                env=os.environ | env,
                cwd=tmp,  # as the workers' folder, which holds no pixelpipe either
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            strays = [f for f in imported if not f.startswith(str(site))]
            if strays:
                raise SystemExit(f"the baseline's worker would import pixelpipe modules from elsewhere: {strays}")
            echo(f"baseline {ref} ({sha.stdout.strip()}): pixelpipe from {site}")
            yield env
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="backlog for the null detector")
    parser.add_argument("--nudenet-requests", type=int, default=300, help="backlog for nudenet (about 30 ms each)")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="how long the latency phase publishes")
    parser.add_argument("--side", type=int, default=64, help="width and height of the requested images")
    parser.add_argument("--detectors", default="null,nudenet", help="comma separated: null, nudenet")
    parser.add_argument(
        "--max-wait-ms",
        type=int,
        default=5,
        help="PIXELPIPE_MAX_WAIT_MS for the render stages (their default, 50, lets a diffusion model fill a batch; "
        "the null model gains nothing from waiting)",
    )
    parser.add_argument(
        "--metrics", default="off,on", help="comma separated, run in turn per detector: off (none served), on"
    )
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes")
    parser.add_argument(
        "--latency-rate", type=float, help="requests/s of the latency phase (default: half the saturated rate)"
    )
    parser.add_argument(
        "--baseline",
        nargs="?",
        const=BASELINE,
        metavar="REF",
        help=f"compare this checkout's worker with REF's ({BASELINE} when no REF is given): null detector, metrics"
        " off, --runs alternating runs each, latency at --latency-rate (100 req/s by default)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each worker with --baseline")
    parser.add_argument("--objects", type=Path, help="folder for the stored images (default: a temporary one)")
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles of the worker, saturated and paced")
    args = parser.parse_args()
    if args.baseline and args.latency_rate is None:
        args.latency_rate = 100.0
    # Before changing folder:
    profile_dir = args.profile.resolve() if args.profile else None
    objects_dir = args.objects.resolve() if args.objects else None
    base = Settings.from_env()
    echo = print
    rows: list[tuple[str, Phase, Phase]] = []
    scrapes: list[ScrapeCost] = []
    load_before = os.getloadavg()
    with (
        stack_unless_kafka_answers(base, section_from_env(StackSettings, os.environ), echo) as base,
        tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp,
        baseline_worker_env(args.baseline, echo) if args.baseline else contextlib.nullcontext({}) as baseline_env,
    ):
        workdir = Path(tmp)
        registry = workdir / "registry.json"
        registry.write_text(json.dumps({"null": {"kind": "null"}}))
        base = base.updated(
            model_registry=str(registry),
            object_store_url=f"file://{objects_dir or workdir / 'objects'}",
            experiments_file=str(workdir / "no-experiments.json"),
            max_wait_ms=args.max_wait_ms,
        )
        # The workers inherit the temporary folder as their working directory, for the relative defaults (./data).
        os.chdir(workdir)
        echo(
            f"one worker process ({', '.join(STAGES)}), null model, {args.side}x{args.side} images, render take window"
            f" {args.max_wait_ms} ms, objects in {base.objects.url}, Kafka at {base.kafka.bootstrap},"
            f" {os.cpu_count()} cores, load average before {load_before[0]:.2f}"
        )
        # (label, detector, metrics, the worker's extra environment), in the order they run.
        plan: list[tuple[str, str, bool, dict[str, str]]]
        if args.baseline:  # alternating, so that a change in the machine's load falls on both alike
            sides = (("baseline", baseline_env), ("current", {}))
            plan = [(label, "null", False, env) for _ in range(args.runs) for label, env in sides]
        else:
            plan = [
                (detector if mode == "off" else f"{detector}+m", detector, mode == "on", {})
                for detector in args.detectors.split(",")
                for mode in args.metrics.split(",")
            ]
        for label, detector, metrics, env in plan:
            phases = run_detector(
                base,
                workdir,
                detector,
                args.requests if detector == "null" else args.nudenet_requests,
                args.latency_seconds,
                args.side,
                profile_dir,
                echo,
                metrics=metrics,
                scrape_interval_s=args.scrape_interval,
                latency_rate=args.latency_rate,
                label=label,
                worker_env=env,
            )
            if phases is None:
                raise SystemExit(1)
            saturation, latency, scraped = phases
            rows.append((label, saturation, latency))
            if scraped is not None:
                scrapes.append(scraped)
            p99 = quantile(latency.latencies_ms, 0.99)
            echo(
                f"{label}: {saturation.rate:,.0f} req/s saturated; p99 {p99:.1f} ms at {latency.rate:,.0f}"
                f" req/s (load average {os.getloadavg()[0]:.2f})"
            )
    print_table(rows, echo)
    if args.baseline:
        print_comparison(rows, args.baseline, echo)
        return
    cost_us = observation_cost_us()
    cpu_ms = statistics.mean(saturation.worker_cpu_ms for label, saturation, _ in rows if not label.endswith("+m"))
    echo(
        f"metrics observed per request: {cost_us:.1f} us in this process, {cost_us / 10 / cpu_ms:.2f} % of the"
        f" worker's {cpu_ms:.2f} ms of CPU per request without metrics"
    )
    report_metrics_cost(rows, scrapes, cpu_ms, args.scrape_interval, echo)


def report_metrics_cost(
    rows: list[tuple[str, Phase, Phase]],
    scrapes: list[ScrapeCost],
    cpu_ms: float,
    scrape_interval_s: float,
    echo: Callable[..., None],
) -> None:
    """Metrics on against off (the median of each detector's runs, which ``--metrics off,on,off,on`` repeats), and
    the scrape's own cost as a share of the worker's CPU at saturation, at this run's and Prometheus' intervals."""
    by_label: dict[str, list[Phase]] = {}
    for label, saturation, _ in rows:
        by_label.setdefault(label, []).append(saturation)
    for label, on_runs in by_label.items():
        off_runs = by_label.get(label.removesuffix("+m"))
        if not label.endswith("+m") or off_runs is None:
            continue
        on_rate, off_rate = (statistics.median(p.rate for p in runs) for runs in (on_runs, off_runs))
        on_cpu, off_cpu = (statistics.median(p.worker_cpu_ms for p in runs) for runs in (on_runs, off_runs))
        echo(
            f"{label[:-2]}: metrics on {on_rate:,.0f} req/s vs off {off_rate:,.0f} req/s"
            f" ({on_rate / off_rate - 1:+.1%}, medians of {_rates(on_runs)} and {_rates(off_runs)}); worker CPU"
            f" {on_cpu:.3f} vs {off_cpu:.3f} ms/req ({on_cpu / off_cpu - 1:+.1%})"
        )
    # The worker's CPU per second at saturation: ``cpu_ms`` per request times the requests it makes a second.
    busy_ms_per_s = cpu_ms * statistics.median(p.rate for label, p, _ in rows if not label.endswith("+m"))
    for scrape in scrapes:
        shares = ", ".join(
            f"{scrape.cpu_ms / interval / busy_ms_per_s:.3%} every {interval:g} s"
            for interval in dict.fromkeys((scrape_interval_s, PROMETHEUS_INTERVAL_S))
        )
        echo(
            f"one scrape ({scrape.bytes:,} B) costs the worker {scrape.cpu_ms:.2f} ms of CPU: of its CPU at saturation"
            f" ({busy_ms_per_s:,.0f} ms a second) {shares}"
        )


def print_comparison(rows: list[tuple[str, Phase, Phase]], ref: str, echo: Callable[..., None]) -> None:
    """The current worker against the baseline's: the median of each one's runs, and their ratio."""
    figures: list[tuple[str, Callable[[Phase, Phase], float], str]] = [
        ("saturated req/s", lambda saturation, _: saturation.rate, ",.0f"),
        ("worker CPU ms/req, saturated", lambda saturation, _: saturation.worker_cpu_ms, ".3f"),
        ("added latency p50 ms", lambda _, latency: quantile(latency.latencies_ms, 0.5), ".1f"),
        ("added latency p99 ms", lambda _, latency: quantile(latency.latencies_ms, 0.99), ".1f"),
    ]
    runs = {side: [(s, lat) for label, s, lat in rows if label == side] for side in ("baseline", "current")}
    paced = ", ".join(f"{statistics.median(lat.rate for _, lat in r):,.0f}" for r in runs.values())
    echo("")
    echo(
        f"current checkout against {ref}: medians of {len(runs['baseline'])} and {len(runs['current'])} alternating"
        f" runs (null model, null detector; latency at {paced} req/s); each run's figure on the right"
    )
    echo(f"  {'figure':<30} {'baseline':>10} {'current':>10} {'current/baseline':>17}   runs: baseline | current")
    for name, figure, spec in figures:
        values = {side: [figure(s, lat) for s, lat in r] for side, r in runs.items()}
        base, current = (statistics.median(v) for v in values.values())
        each = " | ".join("/".join(f"{v:{spec}}" for v in side) for side in values.values())
        echo(f"  {name:<30} {base:>10{spec}} {current:>10{spec}} {current / base:>17.2f}   {each}")


def _rates(runs: list[Phase]) -> str:
    return "/".join(f"{p.rate:,.0f}" for p in runs)


def print_table(rows: list[tuple[str, Phase, Phase]], echo: Callable[..., None]) -> None:
    echo("")
    echo("saturation (backlog published before the worker started):")
    echo("  detector  requests     req/s  detector ms/req  detector share  worker CPU ms/req  cores busy")
    for detector, phase, _ in rows:
        echo(
            f"  {detector:<8} {phase.requests:>9} {phase.rate:>9,.0f} {phase.detector_ms:>16.2f}"
            f" {phase.detector_share:>15.0%} {phase.worker_cpu_ms:>18.2f} {phase.machine_busy:>11.0%}"
        )
    echo("added latency at the paced rate (publish to the result's arrival here):")
    echo("  detector  requests     req/s   p50 ms   p99 ms   max ms  detector ms/req  worker CPU ms/req  cores busy")
    for detector, _, phase in rows:
        lat = phase.latencies_ms
        echo(
            f"  {detector:<8} {phase.requests:>9} {phase.rate:>9,.0f} {quantile(lat, 0.5):>8.1f}"
            f" {quantile(lat, 0.99):>8.1f} {max(lat):>8.1f} {phase.detector_ms:>16.2f} {phase.worker_cpu_ms:>18.2f}"
            f" {phase.machine_busy:>11.0%}"
        )
    echo("where the latency goes at the paced rate, p50 / p99 ms (Kafka timestamps have 1 ms steps):")
    echo("  detector " + "".join(f"{hop:>18}" for hop in HOPS))
    for detector, _, phase in rows:
        spans = (phase.hops_ms[hop] for hop in HOPS)
        echo(
            f"  {detector:<8} "
            + "".join(
                f"{f'{quantile(s, 0.5):.1f} / {quantile(s, 0.99):.1f}':>18}" if len(s) > 1 else f"{'-':>18}"
                for s in spans
            )
        )
    for detector, saturation, latency in rows:
        statuses = Counter(saturation.statuses) + Counter(latency.statuses)
        echo(f"{detector}: results {dict(statuses)}")
    echo("target (null model, null detector): >= 2,000 req/s saturated; p99 <= 50 ms at half that rate")
    echo(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
