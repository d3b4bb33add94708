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
from pixelpipe.analytics.report_text import NUMERIC_COLUMNS, TableSection

# The id of each <section>, in order: the SRM verdict first, since a mismatch voids every result after it.
SECTIONS = (
    "srm",
    "summary",
    "goals",
    "guardrails",
    "segments",
    "rollout",
    "power",
    "notes",
    "lift",
    "latency",
    "users",
    "sequential",
    "method",
)
# Readable headers for the table columns that ``Analysis.sections`` names tersely for the terminal.
_HEADERS = {
    "rel. lift [95% CI]": "relative lift [95% CI]",
    "p": "p-value",
    "p (Holm)": "p (Holm-adjusted)",
    "p (harm)": "p (one-sided, harm)",
    "users c/t": "users (control / treatment)",
}


def render_html(analysis: Analysis) -> str:
    """One HTML document with the tables and inline PNG plots; every section has an id (see SECTIONS)."""
    exp = analysis.experiment
    title = f"Experiment {exp.key}"
    srm = analysis.srm
    verdict = "sample-ratio MISMATCH: do not trust these results" if srm.flagged else "no sample-ratio mismatch"
    tables = {s.id: s for s in analysis.sections()}
    goals = tables["goals"]
    segments = tables.get("segments")
    sections = {
        "srm": (
            "Sample-ratio check",
            f'<p class="banner {"bad" if srm.flagged else "ok"}">{_e(analysis.srm_banner())}</p>',
        ),
        "summary": ("Summary", f"<p>{_e(analysis.summary())}</p>"),
        "goals": (goals.title, _table_section(goals) + _list(analysis.method_notes(), "Methods")),
        "guardrails": (tables["guardrails"].title, _table_section(tables["guardrails"])),
        "segments": (
            "By segment",
            _table_section(segments)
            if segments
            else "<p>Not split: <code>--by kind</code> or <code>--by model</code> adds a row per segment.</p>",
        ),
        "rollout": (
            "Rollout",
            _table_section(tables["rollout"]) if "rollout" in tables else "<p>No guarded rollout ramped it.</p>",
        ),
        "power": ("Sample size and power", _power(analysis.power_notes())),
        "notes": ("Notes", _list(analysis.footnotes(), "") or "<p>None.</p>"),
        "lift": ("Relative lift and 95% interval per metric", _img(_plot_lift(analysis))),
        "latency": ("Latency distribution by variant (per-user mean, ms)", _img(_plot_latency(analysis))),
        "users": (f"Cumulative users per arm: {verdict} (p={srm.p_value:.3g})", _img(_plot_users(analysis))),
        "sequential": ("Always-valid interval over time", _img(_plot_sequential(analysis))),
        "method": ("Method", _METHOD),
    }
    body = "".join(
        f'<section id="{sid}"><h2>{_e(head)}</h2>{content}</section>' for sid, (head, content) in sections.items()
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _table_section(section: TableSection) -> str:
    """The explanation, then the table in a container that scrolls sideways rather than widen the page."""
    if not section.rows:
        return f"<p>{_e(_sentence(section.explanation))}</p><p>None.</p>"
    head = "".join(f"<th>{_e(_HEADERS.get(c, c))}</th>" for c in section.columns)
    rows = "".join("<tr>" + "".join(_cell(c, row[c]) for c in section.columns) + "</tr>" for row in section.rows)
    return (
        f"<p>{_e(_sentence(section.explanation))}</p><div class=scroll><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )


def _cell(column: str, text: str) -> str:
    if column == "verdict":
        kind = {"win": "good", "loss": "bad", "guardrail breached": "bad", "ok": "good"}.get(text, "")
        return f'<td class="verdict {kind}">{_e(text)}</td>'
    return f'<td class="{"num" if column in NUMERIC_COLUMNS else "text"}">{_e(text)}</td>'


def _power(lines: list[str]) -> str:
    if not lines:
        return "<p>No goal metric has an interval to size from.</p>"
    return f"<p>{_e(_sentence(lines[0]))}</p>{_list(lines[1:], '')}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _list(lines: list[str], head: str) -> str:
    if not lines:
        return ""
    items = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return (f"<h3>{_e(head)}</h3>" if head else "") + f"<ul>{items}</ul>"


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
    ".scroll{overflow-x:auto;max-width:100%}"
    "table{border-collapse:collapse;font-size:13px;width:100%}"
    "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}th{background:#f3f3f3;text-align:left}"
    "td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
    ".verdict{font-weight:bold;white-space:nowrap}.good{color:#1b5e20}.bad{color:#b71c1c}"
    ".banner{padding:.6em 1em;border-radius:4px}.banner.ok{background:#e8f5e9}"
    ".banner.bad{background:#fdecea;color:#b71c1c;font-weight:bold}"
    "li{overflow-wrap:anywhere}img{max-width:100%}.note{color:#a33}"
)
_METHOD = (
    "<p>Users are the unit: ClickHouse returns per arm only counts, sums, sums of squares and cross products of "
    "per-user values. Mean metrics: CUPED with the same metric in the pre-period, else Welch; users without a "
    "pre-period value get the mean of the users that have one (pooled over arms), so every user counts and the lift "
    "stays unbiased. Ratio metrics (cost per image, rejection and failure rates): delta method. Quantiles: "
    "order-statistic interval of Deng, Knoblich &amp; Yu (2018) on per-user values. Goal p-values are "
    "Holm-adjusted over the goal metrics and treatments only; guardrails are tested one-sided for harm, unadjusted. "
    "The sequential interval (mixture SPRT) stays valid however often it is looked at. Intervals are withheld when "
    "an arm has too few users.</p>"
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
    """One panel per metric: each treatment's difference from the control, with its always-valid interval."""
    plt = _pyplot()
    seq = analysis.sequential.dropna(subset=["abs_lift"])
    metrics = list(dict.fromkeys(seq["metric"])) or [""]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        panel = seq[seq["metric"] == metric]
        for variant, g in panel.groupby("variant"):
            ax.plot(g["time"], g["abs_lift"], marker=".", label=f"{variant} - control")
            ax.fill_between(g["time"], g["ci_low"].astype(float), g["ci_high"].astype(float), alpha=0.2)
        if panel.empty:
            message = f"fewer than {analysis.min_users_per_arm} users per arm at every look"
            ax.text(0.5, 0.5, message, ha="center", transform=ax.transAxes)
        else:
            ax.set_ylabel(f"{metric}: treatment - control")
            ax.legend()
        ax.axhline(0, color="grey", lw=1)
        _time_axis(fig, ax, panel["time"])
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
