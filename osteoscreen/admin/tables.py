"""Plain-text tables and value formatting for the `osteoscreen db` commands (no dependency, no colour).

`render` lays rows out in aligned columns: every line of a table has the same width, and a cell longer
than its column's limit is cut with "…". The helpers format what the query layer returns (datetimes are
naive UTC, T-scores floats or None, site results `queries.SiteResult`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

ELLIPSIS = "…"
EMPTY = "-"
SITE_NAMES = {"left_hip": "L hip", "right_hip": "R hip", "lumbar_spine": "lumbar"}


def truncate(text: str, width: int) -> str:
    """text, cut to at most `width` characters (the last one "…" when cut)."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[:width - 1] + ELLIPSIS


def cell(value) -> str:
    """One cell's text: None is "-", anything else str() on a single line."""
    if value is None:
        return EMPTY
    if not isinstance(value, str):
        return str(value)
    # DICOM text (names) can carry control characters: no escape sequence reaches the terminal
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


def render(headers: Sequence[str], rows: Sequence[Sequence], *, max_width: int = 40,
           widths: Mapping[int, int] | None = None, right: Sequence[int] = (),
           footer: Sequence[Sequence] = (), indent: str = "") -> str:
    """Rows under headers in aligned columns separated by two spaces, a dashed line under the headers
    (and above the footer rows, e.g. totals). Column i holds at most widths[i] (else max_width)
    characters; columns listed in `right` are right-aligned (numbers). Every line has the same width."""
    body = [[cell(v) for v in row] for row in rows]
    foot = [[cell(v) for v in row] for row in footer]
    limits = [(widths or {}).get(i, max_width) for i in range(len(headers))]
    for row in body + foot:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns")
    cols = [max([len(truncate(h, limits[i]))] + [len(truncate(r[i], limits[i])) for r in body + foot])
            for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, text in enumerate(cells):
            text = truncate(text, cols[i])
            parts.append(text.rjust(cols[i]) if i in right else text.ljust(cols[i]))
        return indent + "  ".join(parts)

    separator = indent + "  ".join("-" * w for w in cols)
    lines = [line(headers), separator, *(line(r) for r in body)]
    if foot:
        lines += [separator, *(line(r) for r in foot)]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]], indent: str = "  ") -> str:
    """Label/value lines, labels padded to one width (a record's header)."""
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{indent}{label.ljust(width)}  {cell(value)}" for label, value in pairs)


def interval(finding: dict) -> str:
    """A finding's prediction interval, "-3.1..-1.9 (90%)", or "-"."""
    low, high, level = finding.get("t_score_low"), finding.get("t_score_high"), finding.get("interval_level")
    if low is None or high is None:
        return "-"
    return f"{t_score(low)}..{t_score(high)}" + (f" ({100 * level:.0f}%)" if level else "")


def t_score(value: float | None) -> str:
    return EMPTY if value is None else f"{value:+.1f}"


def when(value: datetime | None, seconds: bool = False) -> str:
    """A naive UTC datetime as "2026-11-02 09:00" (the tables say the zone once)."""
    if value is None:
        return EMPTY
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def dicom_date(value: str | None) -> str:
    """A DICOM DA "20261117" as "2026-11-17" (anything else unchanged)."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return cell(value)


def result(value: str | None) -> str:
    """A study's or site's result for reading: not_assessable → "not assessable"; None → "-"."""
    return EMPTY if value is None else value.replace("_", " ")


def yes(flag: bool | None) -> str:
    return "yes" if flag else ""


def percent(rate: float | None) -> str:
    return EMPTY if rate is None else f"{rate * 100:.1f}%"


def site_name(site: str) -> str:
    return SITE_NAMES.get(site, site)


def site_summary(sites: Mapping) -> str:
    """"L hip osteoporosis -2.9 · R hip normal -0.2", "lumbar n/a (metal_implant)"; "" without sites."""
    parts = []
    for name, r in sites.items():
        if r.assessable:
            t = f" {t_score(r.t_score)}" if r.t_score is not None else ""
            parts.append(f"{site_name(name)} {r.category}{t}")
        else:
            parts.append(f"{site_name(name)} n/a ({r.reason or 'unknown'})")
    return " · ".join(parts)
