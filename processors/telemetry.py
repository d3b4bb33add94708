"""The stages' Prometheus metrics, observed where the stages build their events (``Emitter`` in ``messages.py``),
never by decoding what is sent.

Each label value comes from a bounded set (stage, outcome, status, error code, category, the first words of a
dead letter's reason, model names from the registry, model pool names): no request, user or event ids. The per-stage
series carry the model pool: a render stage's own, the one moderation routed a request to, '' where there is none
(moderation's intake, a request that ended at moderation). A worker observes nothing
until ``TELEMETRY.enable()`` (``run_worker`` calls it when ``PIXELPIPE_METRICS_PORT`` is set), so the benchmarks
can measure the cost of the metrics against none in one run. The per-request observations are appended to a
deque and folded into counts at scrape time (``StageTelemetry``): an observation costs the stage an append.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pixelpipe.core.telemetry import DEAD_LETTERS, RETRIES, reason_label

if TYPE_CHECKING:
    from pixelpipe.processors.models import Readiness
    from pixelpipe.processors.outcomes import Outcome, StageWork

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FOLD_EVERY = 4096  # observations kept before the observing thread folds them itself (when nothing scrapes)

EVENTS_IN = Counter("pixelpipe_stage_events_in_total", "Messages a stage took from its topic.", ["stage", "pool"])
MODEL_BUSY = Counter(
    "pixelpipe_model_busy_seconds_total", "Wall time the model thread spent in model calls.", ["stage", "pool"]
)
PREVIEWS_WITHHELD = Counter(
    "pixelpipe_previews_withheld_total",
    "Previews of images in progress that output moderation withheld, by category.",
    ["category"],
)
MODEL_LOAD = Gauge("pixelpipe_model_load_seconds", "Time to load a model, at worker start.", ["model"])
MODEL_WARMUP = Gauge(
    "pixelpipe_model_warmup_seconds", "Time to compile and render a model's warm-up shapes, at start.", ["model"]
)


class _Histogram:
    """Bucket counts (not cumulative), sum and count of one label set."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class StageTelemetry(Collector):
    """What the stages observe; does nothing until enabled.

    prometheus-client's metrics take a lock per update, about 30 us of Python for the six updates of one
    StageMetric: several per cent of a worker's time per request at thousands of requests a second. Here an
    observation is one append to a deque (atomic, no lock); the observations are folded into plain counts when
    Prometheus scrapes (or when ``FOLD_EVERY`` are waiting), under a lock, and exposed by ``collect``.
    """

    def __init__(self) -> None:
        self.enabled = False
        # An observation waits as (the method that folds it, its arguments).
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()
        # Per stage and pool, as the label values are: (stage, pool, ...).
        self._out: dict[tuple[str, str, str], int] = {}
        self._queue: dict[tuple[str, str], _Histogram] = {}
        self._compute: dict[tuple[str, str], _Histogram] = {}
        self._batch: dict[tuple[str, str], _Histogram] = {}
        self._device: dict[tuple[str, str, str], float] = {}
        self._saved: dict[tuple[str, str], float] = {}
        self._cost: dict[tuple[str, str], float] = {}
        self._results: dict[tuple[str, str, str], int] = {}
        self._images: dict[tuple[str, str], int] = {}
        self._rejections: dict[tuple[str, str, str], int] = {}

    def enable(self, on: bool = True) -> None:
        self.enabled = on

    def events_in(self, stage: str, count: int, *, pool: str | None) -> None:
        if self.enabled:
            EVENTS_IN.labels(stage, pool or "").inc(count)

    def work(self, work: StageWork, cost_usd: float, *, pool: str | None) -> None:
        """One StageMetric's worth: outcome, queue and compute time, batch size, device time and cost."""
        if self.enabled:
            self._pending.append((self._fold_work, work, cost_usd, pool or ""))
            if len(self._pending) > FOLD_EVERY:
                self.fold()

    def result(self, outcome: Outcome, kind: str, *, pool: str | None) -> None:
        if self.enabled:
            self._pending.append((self._fold_result, outcome, kind, pool or ""))
            if len(self._pending) > FOLD_EVERY:
                self.fold()

    def dead_letter(self, stage: str, reason: str) -> None:
        if self.enabled:
            DEAD_LETTERS.labels(stage, reason_label(reason)).inc()

    def retry(self, what: str) -> None:
        if self.enabled:
            RETRIES.labels(what).inc()

    def preview_withheld(self, categories: Sequence[str]) -> None:
        if self.enabled:
            for category in categories:
                PREVIEWS_WITHHELD.labels(category).inc()

    def model_busy(self, stage: str, seconds: float, *, pool: str) -> None:
        if self.enabled:
            MODEL_BUSY.labels(stage.lower(), pool).inc(seconds)

    def models_ready(self, readiness: Mapping[str, Readiness]) -> None:
        for model, ready in readiness.items():
            MODEL_LOAD.labels(model).set(ready.load_seconds)
            MODEL_WARMUP.labels(model).set(ready.warm_up_seconds)

    def fold(self) -> None:
        """Move the waiting observations into the counts."""
        with self._lock:
            pending = self._pending
            while pending:
                fold, *arguments = pending.popleft()
                fold(*arguments)

    def _fold_work(self, work: StageWork, cost_usd: float, pool: str) -> None:
        stage = work.stage.lower()
        series = (stage, pool)
        key = (stage, pool, work.outcome)
        self._out[key] = self._out.get(key, 0) + 1
        if series not in self._queue:
            self._queue[series] = _Histogram(LATENCY_BUCKETS_S)
            self._compute[series] = _Histogram(LATENCY_BUCKETS_S)
            self._batch[series] = _Histogram(BATCH_BUCKETS)
        self._queue[series].observe(max(0.0, work.queue_ms) / 1000.0)
        self._compute[series].observe(work.compute_ms / 1000.0)
        self._batch[series].observe(work.batch_size)
        device = (stage, pool, work.device)
        self._device[device] = self._device.get(device, 0.0) + work.device_seconds
        if work.outcome == "CANCELLED":  # an unknown saving adds nothing, but the stage's series exists
            self._saved[series] = self._saved.get(series, 0.0) + (work.device_seconds_saved or 0.0)
        self._cost[series] = self._cost.get(series, 0.0) + cost_usd

    def _fold_result(self, outcome: Outcome, kind: str, pool: str) -> None:
        key = (outcome.status, outcome.error_code or "", pool)
        self._results[key] = self._results.get(key, 0) + 1
        if outcome.images:
            images = (kind.lower(), pool)
            self._images[images] = self._images.get(images, 0) + len(outcome.images)
        if outcome.status == "REJECTED":
            for category in outcome.rejected_categories or ["unknown"]:
                rejection = ((outcome.moderation_stage or "").lower(), category, pool)
                self._rejections[rejection] = self._rejections.get(rejection, 0) + 1

    def collect(self) -> Iterator[Metric]:
        self.fold()
        with self._lock:
            yield _counter(
                "pixelpipe_stage_events_out",
                "Requests a stage finished, by outcome (its StageMetrics).",
                ["stage", "pool", "outcome"],
                self._out,
            )
            for name, doc, histograms in (
                ("pixelpipe_stage_queue_seconds", "Time from produce to the start of a stage's work.", self._queue),
                ("pixelpipe_stage_compute_seconds", "A stage's compute time per request.", self._compute),
                (
                    "pixelpipe_stage_batch_size",
                    "Size of the batch each request ran in (one observation per request).",
                    self._batch,
                ),
            ):
                family = HistogramMetricFamily(name, doc, labels=["stage", "pool"])
                for series, histogram in sorted(histograms.items()):
                    family.add_metric(list(series), histogram.cumulative(), histogram.sum)
                yield family
            yield _counter(
                "pixelpipe_stage_device_seconds",
                "Device time spent, shared by a batch's images.",
                ["stage", "pool", "device"],
                self._device,
            )
            yield _counter(
                "pixelpipe_stage_device_seconds_saved",
                "Device time cancellations spared where it is known (a render stopped part way).",
                ["stage", "pool"],
                self._saved,
            )
            yield _counter(
                "pixelpipe_stage_cost_usd",
                "Cost of the device time at the configured price.",
                ["stage", "pool"],
                self._cost,
            )
            yield _counter(
                "pixelpipe_results",
                "Terminal results, by status, error code ('' when none) and the pool that ended them ('' for none).",
                ["status", "error_code", "pool"],
                self._results,
            )
            yield _counter("pixelpipe_images", "Images stored for succeeded requests.", ["kind", "pool"], self._images)
            yield _counter(
                "pixelpipe_moderation_rejections",
                "Requests rejected by moderation, by check and category (a request rejected for two categories counts "
                "twice).",
                ["check", "category", "pool"],
                self._rejections,
            )


def _counter(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class GpuCollector(Collector):
    """GPU memory and utilisation at scrape time, where torch is loaded and sees CUDA devices; nothing otherwise
    (a moderation worker never imports torch for this). Each series names the worker's model pool, which its render
    stage sets ('' for the default pool), so utilisation reads per pool."""

    def __init__(self) -> None:
        self.pool = ""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        labels = ["gpu", "pool"]
        allocated = GaugeMetricFamily("pixelpipe_gpu_memory_allocated_bytes", "Memory held by tensors.", labels=labels)
        reserved = GaugeMetricFamily(
            "pixelpipe_gpu_memory_reserved_bytes", "Memory reserved by torch's caching allocator.", labels=labels
        )
        total = GaugeMetricFamily("pixelpipe_gpu_memory_total_bytes", "The device's memory.", labels=labels)
        utilisation = GaugeMetricFamily(
            "pixelpipe_gpu_utilization_ratio", "Share of the last sample period a kernel ran (NVML).", labels=labels
        )
        for index in range(torch.cuda.device_count()):
            series = [str(index), self.pool]
            allocated.add_metric(series, torch.cuda.memory_allocated(index))
            reserved.add_metric(series, torch.cuda.memory_reserved(index))
            total.add_metric(series, torch.cuda.get_device_properties(index).total_memory)
            with contextlib.suppress(Exception):  # no NVML (pynvml) on this host: memory only
                utilisation.add_metric(series, torch.cuda.utilization(index) / 100.0)
        yield from (allocated, reserved, total, utilisation)


TELEMETRY = StageTelemetry()
REGISTRY.register(TELEMETRY)
GPU = GpuCollector()
REGISTRY.register(GPU)
