"""The experiment report as one self-contained HTML file: the results table of an ``Analysis`` and its plots
(lift per metric, latency by variant, users per arm over time, the always-valid interval over time), drawn with
matplotlib and inlined as base64 PNGs, so the page opens from disk with no server.

``report`` computes everything; this module only presents it and adds no statistics of its own.
``Analysis.to_html`` and ``Analysis.write_html`` call ``render_html``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import pandas as pd

from pixelpipe.analytics.report import Analysis

SECTIONS = ("summary", "lift", "latency", "srm", "sequential", "method")  # the id of each <section>, in order


def render_html(analysis: Analysis) -> str:
    """One HTML document with the tables and inline PNG plots; every section has an id (see SECTIONS)."""
    exp = analysis.experiment
    title = f"Experiment {exp.key}"
    srm = analysis.srm
    verdict = "sample-ratio MISMATCH: do not trust these results" if srm.flagged else "no sample-ratio mismatch"
    table = analysis.results.drop(columns=["status"]).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")
    sections = {
        "summary": (
            "Summary",
            f"<p>{_e(exp.key)}: control <b>{_e(exp.control)}</b> against {_e(', '.join(exp.treatments))}, "
            f"{analysis.start:%Y-%m-%d %H:%M} to {analysis.end:%Y-%m-%d %H:%M} UTC. "
            f"Users: {_e(', '.join(f'{v}={n}' for v, n in analysis.users_per_arm().items()))}; {verdict} "
            f"(p={srm.p_value:.3g}).</p>" + "".join(f"<p class=note>{_e(n)}</p>" for n in analysis.notes) + table,
        ),
        "lift": ("Relative lift and 95% interval per metric", _img(_plot_lift(analysis))),
        "latency": ("Latency distribution by variant (per-user mean, ms)", _img(_plot_latency(analysis))),
        "srm": (f"Cumulative users per arm: {verdict} (p={srm.p_value:.3g})", _img(_plot_users(analysis))),
        "sequential": ("Always-valid interval over time", _img(_plot_sequential(analysis))),
        "method": ("Method", _METHOD),
    }
    body = "".join(
        f'<section id="{sid}"><h2>{_e(head)}</h2>{content}</section>' for sid, (head, content) in sections.items()
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body}</body></html>"
    )


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
    "img{max-width:100%}.note{color:#a33}"
)
_METHOD = (
    "<p>Users are the unit: ClickHouse returns per arm only counts, sums, sums of squares and cross products of "
    "per-user values. Mean metrics: CUPED with the same metric in the pre-period (users without one get 0), else "
    "Welch. Ratio metrics (cost per image, rejection and failure rates): delta method. Quantiles: order-statistic "
    "interval of Deng, Knoblich &amp; Yu (2018) on per-user values. P-values are Holm-adjusted. The sequential "
    "interval (mixture SPRT) stays valid however often it is looked at. Intervals are withheld when an arm has too "
    "few users.</p>"
)


def _plot_lift(analysis: Analysis) -> bytes:
    plt = _pyplot()
    rows = analysis.results[analysis.results["segment"] == "all"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    for i, r in enumerate(rows.itertuples()):
        if r.status == "ok" and not math.isnan(r.rel_lift):
            ax.errorbar(
                100 * r.rel_lift,
                i,
                xerr=[[100 * (r.rel_lift - r.rel_ci_low)], [100 * (r.rel_ci_high - r.rel_lift)]],
                fmt="o",
                capsize=4,
            )
        else:
            ax.text(0, i, r.note[:80] or r.status, va="center", ha="center", fontsize=8, color="#a33")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [f"{r.metric} ({r.variant})" for r in rows.itertuples()])
    ax.set_xlabel("relative lift over control, %")
    return _png(fig)


def _plot_latency(analysis: Analysis) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    values = [v for v in analysis.latency_values.values() if v.size]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=40) if values else 10
    for variant, v in sorted(analysis.latency_values.items()):
        if v.size:
            ax.hist(
                v,
                bins=bins,
                histtype="step",
                density=True,
                lw=1.5,
                label=f"{variant} (p50 {np.median(v):.0f}, p95 {np.quantile(v, 0.95):.0f})",
            )
    ax.set_xlabel("latency, ms")
    ax.legend()
    return _png(fig)


def _plot_users(analysis: Analysis) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for variant, g in analysis.users_over_time.groupby("variant"):
        ax.plot(g["time"], g["users"], marker=".", label=variant)
    ax.set_ylabel("users enrolled")
    ax.legend()
    _time_axis(fig, ax, analysis.users_over_time["time"])
    return _png(fig)


def _plot_sequential(analysis: Analysis) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    seq = analysis.sequential.dropna(subset=["abs_lift"])
    for variant, g in seq.groupby("variant"):
        ax.plot(g["time"], g["abs_lift"], marker=".", label=f"{variant} - control")
        ax.fill_between(g["time"], g["ci_low"].astype(float), g["ci_high"].astype(float), alpha=0.2)
    if seq.empty:
        ax.text(
            0.5,
            0.5,
            f"fewer than {analysis.min_users_per_arm} users per arm at every look",
            ha="center",
            transform=ax.transAxes,
        )
    else:
        ax.set_ylabel(f"{seq['metric'].iloc[0]}: treatment - control")
        ax.legend()
    ax.axhline(0, color="grey", lw=1)
    _time_axis(fig, ax, seq["time"])
    return _png(fig)


def _time_axis(fig: Any, ax: Any, times: pd.Series) -> None:
    """Dates on x; a single look gets a day around it, not matplotlib's default span of years."""
    if len(times) and times.min() == times.max():
        ax.set_xlim(times.min() - pd.Timedelta(hours=12), times.max() + pd.Timedelta(hours=12))
    fig.autofmt_xdate()


def _pyplot():  # noqa: ANN202 - the module is imported lazily, so it has no annotation to give
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _png(fig: object) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    _pyplot().close(fig)
    return buffer.getvalue()


def _img(png: bytes) -> str:
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _e(text: str) -> str:
    return html.escape(str(text))
