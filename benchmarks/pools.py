"""Batch sizes and latency of a mixed load over two models: one pool serving both against a pool per model.

    python benchmarks/pools.py [--seconds 20] [--seconds-per-image 0.02] [--busy 0.5] [--arrivals poisson]
    python benchmarks/pools.py --runs 3 --seconds 60   # alternating runs; the ratios of their medians

Runs on the local stack (started when no Kafka answers at PIXELPIPE_KAFKA_BOOTSTRAP, stopped afterwards) with two
null models (a registry written here: ``--seconds-per-image`` of simulated work per image, a batch as one call) and
objects on the local filesystem, fresh topics per run. The same number of render workers (`pixelpipe worker --stages
generate,edit`, two) serve the same load in two arrangements, beside one moderation worker (`--stages moderation`):

  shared  no pools configured: both models on the default render topics, and both render workers hold both models
          (one consumer group, the topics' partitions split between them).
  pools   a pool per model (`pixelpipe pools apply`, pools named after their models), one render worker each
          (`--pool NAME`), on the pool's own topics.

Each arrangement gets the same requests (text-to-image, 64x64 by default, each model drawn 50/50 with ``--seed``)
published with the producer SDK at ``--rate`` requests/s, Poisson or evenly spaced (``--arrivals``); a few seconds
of the same load warm every worker first. The default rate keeps each render worker's model busy ``--busy`` of the
time (rate = busy x workers / seconds per image; the null model's call takes its images' time, so a worker's model is
as busy whatever its batch sizes). A render worker's take holds what came while it rendered the take before, plus
its take window (PIXELPIPE_MAX_WAIT_MS, 50 ms by default): at the defaults (20 ms an image, busy 50 %, 50
requests/s) about 4 requests of one model with pools, under the batch limit, and half of that per model in a worker
of the shared arrangement, which splits each take between the two models. That is where pools can double the
batches; where takes hold about one request per model (a lower rate, slower images) both arrangements render mostly
alone, and where they outgrow the batch limit (PIXELPIPE_MAX_BATCH, 8) both fill it, so the gain shrinks at both
ends (docs/contributors/benchmarks.md has a sweep). p99 rests on the slowest 1 % of each model's requests: at slow
images and low rates lengthen ``--seconds`` for it to mean much.

Printed for each arrangement: images/s (succeeded results from the first publish to the last result), the batches
formed (their mean size, requests over model calls, and how many of each size: the results' ``batch_size``, the
requests that shared their model call, so k results of size k are one call), and each model's end-to-end latency
(publish to the result's arrival here) at p50 and p99, with the workers' CPU time per request and how busy the
machine's cores were (Kafka, this client and other jobs share them); then the ratios pools / shared of the mean
batch size and of each model's p99 (medians over ``--runs``). Target: mean batch size with pools >= 1.5x the shared
arrangement's at the same load, and no model's p99 worse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline import (  # benchmarks/pipeline.py, beside this script
    STARTUP_TIMEOUT_S,
    CpuMeter,
    ResultWatcher,
    delete_own_topics,
    encoded_requests,
    publish,
    quantile,
    with_own_topics,
)

from pixelpipe.core.codec import codec_from_settings
from pixelpipe.core.events import ImageResult
from pixelpipe.core.pools import DEFAULT_POOL
from pixelpipe.core.settings import Settings, section_from_env
from pixelpipe.core.topics import ensure_topics
from pixelpipe.producers import Publisher
from pixelpipe.tools.processes import PixelpipeProcess, WorkerProcess
from pixelpipe.tools.stack import StackSettings, free_port, stack_unless_kafka_answers

MODELS = ("null-a", "null-b")
RENDER_WORKERS = 2
RENDER_STAGES = ["generate", "edit"]
ARRANGEMENTS = ("shared", "pools")
APPLY_TIMEOUT_S = 120.0


@dataclass
class Figures:
    """One arrangement's run: what it rendered, the batches it formed and each model's latencies."""

    arrangement: str
    offered_rate: float  # requests/s as published
    images_per_s: float
    batches: Counter[int]  # model calls by their number of requests
    latencies_ms: dict[str, list[float]]  # by model
    statuses: Counter[str]
    rendered_in: Counter[tuple[str, str | None]]  # (model, the pool its results name)
    cores_busy: float  # share of the machine's cores busy while the load was published (workers, Kafka, others)
    worker_cpu_ms: float  # the arrangement's workers' CPU time per request, moderation's included

    @property
    def mean_batch(self) -> float:
        return sum(size * calls for size, calls in self.batches.items()) / max(1, sum(self.batches.values()))

    def latency_ms(self, model: str, q: float) -> float:
        return quantile(self.latencies_ms[model], q)


def registry_file(path: Path, seconds_per_image: float) -> Path:
    path.write_text(json.dumps({m: {"kind": "null", "seconds_per_image": seconds_per_image} for m in MODELS}))
    return path


def pools_file(path: Path) -> Path:
    """A pool per model, named after it."""
    path.write_text(json.dumps({"pools": [{"name": model, "models": [model]} for model in MODELS]}))
    return path


def ready(port: int) -> bool:
    """Whether the worker serving ``port`` answers /readyz: models warm, partitions assigned."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.HTTPError, OSError):  # not ready, or not serving yet
        return False


def wait_ready(workers: dict[int, PixelpipeProcess], label: str) -> None:
    """Wait until every worker (by its metrics port) is ready at once: a worker joining the group later moves
    partitions, so one that was ready may not be any more."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(ready(port) for port in workers):
            return
        for worker in workers.values():
            if worker.process.poll() is not None:
                raise SystemExit(f"{label}: a worker exited; its log:\n{worker.log_tail()}")
        time.sleep(0.5)
    waiting = {port: worker for port, worker in workers.items() if not ready(port)}
    raise SystemExit(f"{label}: workers not ready after {STARTUP_TIMEOUT_S:.0f} s; their logs:\n{log_tails(waiting)}")


def log_tails(workers: dict[int, PixelpipeProcess]) -> str:
    """The end of each worker's log (the logs go with the run's temporary folder)."""
    return "\n\n".join(f"{worker.log_path.name}:\n{worker.log_tail()}" for worker in workers.values())


def apply_pools(settings: Settings, path: Path, log_path: Path) -> None:
    """`pixelpipe pools apply FILE`: the pools' topics made, and the pools published for moderation to read."""
    with PixelpipeProcess(settings, ["pools", "apply", str(path)], log_path) as applying:
        status = applying.process.wait(APPLY_TIMEOUT_S)
    if status != 0:
        raise SystemExit(f"pixelpipe pools apply {path} failed ({status}):\n{applying.log_tail()}")


def run_arrangement(
    base: Settings,
    workdir: Path,
    arrangement: str,
    rate: float,
    requests: int,
    warm_up: int,
    args: argparse.Namespace,
    echo: Callable[..., None],
) -> Figures:
    """One arrangement on topics of its own: its workers started and ready, a warm-up at the same rate, then the
    measured requests; the same ``--seed`` gives every arrangement the same models in the same order."""
    suffix = f"{arrangement}-{uuid.uuid4().hex[:8]}"
    settings = with_own_topics(base, suffix)
    ensure_topics(settings.kafka, settings.topics)
    codec = codec_from_settings(settings.kafka)
    draw = random.Random(args.seed)
    models = [draw.choice(MODELS) for _ in range(warm_up + requests)]
    encoded = encoded_requests(codec, warm_up + requests, args.side, models)
    warming, measured = encoded[:warm_up], encoded[warm_up:]
    ids = [r for r, _ in measured]
    # (stages, the worker's settings) in the order they start: moderation after the pools are applied, so that it
    # reads them before it takes a request.
    if arrangement == "pools":
        apply_pools(settings, pools_file(workdir / f"pools-{suffix}.json"), workdir / f"apply-{suffix}.log")
        render = [settings.updated(pool=model) for model in MODELS]
    else:
        render = [settings] * RENDER_WORKERS
    plan = [(["moderation"], settings), *((RENDER_STAGES, worker) for worker in render)]
    watcher = ResultWatcher(settings)
    try:
        with Publisher(settings, codec=codec) as publisher, contextlib.ExitStack() as running:
            workers: dict[int, PixelpipeProcess] = {}
            for index, (stages, worker_settings) in enumerate(plan):
                port = free_port()
                env = {"PIXELPIPE_METRICS_PORT": str(port), "PIXELPIPE_METRICS_HOST": "127.0.0.1"}
                log_path = workdir / f"worker-{suffix}-{index}-{'-'.join(stages)}.log"
                workers[port] = running.enter_context(WorkerProcess(worker_settings, stages, log_path, env))
            echo(f"{arrangement}: {len(workers)} workers starting")
            wait_ready(workers, arrangement)
            poisson = draw if args.arrivals == "poisson" else None
            publish(publisher, warming, rate, f"{arrangement}: warm-up", poisson)
            if not watcher.wait_for([r for r, _ in warming], f"{arrangement}: warm-up", 60.0):
                raise SystemExit(f"{arrangement}: warm-up results missing; the workers' logs:\n{log_tails(workers)}")
            machine = CpuMeter(os.getpid())
            meters = [CpuMeter(worker.process.pid) for worker in workers.values()]
            published_s = publish(publisher, measured, rate, f"{arrangement}: {rate:,.0f} req/s", poisson)
            _, cores_busy = machine.reading()
            if not watcher.wait_for(ids, f"{arrangement}: results", 60.0):
                raise SystemExit(f"{arrangement}: results missing; the workers' logs:\n{log_tails(workers)}")
            worker_cpu_s = sum(meter.reading()[0] for meter in meters)
    finally:
        watcher.close()
        delete_own_topics(settings, suffix)
    results = [codec.decode_as(ImageResult, watcher.arrivals.values[r]) for r in ids]
    arrived = [watcher.arrivals.at_s[r] for r in ids]
    sizes = Counter(r.batch_size for r in results if r.status == "SUCCEEDED" and r.batch_size)
    latencies: dict[str, list[float]] = {model: [] for model in MODELS}
    for model, sent_s, arrived_s in zip(models[warm_up:], published_s, arrived, strict=True):
        latencies[model].append((arrived_s - sent_s) * 1000)
    succeeded = sum(1 for r in results if r.status == "SUCCEEDED")
    return Figures(
        arrangement=arrangement,
        offered_rate=(len(ids) - 1) / (published_s[-1] - published_s[0]),
        images_per_s=succeeded / (max(arrived) - published_s[0]),
        # k results of batch size k shared one model call.
        batches=Counter({size: round(count / size) for size, count in sizes.items()}),
        latencies_ms=latencies,
        statuses=Counter(r.status if r.status == "SUCCEEDED" else f"{r.status}:{r.error_code}" for r in results),
        rendered_in=Counter((r.model, r.pool) for r in results),
        cores_busy=cores_busy,
        worker_cpu_ms=worker_cpu_s * 1000 / len(ids),
    )


def print_table(runs: list[Figures], echo: Callable[..., None]) -> None:
    echo("")
    latency_heads = "".join(f"{f'{m} p50/p99 ms':>22}" for m in MODELS)
    heads = (
        f"{'arrangement':<12}{'req/s':>7}{'images/s':>10}{'mean batch':>12}{latency_heads}{'CPU ms/req':>12}"
        f"{'cores busy':>12}"
    )
    echo(f"  {heads}  batches (size:calls)")
    for run in runs:
        latency = "".join(f"{f'{run.latency_ms(m, 0.5):.0f} / {run.latency_ms(m, 0.99):.0f}':>22}" for m in MODELS)
        batches = " ".join(f"{size}:{calls}" for size, calls in sorted(run.batches.items()))
        echo(
            f"  {run.arrangement:<12}{run.offered_rate:>7.1f}{run.images_per_s:>10.1f}{run.mean_batch:>12.2f}"
            f"{latency}{run.worker_cpu_ms:>12.2f}{run.cores_busy:>12.0%}  {batches}"
        )
    for run in runs:
        if set(run.statuses) != {"SUCCEEDED"}:
            echo(f"  {run.arrangement}: results {dict(run.statuses)}")
        # Each model in its own pool, or both in the default one: anything else is not the arrangement measured.
        expected = {(m, m if run.arrangement == "pools" else DEFAULT_POOL) for m in MODELS}
        strays = {f"{m} in {pool}": n for (m, pool), n in run.rendered_in.items() if (m, pool) not in expected}
        if strays:
            echo(f"  {run.arrangement}: results from other pools than the arrangement's: {strays}")


def pools_over_shared(runs: list[Figures], figure: Callable[[Figures], float]) -> float:
    """The median of ``figure`` over the pools' runs, over its median over the shared arrangement's."""
    pools, shared = (statistics.median(figure(r) for r in runs if r.arrangement == a) for a in ("pools", "shared"))
    return pools / shared


def print_ratios(runs: list[Figures], echo: Callable[..., None]) -> None:
    """The ratios pools / shared of the medians over the runs, against the target."""
    batch_ratio = pools_over_shared(runs, lambda run: run.mean_batch)
    p99_ratios = {m: pools_over_shared(runs, partial(Figures.latency_ms, model=m, q=0.99)) for m in MODELS}
    echo("")
    echo(f"pools / shared (medians of {sum(r.arrangement == 'pools' for r in runs)} runs each):")
    echo(f"  mean batch size {batch_ratio:.2f}x (target >= 1.5x)")
    for model, ratio in p99_ratios.items():
        echo(f"  {model} p99 {ratio:.2f}x (target <= 1.0x)")
    met = batch_ratio >= 1.5 and all(ratio <= 1.0 for ratio in p99_ratios.values())
    echo(f"target {'met' if met else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each arrangement's load is published")
    parser.add_argument("--warm-up-seconds", type=float, default=3.0, help="load before the measured requests")
    parser.add_argument("--seconds-per-image", type=float, default=0.02, help="the null models' simulated render")
    parser.add_argument(
        "--busy", type=float, default=0.5, help="share of each render worker's time its model works (sets the rate)"
    )
    parser.add_argument("--rate", type=float, help="requests/s over both models (default: from --busy)")
    parser.add_argument("--arrivals", choices=("poisson", "steady"), default="poisson")
    parser.add_argument("--runs", type=int, default=1, help="runs of each arrangement, alternating")
    parser.add_argument("--seed", type=int, default=1, help="draws the models and the Poisson gaps")
    parser.add_argument("--side", type=int, default=64, help="width and height of the requested images")
    parser.add_argument("--max-wait-ms", type=int, help="PIXELPIPE_MAX_WAIT_MS of the render stages (default: theirs)")
    parser.add_argument("--max-batch", type=int, help="PIXELPIPE_MAX_BATCH of the render stages (default: theirs)")
    parser.add_argument("--take-events", type=int, help="PIXELPIPE_TAKE_EVENTS of the render stages (default: theirs)")
    args = parser.parse_args()
    if args.seconds_per_image <= 0:
        raise SystemExit("--seconds-per-image must be positive: the batches form while a model works")
    if not 0 < args.busy < 1:
        raise SystemExit("--busy must be between 0 and 1: at 1 or more the workers fall behind the load")
    if args.runs < 1 or args.seconds <= 0 or args.warm_up_seconds <= 0 or (args.rate is not None and args.rate <= 0):
        raise SystemExit("--runs, --seconds, --warm-up-seconds and --rate must be positive")
    rate = args.rate or args.busy * RENDER_WORKERS / args.seconds_per_image
    echo = print
    base = Settings.from_env()
    stage_settings = {name: getattr(args, name) for name in ("max_wait_ms", "max_batch", "take_events")}
    stage_changes = {name: value for name, value in stage_settings.items() if value is not None}
    if any(value < (0 if name == "max_wait_ms" else 1) for name, value in stage_changes.items()):
        raise SystemExit("--max-batch and --take-events must be 1 or more, --max-wait-ms 0 or more")
    runs: list[Figures] = []
    with (
        stack_unless_kafka_answers(base, section_from_env(StackSettings, os.environ), echo) as base,
        tempfile.TemporaryDirectory(prefix="bench-pools-") as tmp,
    ):
        workdir = Path(tmp)
        base = base.updated(
            model_registry=str(registry_file(workdir / "registry.json", args.seconds_per_image)),
            object_store_url=f"file://{workdir / 'objects'}",
            experiments_file=str(workdir / "no-experiments.json"),
            image_detector="null",
            **stage_changes,
        )
        # The workers inherit the temporary folder as their working directory, for the relative defaults (./data).
        os.chdir(workdir)
        stages = base.stages
        echo(
            f"{RENDER_WORKERS} render workers and one moderation worker; models {', '.join(MODELS)} (null,"
            f" {args.seconds_per_image * 1000:g} ms an image), {args.arrivals} arrivals at {rate:,.1f} req/s"
            f" (each model's worker busy {rate * args.seconds_per_image / RENDER_WORKERS:.0%}), take window"
            f" {stages.max_wait_ms} ms, takes of up to {stages.take_events}, batches of up to {stages.max_batch};"
            f" Kafka at {base.kafka.bootstrap}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
        )
        for run in range(args.runs):
            for arrangement in ARRANGEMENTS:
                figures = run_arrangement(
                    base,
                    workdir,
                    arrangement,
                    rate,
                    max(1, round(rate * args.seconds)),
                    max(1, round(rate * args.warm_up_seconds)),
                    args,
                    echo,
                )
                runs.append(figures)
                echo(
                    f"{arrangement} (run {run + 1}): mean batch {figures.mean_batch:.2f}, {figures.images_per_s:.1f}"
                    f" images/s (load average {os.getloadavg()[0]:.2f})"
                )
    print_table(runs, echo)
    print_ratios(runs, echo)
    echo(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
