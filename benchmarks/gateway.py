"""Calls/s and the latency the gateway adds to a call over publishing straight to Kafka, and 5,000 calls waiting at
once.

    python benchmarks/gateway.py [--rate 150] [--seconds 20] [--concurrent 5000] [--side 64]

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards) with the
null model (a registry written here) and objects on the local filesystem. One `pixelpipe worker` process runs every
stage and one `pixelpipe gateway` process serves a key made here with the keys module; fresh topics per run. The
phases, in this order and at the same rate, so their ratios are measured in one run on the same loaded cores:

  direct      ImageRequests (INTERACTIVE, a deadline and a reply topic, as the gateway makes them) published with
              the producer SDK at --rate for --seconds; latency is publish to the result's arrival on the reply
              topic, read here.
  gateway     the same requests as OpenAI calls to the gateway (HTTP/1.1 on asyncio streams, one task per call,
              paced like the direct phase); latency is the call's start to the answer's last byte. The gateway's
              own time is its `server-timing` header's (the checks and the answer; publishing and waiting are the
              pipeline's); what is neither is HTTP and this client.
  gateway+idem  the same with an `Idempotency-Key` on every call: the gateway writes a receipt before publishing.
  concurrent  --concurrent calls opened at once; they wait while the pipeline drains them. Reports errors (any
              answer but 200, or none), the time until the last answer, the gateway's peak RSS and the most file
              descriptors it held open.

Added latency is the gateway's p50 (p99) minus the direct phase's p50 (p99). The issue's goal is <= 10 ms p99 added
at 500 calls/s on 2 cores; with the null model one worker saturates at 600 to 950 requests/s here, and the worker,
Kafka, the gateway and this client share the 2 cores, so 500/s exceeds what the pipeline behind the gateway
sustains on this machine (requests would queue, and the added latency would measure the queue). The default rate,
150/s, is what the whole arrangement sustains with room to spare; --rate 500 runs the goal's rate where more cores
allow. The load average is printed with the figures. The gateway sheds load (503) past PIXELPIPE_GATEWAY_MAX_LAG
requests waiting for moderation; the concurrent phase queues --concurrent at once by design, so this benchmark
raises that bound above it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka.admin import AdminClient
from pipeline import PROMPTS, STAGES, STARTUP_TIMEOUT_S, USERS, ResultWatcher, profiled, quantile
from tqdm import tqdm

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageRequest, ImageResult
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.gateway.cli import raise_open_files_limit
from pixelpipe.gateway.keys import KeyStore
from pixelpipe.producers import Publisher, new_request
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from pixelpipe.tools.stack import StackSettings, free_port, stack_unless_kafka_answers

WARM_UP_CALLS = 50
CALL_TIMEOUT_S = 180.0
KEEP_ALIVE_S = 4.0  # uvicorn closes a connection idle for 5 s: reuse one only well before that


@dataclass
class Phase:
    label: str
    calls: int
    rate: float  # calls/s: answered calls from the first call's start to the last answer
    latencies_ms: list[float]
    gateway_ms: list[float] = field(default_factory=list)  # the gateway's own time per call (server-timing)
    outside_ms: list[float] = field(default_factory=list)  # neither the gateway's nor the pipeline's: HTTP, client
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", another status, or the client's exception


def direct_requests(settings: Settings, reply_topic: str, count: int, side: int) -> list[ImageRequest]:
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.gateway.timeout_s)
    return [
        new_request(
            prompt=PROMPTS[i % len(PROMPTS)],
            model="null",
            user_id=f"user-{i % USERS:04d}",
            width=side,
            height=side,
            priority="INTERACTIVE",
            deadline=deadline,
            reply_topic=reply_topic,
        )
        for i in range(count)
    ]


def run_direct(
    settings: Settings,
    reply_topic: str,
    watcher: ResultWatcher,
    publisher: Publisher,
    worker: PixelpipeProcess,
    count: int,
    rate: float | None,
    side: int,
) -> Phase:
    """Publish ``count`` requests at ``rate`` (None: at once) and wait for each result on the reply topic, which
    ``watcher`` reads."""
    codec = codec_from_settings(settings.kafka)
    requests = direct_requests(settings, reply_topic, count, side)
    published_s = []
    started = time.time()
    for i, request in enumerate(tqdm(requests, unit="req", desc="direct: publishing", leave=False, mininterval=1)):
        if rate is not None:
            pause = started + i / rate - time.time()
            if pause > 0:
                time.sleep(pause)
        published_s.append(time.time())
        publisher.publish(request)
    publisher.flush()
    ids = [r.request_id for r in requests]
    if not watcher.wait_for(ids, "direct: results", STARTUP_TIMEOUT_S):
        raise SystemExit(f"direct: results missing; the worker's log:\n{worker.log_tail()}")
    arrived = [watcher.arrivals.at_s[r] for r in ids]
    statuses = Counter(codec.decode_as(ImageResult, watcher.arrivals.values[r]).status for r in ids)
    return Phase(
        label="direct",
        calls=count,
        rate=count / (max(arrived) - started),
        latencies_ms=[(a - p) * 1000 for a, p in zip(arrived, published_s, strict=True)],
        outcomes=Counter({"200" if s == "SUCCEEDED" else s: n for s, n in statuses.items()}),
    )


class HttpClient:
    """HTTP/1.1 POSTs on asyncio streams, with keep-alive connections reused while fresh. httpx's pool scans its
    connections and waiting requests on every call, so with hundreds open it spends more CPU on its own books than
    the gateway on a call, and the figures would measure the client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """The answer's status, headers (lower case) and body."""
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if time.monotonic() - idle_since < KEEP_ALIVE_S:
                break
            writer.close()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            writer.write("\r\n".join([*lines, "", ""]).encode() + body)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in head[1:] if line)
            answer_headers = {name.lower(): value for name, value in fields.items()}
            answer = await reader.readexactly(int(answer_headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        self._idle.append((reader, writer, time.monotonic()))
        return int(head[0].split()[1]), answer_headers, answer

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()


class GatewayClient:
    """OpenAI image calls to the gateway, each timed from its start to the last byte of its answer."""

    def __init__(self, port: int, key: str, side: int) -> None:
        self.http = HttpClient("127.0.0.1", port)
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.side = side

    async def call(self, i: int, idempotent: bool, phase: Phase) -> None:
        body = {"model": "null", "prompt": PROMPTS[i % len(PROMPTS)], "size": f"{self.side}x{self.side}"}
        body["user"] = f"u{i % USERS:04d}"  # the request's user is the key's plus this: no user hits its rate limit
        headers = self.headers | ({"idempotency-key": uuid.uuid4().hex} if idempotent else {})
        started = time.perf_counter()
        try:
            status, answer_headers, _ = await asyncio.wait_for(
                self.http.post("/v1/images/generations", json.dumps(body).encode(), headers), CALL_TIMEOUT_S
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            phase.outcomes[type(e).__name__] += 1
            return
        phase.outcomes[str(status)] += 1
        if status != 200:
            return
        latency_ms = (time.perf_counter() - started) * 1000
        timing = dict(part.strip().split(";dur=") for part in answer_headers["server-timing"].split(","))
        phase.latencies_ms.append(latency_ms)
        phase.gateway_ms.append(float(timing["gateway"]))
        phase.outside_ms.append(latency_ms - float(timing["gateway"]) - float(timing["pipeline"]))

    async def run(self, label: str, count: int, rate: float | None, idempotent: bool = False) -> Phase:
        """``count`` calls started at ``rate`` calls/s (None: all at once), each awaited in its own task."""
        phase = Phase(label=label, calls=count, rate=0.0, latencies_ms=[])
        started = time.perf_counter()
        tasks = []
        with tqdm(total=count, unit="call", desc=label, leave=False, mininterval=1) as bar:
            for i in range(count):
                if rate is not None:
                    pause = started + i / rate - time.perf_counter()
                    if pause > 0:
                        await asyncio.sleep(pause)
                task = asyncio.ensure_future(self.call(i, idempotent, phase))
                task.add_done_callback(lambda _: bar.update())
                tasks.append(task)
            await asyncio.gather(*tasks)
        phase.rate = len(phase.latencies_ms) / (time.perf_counter() - started)
        return phase

    def close(self) -> None:
        self.http.close()


class ProcessWatch:
    """Samples a process's open file descriptors on a thread (their most, while watched) and reads its peak RSS
    (Linux /proc)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.most_fds = 0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.most_fds = max(self.most_fds, len(os.listdir(f"/proc/{self.pid}/fd")))

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # the resident set's high-water mark, in kB
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def start_gateway(settings: Settings, log_path: Path) -> PixelpipeProcess:
    gateway = PixelpipeProcess(settings, ["gateway"], log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise SystemExit(f"the gateway stopped:\n{gateway.log_tail()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{settings.gateway.port}/healthz", timeout=1).read()
            return gateway
        except OSError:
            time.sleep(0.3)
    gateway.stop()
    raise SystemExit(f"the gateway did not answer:\n{gateway.log_tail()}")


async def run_gateway_phases(
    settings: Settings, key: str, gateway_pid: int, args: argparse.Namespace
) -> tuple[list[Phase], tuple[float, float, int]]:
    """The paced gateway phases, then the concurrent one with its time to the last answer, the gateway's peak RSS
    and its most open file descriptors."""
    client = GatewayClient(settings.gateway.port, key, args.side)
    try:
        await client.run("gateway: warm-up", WARM_UP_CALLS, None)
        count = int(args.rate * args.seconds)
        profile = args.profile and args.profile / "gateway.txt"
        with profiled(gateway_pid, profile, print):
            phases = [await client.run("gateway", count, args.rate)]
        phases.append(await client.run("gateway+idem", count, args.rate, idempotent=True))
        watch = ProcessWatch(gateway_pid)
        started = time.perf_counter()
        concurrent = await client.run("concurrent", args.concurrent, None)
        finished_s = time.perf_counter() - started
        watch.close()
        phases.append(concurrent)
        return phases, (finished_s, watch.peak_rss_mb(), watch.most_fds)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=150.0, help="calls/s of the paced phases")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each paced phase calls")
    parser.add_argument("--concurrent", type=int, default=5000, help="calls opened at once in the last phase")
    parser.add_argument("--side", type=int, default=64, help="width and height of the requested images")
    parser.add_argument("--profile", type=Path, help="folder for a py-spy profile of the gateway's paced phase")
    args = parser.parse_args()
    if args.profile:  # before changing folder
        args.profile = args.profile.resolve()
    raise_open_files_limit()  # the concurrent phase holds a socket per call
    base = Settings.from_env()
    echo = print
    load_before = os.getloadavg()
    with (
        stack_unless_kafka_answers(base, section_from_env(StackSettings, os.environ), echo) as base,
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp,
    ):
        workdir = Path(tmp)
        registry = workdir / "registry.json"
        registry.write_text(json.dumps({"null": {"kind": "null"}}))
        suffix = uuid.uuid4().hex[:8]
        settings = base.updated(
            **{f"topic_{name}": f"bench.{name}.{suffix}" for name in ("requests", "generate", "edit", "results")},
            **{f"topic_{name}": f"bench.{name}.{suffix}" for name in ("metrics", "dead_letter", "cancellations")},
            **{f"topic_{name}": f"bench.{name}.{suffix}" for name in ("generate_long", "edit_long")},
            consumer_group=f"bench-{suffix}",
            image_detector="null",
            model_registry=str(registry),
            object_store_url=f"file://{workdir / 'objects'}",
            experiments_file=str(workdir / "no-experiments.json"),
            max_wait_ms=5,
            gateway_port=free_port(),
            gateway_keys_file=str(workdir / "keys.json"),
            gateway_instance_id=f"bench-{suffix}",
            gateway_max_lag=args.concurrent * 4,
        )
        ensure_topics(settings.kafka, settings.topics)
        reply_topic = f"{settings.topics.reply_prefix}bench.{suffix}"
        ensure_topics(settings.kafka, settings.topics, [reply_topic], partitions=1)
        key, _ = KeyStore(settings.gateway.keys_file).create("bench", requests_per_minute=10**7, burst=10**6)
        # The worker inherits the temporary folder as its working directory, for the relative defaults (./data).
        os.chdir(workdir)
        echo(
            f"one worker process ({', '.join(STAGES)}) and one gateway, null model, {args.side}x{args.side} images,"
            f" Kafka at {settings.kafka.bootstrap}, {os.cpu_count()} cores, load average before {load_before[0]:.2f}"
        )
        watcher = ResultWatcher(settings, reply_topic)
        try:
            with (
                Publisher(settings) as publisher,
                WorkerProcess(settings, STAGES, workdir / "worker.log") as worker,
            ):
                # The first batch waits for the worker's start; the second is measured.
                run_direct(settings, reply_topic, watcher, publisher, worker, WARM_UP_CALLS, None, args.side)
                count = int(args.rate * args.seconds)
                direct = run_direct(settings, reply_topic, watcher, publisher, worker, count, args.rate, args.side)
                gateway = start_gateway(settings, workdir / "gateway.log")
                try:
                    phases, concurrent = asyncio.run(run_gateway_phases(settings, key, gateway.process.pid, args))
                finally:
                    gateway.stop()
                    echo(f"gateway log tail:\n{gateway.log_tail(5)}")
                echo(f"worker log tail:\n{worker.log_tail(3)}")
        finally:
            watcher.close()
            topics = [*settings.topics.pipeline(), reply_topic, f"{settings.topics.reply_prefix}gateway.bench-{suffix}"]
            admin = AdminClient(settings.kafka.client_config())
            for deleted in admin.delete_topics(topics).values():
                deleted.result()
    print_table(args, [direct, *phases], concurrent, echo)


def spread(values: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max."""
    return quantile(values, 0.5), quantile(values, 0.99), max(values)


def print_table(
    args: argparse.Namespace, phases: list[Phase], concurrent: tuple[float, float, int], echo: Callable[..., None]
) -> None:
    direct = phases[0]
    echo("")
    echo(f"paced at {args.rate:,.0f} calls/s for {args.seconds:g} s, then {args.concurrent:,} calls at once:")
    echo(
        "  phase          calls   calls/s   p50 ms   p99 ms   max ms   added p50   added p99"
        "   gateway's own p50 / p99 / max ms   HTTP+client p50 / p99 ms   outcomes"
    )
    for phase in phases:
        lat = phase.latencies_ms
        added = added99 = own = outside = ""
        if phase is not direct:
            added = f"{quantile(lat, 0.5) - quantile(direct.latencies_ms, 0.5):+.1f}"
            added99 = f"{quantile(lat, 0.99) - quantile(direct.latencies_ms, 0.99):+.1f}"
            own = " / ".join(f"{x:.1f}" for x in spread(phase.gateway_ms))
            outside = " / ".join(f"{x:.1f}" for x in spread(phase.outside_ms)[:2])
        echo(
            f"  {phase.label:<13} {phase.calls:>6} {phase.rate:>9,.0f} {quantile(lat, 0.5):>8.1f}"
            f" {quantile(lat, 0.99):>8.1f} {max(lat):>8.1f} {added:>11} {added99:>11} {own:>34} {outside:>26}"
            f"   {dict(phase.outcomes)}"
        )
    finished_s, rss_mb, fds = concurrent
    errors = phases[-1].calls - phases[-1].outcomes["200"]
    echo(
        f"concurrent: {args.concurrent:,} calls, {errors} errors, the last answered after {finished_s:.1f} s;"
        f" gateway peak RSS {rss_mb:.0f} MB, at most {fds:,} open file descriptors"
    )
    echo("goal: the gateway adds <= 10 ms p99 at 500 calls/s on 2 cores; 5,000 concurrent calls without errors")
    echo(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
