"""What every report shares: the output directory, matplotlib figures without pyplot, cell
formatting and the one self-contained HTML page (plots inlined as data URIs)."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs.errors import TlctlError

STATUS_COLOURS = {"completed": "#2e7d32", "stopped": "#ef6c00", "error": "#c62828"}
OTHER_COLOUR = "#757575"
_DPI = 110


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def fmt(value: Any) -> str:
    """Short human text for a table cell: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def prepare_out_dir(out_dir: Path) -> Path:
    """Create `out_dir` and prove it writable before any plot is drawn."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".tlctl-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way; it must be a directory"
        raise TlctlError(f"--out: cannot write to {out_dir} ({reason})") from exc
    return out_dir


# --- figures -------------------------------------------------------------------------------


def new_figure(width: float = 8.0, height: float = 4.8):
    """A Figure on the Agg canvas: no pyplot, so no global state and no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def blend(ax):
    """x in axes fraction, y in data units: a label at the right end of a horizontal line."""
    from matplotlib.transforms import blended_transform_factory

    return blended_transform_factory(ax.transAxes, ax.transData)


def no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


# --- CSV and HTML --------------------------------------------------------------------------


def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every key of `rows`, in first-seen order (a CSV header)."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """A table for spreadsheets: every key a column, None as empty."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:75rem;
 padding:0 1rem;color:#222}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem}
dl{display:grid;grid-template-columns:max-content auto;gap:.25rem 1rem}dt{font-weight:600}
dd{margin:0;word-break:break-all}code{font-size:.9em}
img{max-width:100%;border:1px solid #ddd;margin:.5rem 0}
table{border-collapse:collapse;font-size:.85rem;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr.best{background:#eef7ee;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.completed{color:#2e7d32}.stopped{color:#ef6c00}.error{color:#c62828}
.muted{color:#777;font-size:.85rem}
"""


def esc(value: Any) -> str:
    return html.escape(fmt(value), quote=True)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def definitions(items: Iterable[tuple[str, Any]]) -> str:
    """The page's summary: a definition list of (label, value)."""
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def html_table(heads: list[str], rows: Iterable[str]) -> str:
    """`rows` are already-escaped `<tr>…</tr>` strings."""
    head = "".join(f"<th>{esc(h)}</th>" for h in heads)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def write_page(
    path: Path,
    title: str,
    summary: str,
    images: dict[str, Path],
    captions: dict[str, str],
    sections: list[tuple[str, str]],
) -> Path:
    """One page with the PNGs inlined as data URIs, so the file still works when moved."""
    figures = "".join(
        f"<h2>{esc(captions[n])}</h2>"
        f'<img src="{data_uri(p)}" alt="{esc(captions[n])}" data-file="{esc(n)}">'
        for n, p in images.items()
    )
    rest = "".join(f"<h2>{esc(heading)}</h2>{body}" for heading, body in sections)
    generated = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f'<p class="muted">generated {esc(generated)} by tlctl report</p>'
        f"{summary}{figures}{rest}"
        "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
