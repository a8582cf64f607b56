"""Charts for the dashboard, drawn server-side by matplotlib as inline SVG (no JavaScript needed).

matplotlib's Figure API (not pyplot) keeps no global state, so charts can be drawn in the web
server's threads concurrently.
"""
from __future__ import annotations

import io

from matplotlib.figure import Figure

from ..admin.queries import NOT_ASSESSABLE, RESULTS, PeriodStats

COLOURS = {"normal": "#4c9a5b", "osteopenia": "#e0a526", "osteoporosis": "#c0392b", NOT_ASSESSABLE: "#9aa0a6"}
LABELS = {"normal": "normal", "osteopenia": "osteopenia", "osteoporosis": "osteoporosis",
          NOT_ASSESSABLE: "not assessable"}


def _svg(fig: Figure, title: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # inline: drop the XML prolog and DOCTYPE
    # an accessible name for screen readers and for tests
    return svg.replace("<svg ", f'<svg role="img" aria-label="{title}" ', 1)


def volume_chart(periods: list[PeriodStats], title: str = "Studies screened per period, by result") -> str:
    """Stacked bars: screened studies per period by result."""
    fig = Figure(figsize=(7.5, 2.8))
    ax = fig.add_subplot()
    x = list(range(len(periods)))
    bottom = [0] * len(periods)
    for result in RESULTS:
        values = [p.by_result.get(result, 0) for p in periods]
        ax.bar(x, values, bottom=bottom, color=COLOURS[result], label=LABELS[result], width=0.75)
        bottom = [b + v for b, v in zip(bottom, values)]
    _period_axis(ax, periods)
    ax.set_ylabel("studies")
    ax.legend(fontsize=7, ncols=4, loc="upper left", frameon=False, bbox_to_anchor=(0, 1.18))
    return _svg(fig, title)


def positive_rate_chart(periods: list[PeriodStats], title: str = "Positive rate per period") -> str:
    """Share of assessed studies that screened positive, per period (gaps where nothing was assessed)."""
    fig = Figure(figsize=(7.5, 2.4))
    ax = fig.add_subplot()
    x = list(range(len(periods)))
    rates = [None if p.positive_rate is None else 100 * p.positive_rate for p in periods]
    ax.plot(x, [float("nan") if r is None else r for r in rates], marker="o", color=COLOURS["osteoporosis"])
    _period_axis(ax, periods)
    ax.set_ylabel("% positive")
    ax.set_ylim(0, max([r for r in rates if r is not None] + [10]) * 1.15)
    return _svg(fig, title)


def _period_axis(ax, periods: list[PeriodStats]) -> None:
    step = max(1, len(periods) // 12)
    ax.set_xticks(range(0, len(periods), step), [periods[i].period for i in range(0, len(periods), step)],
                  fontsize=7, rotation=30, ha="right")
    ax.tick_params(axis="y", labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", alpha=0.3)


WINDOW_COLOURS = {"reference": "#4c78a8", "recent": "#c0392b", None: "#9aa0a6"}


def drift_chart(points: list[dict], title: str) -> str:
    """One scanner group's studies in arrival order: the mean out-of-distribution score (above 1:
    refused) and the mean T-score per study, the reference and recent windows in their colours."""
    fig = Figure(figsize=(7.5, 3.6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = list(range(len(points)))
    for ax, key, label in ((top, "ood_score", "OOD score"), (bottom, "t_score", "T-score")):
        for window in ("reference", None, "recent"):
            xs = [i for i, p in zip(x, points) if p["window"] == window and p[key] is not None]
            ys = [points[i][key] for i in xs]
            ax.scatter(xs, ys, s=9, color=WINDOW_COLOURS[window],
                       label={"reference": "reference window", "recent": "recent window", None: "between"}[window])
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    top.axhline(1.0, color="#555", lw=0.8, ls="--")  # the gate's threshold
    bottom.set_xlabel("studies of the group, oldest first (current calibration)", fontsize=8)
    top.legend(fontsize=7, ncols=3, loc="upper left", frameon=False, bbox_to_anchor=(0, 1.3))
    return _svg(fig, title)
