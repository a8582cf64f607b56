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
