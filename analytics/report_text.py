"""The experiment report in words, and as plain text.

``ReportText``, the base of ``report.Analysis``, words an analysis: the SRM banner, the summary, the tables' text
cells, the notes on methods and power, and the footnotes, so the CLI and the HTML (``report_html``) show the same
words. ``Analysis.table`` lays them out as the plain text the CLI prints, no line wider than the page.

``report`` computes everything; this module adds no statistics of its own.
"""

from __future__ import annotations

import datetime
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pixelpipe.analytics import stats
from pixelpipe.analytics import sufficient_stats as ss
from pixelpipe.core.experiments import Experiment

TABLE_WIDTH = 120  # characters per line of the CLI report


@dataclass(frozen=True)
class TableSection:
    """One table of the report as text cells, shared by the CLI and the HTML so both show the same."""

    id: str  # goals, guardrails, segments or rollout
    title: str
    explanation: str
    columns: list[str]
    rows: list[dict[str, str]]


class ReportText:
    """The words of an analysis; the base of ``report.Analysis``, the dataclass whose fields they are made of."""

    # The fields of ``report.Analysis`` that the words read.
    experiment: Experiment
    start: datetime.datetime
    end: datetime.datetime
    metrics: list[str]
    results: pd.DataFrame
    arms: pd.DataFrame
    srm: stats.SrmResult
    notes: list[str]
    alpha: float
    power: pd.DataFrame
    mde: float
    ramp: pd.DataFrame
    revision: int | None
    planned: dict[str, float]

    def table(self, width: int = TABLE_WIDTH) -> str:
        """The report as plain text, as the CLI prints it: SRM first, then goals, guardrails, segments, methods,
        power and notes; the rollout's ramp after the results where a guarded rollout ramped the experiment. No line is
        longer than ``width``: notes are wrapped below the tables, never a column."""
        out = [*_wrap(self.srm_banner(), width), *_wrap(self.summary(), width)]
        for section in self.sections():
            out += ["", *_wrap(f"{section.title}: {section.explanation}", width)]
            out += _text_table(section.columns, section.rows, width) if section.rows else ["  (none)"]
        footer = (("Methods", self.method_notes()), ("Power", self.power_notes()), ("Notes", self.footnotes()))
        for head, lines in footer:
            if lines:
                out += ["", f"{head}:", *(w for line in lines for w in _wrap(line, width, indent="  "))]
        return "\n".join(out)

    def srm_banner(self) -> str:
        """The sample-ratio check in one sentence; it comes before any result, since a mismatch voids them all."""
        users = ", ".join(f"{v}={n}" for v, n in self.users_per_arm().items())
        weights = self.planned or self.experiment.weights
        total = sum(weights.values())
        planned = "/".join(f"{w / total:.0%}" for w in weights.values())
        if self.srm.flagged:
            return (
                f"SRM: MISMATCH (p={self.srm.p_value:.2g}): users {users} do not match the planned {planned} split. "
                "Assignment or logging is broken: do not trust any result below until the cause is found."
            )
        return f"SRM: ok (p={self.srm.p_value:.3g}): users {users} match the planned {planned} split."

    def summary(self) -> str:
        exp = self.experiment
        lower = [m for m in self.metrics if ss.METRICS[m].better == "lower"]
        higher = [m for m in self.metrics if ss.METRICS[m].better == "higher"]
        better = "; ".join(
            f"{way} is better for {', '.join(ms)}" for way, ms in (("lower", lower), ("higher", higher)) if ms
        )
        return (
            f"{exp.key} compares {' and '.join(exp.treatments)} with {exp.control} (the control arm) from "
            f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"
            f"{'' if self.revision is None else f', users assigned under revision {self.revision}'}. "
            "Lifts are relative to the control, "
            f"with {1 - self.alpha:.0%} intervals; {better}."
        )

    def sections(self) -> list[TableSection]:
        """Goal metrics, guardrails, (with a dimension) the per-segment rows and (after a guarded rollout) its ramp,
        as text cells."""
        res = self.results
        overall = res[res["segment"] == "all"]
        several = len(self.experiment.treatments) > 1
        refs = self._note_refs()
        goals = overall[overall["family"] == "goal"]
        tests = int(self._goal_tests().sum())
        metrics = goals["metric"].nunique()
        sections = [
            TableSection(
                "goals",
                "Goal metrics",
                f"win or loss when p (Holm) < {self.alpha:g} in the better or worse direction, else inconclusive; "
                f"Holm over {_plural(tests, 'goal test')} ({_plural(metrics, 'metric')} x "
                f"{_plural(len(self.experiment.treatments), 'treatment')}), guardrails excluded.",
                *self._cells(goals, several, False, "goal", refs),
            ),
            TableSection(
                "guardrails",
                "Guardrails",
                f"breached when the metric worsens with one-sided p (harm) < {self.alpha:g}, not adjusted for "
                "multiplicity: a missed harm costs more than a false alarm, so each guardrail keeps its full power.",
                *self._cells(overall[overall["family"] == "guardrail"], several, False, "guardrail", refs),
            ),
        ]
        segments = res[res["segment"] != "all"]
        if not segments.empty:
            sections.append(
                TableSection(
                    "segments",
                    "By segment",
                    "exploratory: p-values are not adjusted and rows get no verdict; act on the overall rows above.",
                    *self._cells(segments, several, True, "segment", refs),
                )
            )
        if not self.ramp.empty:
            sections.append(self._ramp_section())
        return sections

    def _ramp_section(self) -> TableSection:
        columns = ["time (UTC)", "action", "treatment share", "revision", "reason"]
        rows = [
            {
                "time (UTC)": f"{r.time:%Y-%m-%d %H:%M:%S}",
                "action": r.action,
                "treatment share": f"{r.percent_before:g}% -> {r.percent_after:g}%",
                "revision": str(r.revision),
                "reason": r.reason,
            }
            for r in self.ramp.itertuples()
        ]
        return TableSection(
            "rollout",
            "Rollout",
            f"the guarded rollout's decisions that moved {self.experiment.key} (HOLDs left out but the latest); each "
            "step is one revision of the experiment, and results name the revision they were assigned under.",
            columns,
            rows,
        )

    def method_notes(self) -> list[str]:
        """How each overall row was computed where that needs a word: CUPED's variance reduction and coverage, and
        why a mean metric fell back to Welch."""
        lines = []
        for r in self.results[(self.results["segment"] == "all") & (self.results["status"] == "ok")].itertuples():
            label = self._label(r.metric, r.variant)
            if r.method == "CUPED":
                covered = (
                    "every user has one"
                    if r.pre_coverage >= 1
                    else (f"{r.pre_coverage:.0%} of users have one; the others get the covered users' mean")
                )
                lines.append(
                    f"{label}: CUPED removed {r.variance_reduction:.0%} of the lift's variance "
                    f"(1 - Var(CUPED)/Var(Welch)) using the pre-period value; {covered}."
                )
            elif r.method_note:
                lines.append(f"{label}: Welch, not CUPED: {r.method_note}")
        return lines

    def power_notes(self) -> list[str]:
        """Users per arm to detect a relative lift of ``mde`` on each goal metric, from the observed variance."""
        if self.power.empty:
            return []
        tests = int(self._goal_tests().sum())
        lines = [
            f"users per arm to detect a {self.mde:.0%} relative lift with {stats.POWER:.0%} power, two-sided at "
            f"{self.alpha:g}/{tests} (Holm's strictest step), from the observed variance (after CUPED where used):"
        ]
        for r in self.power.itertuples():
            needed = f"{r.users_needed:,}" if r.users_needed == r.users_needed else "n/a"
            lines.append(
                f"{self._label(r.metric, r.variant)}: {needed} per arm; with {r.n_control:,}/{r.n_treatment:,} "
                f"now it detects a lift of ±{r.mde_now:.1%}."
            )
        return lines

    def footnotes(self) -> list[str]:
        """The numbered notes that rows without an interval point to, then general notes."""
        return [f"{n}. {text}" for n, text in enumerate(self._note_texts(), start=1)] + self.notes

    def users_per_arm(self) -> dict[str, int]:
        """Users of each variant in the window, over all segments."""
        overall = self.arms[self.arms["segment"] == "all"]
        return dict(zip(overall["variant"], overall["users"].astype(int), strict=True))

    def _goal_tests(self) -> pd.Series:
        """Rows of the Holm family: goal metrics x treatments of the overall segment, with an interval."""
        res = self.results
        return (res["segment"] == "all") & (res["family"] == "goal") & (res["status"] == "ok")

    def _label(self, metric: str, variant: str, segment: str = "all") -> str:
        parts = [variant] if len(self.experiment.treatments) > 1 else []
        parts += [segment] if segment != "all" else []
        return f"{metric} ({', '.join(parts)})" if parts else metric

    def _note_texts(self) -> list[str]:
        bad = self.results[self.results["status"] != "ok"]
        return [f"{self._label(r.metric, r.variant, r.segment)}: {r.note}" for r in bad.itertuples()]

    def _note_refs(self) -> dict[int, int]:
        """Results index -> number of its note, for rows without an interval."""
        bad = self.results.index[self.results["status"] != "ok"]
        return {i: n for n, i in enumerate(bad, start=1)}

    def _cells(
        self, rows: pd.DataFrame, several: bool, segmented: bool, kind: str, refs: dict[int, int]
    ) -> tuple[list[str], list[dict[str, str]]]:
        p_head = {"goal": "p (Holm)", "guardrail": "p (harm)"}.get(kind)
        columns = [*(["segment"] if segmented else []), "metric", *(["variant"] if several else []), "method"]
        # A guardrail's verdict rests on its one-sided p alone, so its two-sided p would only confuse.
        columns += ["control", "treatment", "rel. lift [95% CI]", *(["p"] if kind != "guardrail" else [])]
        columns += [p_head] if p_head else []
        columns += [*(["verdict"] if kind != "segment" else []), "users c/t"]
        cells = []
        for i, r in rows.iterrows():
            unit = ss.METRICS[r["metric"]].unit
            ok = r["status"] == "ok"
            row = {
                "segment": str(r["segment"]),
                "metric": str(r["metric"]),
                "variant": str(r["variant"]),
                "method": str(r["method"]),
                "control": _fmt_value(r["control"], unit) if ok else "",
                "treatment": _fmt_value(r["treatment"], unit) if ok else "",
                "rel. lift [95% CI]": _fmt_lift(r, unit) if ok else f"{r['status']}: see note {refs[i]}",
                "p": _fmt_p(r["p_value"]) if ok else "",
                "p (Holm)": _fmt_p(r["p_holm"]) if ok else "",
                "p (harm)": _fmt_p(r["p_harm"]) if ok else "",
                "verdict": str(r["verdict"]),
                "users c/t": f"{int(r['n_control'])}/{int(r['n_treatment'])}",
            }
            cells.append({c: row[c] for c in columns})
        return columns, cells


# The columns of numbers: right-aligned in the text report, styled as numbers in the HTML one.
NUMERIC_COLUMNS = frozenset(
    {
        "control",
        "treatment",
        "rel. lift [95% CI]",
        "p",
        "p (Holm)",
        "p (harm)",
        "users c/t",
        "treatment share",
        "revision",
    }
)
_OPTIONAL = ("users c/t", "p")  # left out, in this order, when a table is wider than the page
_SHRINKABLE = ("segment", "variant", "metric", "method", "reason")  # then the longest of these is cut


def _text_table(columns: Sequence[str], rows: Sequence[dict[str, str]], width: int) -> list[str]:
    """Rows as aligned text no wider than ``width``: optional columns go first, then long names are cut."""
    columns, rows = list(columns), [dict(r) for r in rows]
    dropped = []
    for column in _OPTIONAL:
        if _table_width(columns, rows) <= width:
            break
        if column in columns:
            columns.remove(column)
            dropped.append(column)
    while _table_width(columns, rows) > width:
        shrinkable = [c for c in _SHRINKABLE if c in columns]
        column = max(shrinkable, key=lambda c: max(len(r[c]) for r in rows), default=None)
        longest = max(len(r[column]) for r in rows) if column else 0
        if column is None or longest <= max(len(column), 8):
            break
        for r in rows:
            if len(r[column]) == longest:
                r[column] = r[column][: longest - 4] + "..."
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(
            cells[c].rjust(widths[c]) if c in NUMERIC_COLUMNS else cells[c].ljust(widths[c]) for c in columns
        )

    lines = [line({c: c for c in columns}), *(line(r) for r in rows)]
    if dropped:
        lines.append(f"({', '.join(dropped)} left out to fit {width} characters; see the HTML report)")
    return [text.rstrip()[:width] for text in lines]  # the cut is a last resort that the steps above avoid


def _table_width(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> int:
    return sum(max(len(c), *(len(r[c]) for r in rows)) for c in columns) + 2 * (len(columns) - 1)


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    number = re.match(r"\d+\. ", text)  # a numbered note continues under its text
    hang = indent + " " * (len(number.group()) if number else 2)
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=hang, break_on_hyphens=False)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt_value(value: float, unit: str) -> str:
    if value is None or value != value:
        return ""
    if unit == "share":
        return f"{value:.2%}"
    if 1000 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _fmt_pct(value: float) -> str:
    return f"{value:+.0%}" if abs(value) >= 10 else f"{value:+.1%}"


def _fmt_lift(row: pd.Series, unit: str) -> str:
    """Relative lift and interval; over a zero control (no relative lift) the absolute one, marked as such."""
    if row["rel_lift"] == row["rel_lift"]:
        return f"{_fmt_pct(row['rel_lift'])} [{_fmt_pct(row['rel_ci_low'])}, {_fmt_pct(row['rel_ci_high'])}]"
    lift, low, high = row["abs_lift"], row["abs_ci_low"], row["abs_ci_high"]
    if unit == "share":
        return f"{100 * lift:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] pp"
    return f"{lift:+.4g} [{low:+.4g}, {high:+.4g}] abs."


def _fmt_p(p: float) -> str:
    if p != p:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"
