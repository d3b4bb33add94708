"""``pixelpipe top``: a live terminal view of the pipeline, read from Prometheus' HTTP API.

One frame is a handful of instant PromQL queries over the last minute: lag per consumer group and topic (with the
model pool of a render topic), and per stage and pool the rates in and out, p95 queue and compute time, mean batch
size, model busy share, failure and cancellation shares and the device time cancellations saved, with images/s,
dead letters by reason and GPU utilisation where a GPU reports. Rendered with rich. A stage's pool is '' where
there is none (moderation's intake, a request that ended at moderation).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

WINDOW = "1m"
LAG = {
    "messages": (
        "sum by (group, topic, pool) (max by (group, topic, partition, pool) (pixelpipe_consumer_lag_messages))"
    ),
    "oldest_s": "max by (group, topic, pool) (pixelpipe_consumer_lag_seconds)",
}
STAGE = {
    "in_per_s": f"sum by (stage, pool) (rate(pixelpipe_stage_events_in_total[{WINDOW}]))",
    "out_per_s": f"sum by (stage, pool) (rate(pixelpipe_stage_events_out_total[{WINDOW}]))",
    "queue_p95_s": (
        f"histogram_quantile(0.95, sum by (stage, pool, le) (rate(pixelpipe_stage_queue_seconds_bucket[{WINDOW}])))"
    ),
    "compute_p95_s": (
        f"histogram_quantile(0.95, sum by (stage, pool, le) (rate(pixelpipe_stage_compute_seconds_bucket[{WINDOW}])))"
    ),
    "batch_mean": (
        f"sum by (stage, pool) (rate(pixelpipe_stage_batch_size_sum[{WINDOW}]))"
        f" / sum by (stage, pool) (rate(pixelpipe_stage_batch_size_count[{WINDOW}]))"
    ),
    "busy": f"sum by (stage, pool) (rate(pixelpipe_model_busy_seconds_total[{WINDOW}]))",
    "failed_share": (
        f'sum by (stage, pool) (rate(pixelpipe_stage_events_out_total{{outcome="FAILED"}}[{WINDOW}]))'
        f" / sum by (stage, pool) (rate(pixelpipe_stage_events_out_total[{WINDOW}]))"
    ),
    "cancelled_share": (
        f'sum by (stage, pool) (rate(pixelpipe_stage_events_out_total{{outcome="CANCELLED"}}[{WINDOW}]))'
        f" / sum by (stage, pool) (rate(pixelpipe_stage_events_out_total[{WINDOW}]))"
    ),
    "saved_per_s": f"sum by (stage, pool) (rate(pixelpipe_stage_device_seconds_saved_total[{WINDOW}]))",
}
TOTALS = {
    "images_per_s": f"sum(rate(pixelpipe_images_total[{WINDOW}]))",
    "results_per_s": f"sum(rate(pixelpipe_results_total[{WINDOW}]))",
    "gpu_utilization": "avg(pixelpipe_gpu_utilization_ratio)",
    "targets_up": 'sum(up{job="pixelpipe"})',
    "targets": 'count(up{job="pixelpipe"})',
}
DEAD_LETTERS = f"sum by (stage, reason) (rate(pixelpipe_dead_letters_total[{WINDOW}]))"
STAGE_ORDER = ("moderation", "generate", "edit", "output_moderation")


class PrometheusError(RuntimeError):
    """Prometheus did not answer a query."""


@dataclass
class Frame:
    lag: dict[tuple[str, str, str], dict[str, float]]  # by group, topic and pool
    stages: dict[tuple[str, str], dict[str, float]]  # by stage and pool
    totals: dict[str, float]
    dead_letters: dict[tuple[str, str], float]
    at: float


def query(url: str, expr: str, timeout_s: float = 5.0) -> list[dict]:
    """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
    address = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as answer:
            body = json.load(answer)
    except OSError as e:
        raise PrometheusError(
            f"Prometheus at {url} did not answer ({e}); is the stack up (`pixelpipe stack up`)?"
        ) from e
    if body.get("status") != "success":
        raise PrometheusError(f"{expr}: {body.get('error', body)}")
    return body["data"]["result"]


def _by(url: str, queries: Mapping[str, str], *labels: str) -> dict:
    rows: dict = {}
    for name, expr in queries.items():
        for sample in query(url, expr):
            key = tuple(sample["metric"].get(label, "") for label in labels)
            rows.setdefault(key[0] if len(labels) == 1 else key, {})[name] = float(sample["value"][1])
    return rows


def read_frame(url: str) -> Frame:
    totals = {name: float(r[0]["value"][1]) for name, expr in TOTALS.items() if (r := query(url, expr))}
    dead = {
        (s["metric"].get("stage", ""), s["metric"].get("reason", "")): float(s["value"][1])
        for s in query(url, DEAD_LETTERS)
    }
    return Frame(_by(url, LAG, "group", "topic", "pool"), _by(url, STAGE, "stage", "pool"), totals, dead, time.time())


def _number(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None or value != value:  # NaN: a rate over no events
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:,.0f} ms"


def render(frame: Frame, url: str) -> Group:
    totals = frame.totals
    up, targets = int(totals.get("targets_up", 0)), int(totals.get("targets", 0))
    gpu = totals.get("gpu_utilization")
    header = Text.assemble(
        ("pixelpipe top", "bold"),
        f"  {url}  {time.strftime('%H:%M:%S', time.localtime(frame.at))}  ",
        (f"targets up {up}/{targets}", "green" if up == targets and targets else "red"),
        f"  results {_number(totals.get('results_per_s'))}/s  images {_number(totals.get('images_per_s'))}/s",
        f"  GPU {_number(gpu * 100 if gpu is not None else None, ' %', 0)}",
    )
    lag = Table(title="consumer lag (max over reporters)", title_justify="left", expand=True)
    for column in ("group", "topic", "pool"):
        lag.add_column(column)
    lag.add_column("messages", justify="right")
    lag.add_column("oldest", justify="right")
    for (group, topic, pool), row in sorted(frame.lag.items()):
        messages = row.get("messages", 0.0)
        lag.add_row(
            group,
            topic,
            pool,
            Text(f"{messages:,.0f}", style="red" if messages else "green"),
            _ms(row.get("oldest_s")),
        )
    stages = Table(title=f"stages (last {WINDOW})", title_justify="left", expand=True)
    stages.add_column("stage", no_wrap=True, min_width=max(map(len, STAGE_ORDER)))  # whole names, even when narrow
    stages.add_column("pool")
    for column in ("in/s", "out/s", "queue p95", "compute p95", "batch", "busy", "failed", "cancelled", "saved"):
        stages.add_column(column, justify="right")
    # Pipeline order, then each stage's pools by name.
    order = sorted(frame.stages, key=lambda s: (STAGE_ORDER.index(s[0]) if s[0] in STAGE_ORDER else 99, *s))
    for stage, pool in order:
        row = frame.stages[stage, pool]
        busy, failed, cancelled = row.get("busy"), row.get("failed_share"), row.get("cancelled_share")
        stages.add_row(
            stage,
            pool,
            _number(row.get("in_per_s")),
            _number(row.get("out_per_s")),
            _ms(row.get("queue_p95_s")),
            _ms(row.get("compute_p95_s")),
            _number(row.get("batch_mean")),
            _number(busy * 100 if busy is not None else None, " %", 0),
            Text(_number(failed * 100 if failed is not None else None, " %"), style="red" if failed else ""),
            _number(cancelled * 100 if cancelled is not None else None, " %"),
            _number(row.get("saved_per_s"), " s/s", 2),  # device seconds saved per second
        )
    parts: list = [header, lag, stages]
    if frame.dead_letters:
        dead = Table(title="dead letters", title_justify="left", expand=True)
        for column in ("stage", "reason"):
            dead.add_column(column)
        dead.add_column("per s", justify="right")
        for (stage, reason), rate in sorted(frame.dead_letters.items()):
            dead.add_row(stage, reason, _number(rate, digits=2))
        parts.append(dead)
    return Group(*parts)


def run_top(url: str, once: bool = False, interval_s: float = 2.0, width: int | None = None) -> bool:
    """Show frames until Ctrl-C (or one, with ``once``); False when Prometheus does not answer."""
    console = Console(width=width)
    try:
        if once:
            console.print(render(read_frame(url), url))
            return True
        with Live(render(read_frame(url), url), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render(read_frame(url), url))
    except PrometheusError as e:
        console.print(f"[red]{e}[/red]")
        return False
    except KeyboardInterrupt:
        return True
