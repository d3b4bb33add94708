"""The stages' Prometheus metrics, observed where the stages build their events (``Emitter`` in ``stages.py``),
never by decoding what is sent.

Each label value comes from a bounded set (stage, outcome, status, error code, category, the first words of a
dead letter's reason, model names from the registry): no request, user or event ids. A worker observes nothing
until ``TELEMETRY.enable()`` (``run_worker`` calls it when ``PIXELPIPE_METRICS_PORT`` is set), so the benchmarks
can measure the cost of the metrics against none in one run. Label children are cached: an observation costs a
dict lookup and the metric's own lock.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pixelpipe.core.telemetry import DEAD_LETTERS, RETRIES, reason_label

if TYPE_CHECKING:
    from pixelpipe.processors.models import Readiness
    from pixelpipe.processors.outcomes import Outcome, StageWork

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

EVENTS_IN = Counter("pixelpipe_stage_events_in_total", "Messages a stage took from its topic.", ["stage"])
EVENTS_OUT = Counter(
    "pixelpipe_stage_events_out_total", "Requests a stage finished, by outcome (its StageMetrics).",
    ["stage", "outcome"],
)  # fmt: skip
QUEUE_SECONDS = Histogram(
    "pixelpipe_stage_queue_seconds", "Time from produce to the start of a stage's work.", ["stage"],
    buckets=LATENCY_BUCKETS_S,
)  # fmt: skip
COMPUTE_SECONDS = Histogram(
    "pixelpipe_stage_compute_seconds", "A stage's compute time per request.", ["stage"], buckets=LATENCY_BUCKETS_S
)
BATCH_SIZE = Histogram(
    "pixelpipe_stage_batch_size", "Size of the batch each request ran in (one observation per request).", ["stage"],
    buckets=BATCH_BUCKETS,
)  # fmt: skip
DEVICE_SECONDS = Counter(
    "pixelpipe_stage_device_seconds_total", "Device time spent, shared by a batch's images.", ["stage", "device"]
)
COST_USD = Counter("pixelpipe_stage_cost_usd_total", "Cost of the device time at the configured price.", ["stage"])
RESULTS = Counter(
    "pixelpipe_results_total", "Terminal results, by status and error code ('' when none).", ["status", "error_code"]
)
IMAGES = Counter("pixelpipe_images_total", "Images stored for succeeded requests.", ["kind"])
REJECTIONS = Counter(
    "pixelpipe_moderation_rejections_total",
    "Requests rejected by moderation, by check and category (a request rejected for two categories counts twice).",
    ["check", "category"],
)
MODEL_BUSY = Counter(
    "pixelpipe_model_busy_seconds_total", "Wall time the model thread spent in model calls.", ["stage"]
)
MODEL_LOAD = Gauge("pixelpipe_model_load_seconds", "Time to load a model, at worker start.", ["model"])
MODEL_WARMUP = Gauge(
    "pixelpipe_model_warmup_seconds", "Time to compile and render a model's warm-up shapes, at start.", ["model"]
)


class StageTelemetry:
    """What the stages observe; does nothing until enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self._work: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def enable(self, on: bool = True) -> None:
        self.enabled = on

    def events_in(self, stage: str, count: int) -> None:
        if self.enabled:
            EVENTS_IN.labels(stage).inc(count)

    def work(self, work: StageWork, cost_usd: float) -> None:
        """One StageMetric's worth: outcome, queue and compute time, batch size, device time and cost."""
        if not self.enabled:
            return
        key = (work.stage, work.outcome, work.device)
        children = self._work.get(key)
        if children is None:
            stage = work.stage.lower()
            children = (
                EVENTS_OUT.labels(stage, work.outcome),
                QUEUE_SECONDS.labels(stage),
                COMPUTE_SECONDS.labels(stage),
                BATCH_SIZE.labels(stage),
                DEVICE_SECONDS.labels(stage, work.device),
                COST_USD.labels(stage),
            )
            self._work[key] = children
        out, queue, compute, batch, device, cost = children
        out.inc()
        queue.observe(max(0.0, work.queue_ms) / 1000.0)
        compute.observe(work.compute_ms / 1000.0)
        batch.observe(work.batch_size)
        device.inc(work.device_seconds)
        cost.inc(cost_usd)

    def result(self, outcome: Outcome, kind: str) -> None:
        if not self.enabled:
            return
        RESULTS.labels(outcome.status, outcome.error_code or "").inc()
        if outcome.images:
            IMAGES.labels(kind.lower()).inc(len(outcome.images))
        if outcome.status == "REJECTED":
            for category in outcome.rejected_categories or ["unknown"]:
                REJECTIONS.labels((outcome.moderation_stage or "").lower(), category).inc()

    def dead_letter(self, stage: str, reason: str) -> None:
        if self.enabled:
            DEAD_LETTERS.labels(stage, reason_label(reason)).inc()

    def retry(self, what: str) -> None:
        if self.enabled:
            RETRIES.labels(what).inc()

    def model_busy(self, stage: str, seconds: float) -> None:
        if self.enabled:
            MODEL_BUSY.labels(stage.lower()).inc(seconds)

    def models_ready(self, readiness: Mapping[str, Readiness]) -> None:
        for model, ready in readiness.items():
            MODEL_LOAD.labels(model).set(ready.load_seconds)
            MODEL_WARMUP.labels(model).set(ready.warm_up_seconds)


class GpuCollector(Collector):
    """GPU memory and utilisation at scrape time, where torch is loaded and sees CUDA devices; nothing otherwise
    (a moderation worker never imports torch for this)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        allocated = GaugeMetricFamily("pixelpipe_gpu_memory_allocated_bytes", "Memory held by tensors.", labels=["gpu"])
        reserved = GaugeMetricFamily(
            "pixelpipe_gpu_memory_reserved_bytes", "Memory reserved by torch's caching allocator.", labels=["gpu"]
        )
        total = GaugeMetricFamily("pixelpipe_gpu_memory_total_bytes", "The device's memory.", labels=["gpu"])
        utilisation = GaugeMetricFamily(
            "pixelpipe_gpu_utilization_ratio", "Share of the last sample period a kernel ran (NVML).", labels=["gpu"]
        )
        for index in range(torch.cuda.device_count()):
            gpu = str(index)
            allocated.add_metric([gpu], torch.cuda.memory_allocated(index))
            reserved.add_metric([gpu], torch.cuda.memory_reserved(index))
            total.add_metric([gpu], torch.cuda.get_device_properties(index).total_memory)
            with contextlib.suppress(Exception):  # no NVML (pynvml) on this host: memory only
                utilisation.add_metric([gpu], torch.cuda.utilization(index) / 100.0)
        yield from (allocated, reserved, total, utilisation)


TELEMETRY = StageTelemetry()
REGISTRY.register(GpuCollector())
