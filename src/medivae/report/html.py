"""HTML building blocks: escaped text, generic tables for nested results, embedded images, the page."""

from __future__ import annotations

import base64
import html
import math
import struct

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MAX_INLINE_LIST = 12  # longer lists are summarised, with the values in a <details>
MAX_DEPTH = 5


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """One cell: 4 significant digits for floats; ints exactly (seeds must be copyable)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return esc(value)


def label(key) -> str:
    return esc(str(key).replace("_", " "))


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def value_html(v, depth: int = 0) -> str:
    """Any JSON value as HTML: scalars inline, lists summarised, dicts as nested tables."""
    if _is_scalar(v):
        return fmt(v)
    if isinstance(v, dict):
        return table(v, depth + 1) if depth < MAX_DEPTH else f"<code>{esc(v)}</code>"
    if all(_is_scalar(x) for x in v):
        return _list_html(v)
    if all(isinstance(x, dict) for x in v) and depth < MAX_DEPTH:
        return records_table(v, depth + 1)
    return f"{len(v)} items"


def _list_html(v: list) -> str:
    if len(v) <= MAX_INLINE_LIST:
        return ", ".join(fmt(x) for x in v) or "(empty)"
    numbers = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if len(numbers) < len(v):
        return f"{len(v)} items"  # long string lists (e.g. file names) are never spelled out
    mean = sum(numbers) / len(v)
    summary = f"{len(v)} values, min {fmt(min(numbers))}, mean {fmt(mean)}, max {fmt(max(numbers))}"
    return f"<details><summary>{summary}</summary>{', '.join(fmt(x) for x in v)}</details>"


def table(d: dict, depth: int = 0) -> str:
    """A dict as key/value rows; entries that are flat records sharing their keys (method x metric,
    model vs floor) are gathered into one matrix below the rows."""
    if not d:
        return "<p class='muted'>(empty)</p>"
    flat = {k: v for k, v in d.items() if _is_record(v)}
    if len(flat) < 2 or not _shared_keys(flat.values()):
        flat = {}
    rows = "".join(
        f"<tr><th>{label(k)}</th><td>{value_html(v, depth)}</td></tr>" for k, v in d.items() if k not in flat
    )
    return (f"<table class='kv'>{rows}</table>" if rows else "") + (matrix_table(flat) if flat else "")


def blocks(d: dict) -> str:
    """A top-level dict: its scalars in one table, each nested dict in its own titled column."""
    parts = {k: v for k, v in d.items() if isinstance(v, dict)}
    if len(parts) >= 2 and _shared_keys(parts.values()) and all(map(_is_record, parts.values())):
        return table(d)  # a method x metric matrix reads better than columns
    rest = {k: v for k, v in d.items() if k not in parts}
    cols = "".join(f"<div><h3>{label(k)}</h3>{table(v, 1)}</div>" for k, v in parts.items())
    return (table(rest) if rest else "") + (f"<div class='cols'>{cols}</div>" if cols else "")


def _is_record(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(map(_is_scalar, v.values()))


def _shared_keys(records) -> bool:
    keys = [set(r) for r in records]
    return len(set.intersection(*keys)) >= 0.5 * len(set.union(*keys))


def matrix_table(d: dict) -> str:
    cols = list(dict.fromkeys(k for v in d.values() for k in v))
    head = "<tr><th></th>" + "".join(f"<th>{label(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><th>{label(name)}</th>" + "".join(f"<td>{fmt(row.get(c))}</td>" for c in cols) + "</tr>"
        for name, row in d.items()
    )
    return f"<table class='grid'>{head}{body}</table>"


def records_table(rows: list[dict], depth: int = 0) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "<tr>" + "".join(f"<th>{label(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        "<tr>" + "".join(f"<td>{value_html(r.get(c), depth)}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table class='grid'>{head}{body}</table>"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def image(data: bytes, alt: str, caption: str = "", suffix: str = ".png", pixelated: bool = False) -> str:
    """An <img> with the picture inlined as a base64 data URI; small grids are shown enlarged."""
    uri = f"data:{MIME.get(suffix.lower(), 'image/png')};base64,{base64.b64encode(data).decode('ascii')}"
    size = png_size(data) if suffix.lower() == ".png" else None
    style = ""
    if pixelated and size:  # integer zoom keeps pixels square; bounded so grids fit on a laptop screen
        style = f" style='width:{size[0] * max(1, min(880 // size[0], 560 // size[1]))}px'"
    cls = " class='pixelated'" if pixelated else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure><img src='{uri}' alt='{esc(alt)}'{cls}{style}>{cap}</figure>"


def note(text: str, kind: str = "missing") -> str:
    return f"<p class='note {kind}'>{text}</p>"


def command(cmd: str) -> str:
    return f"<code>{esc(cmd)}</code>"


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{esc(anchor)}'><h2>{esc(title)}</h2>{body}</section>"


STYLE = """
:root { color-scheme: light; --fg: #1d2733; --muted: #5b6673; --line: #d8dee6; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #f5f7fa;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #17324d; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c9d6e3; }
nav { padding: 8px 28px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 28px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 6px 20px 16px;
          margin: 18px 0; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 3px 9px; text-align: left; vertical-align: top; }
td { max-width: 520px; overflow-wrap: anywhere; }
th { background: #eef2f6; font-weight: 600; }
table.grid td { text-align: right; font-variant-numeric: tabular-nums; }
table table { margin: 0; }
figure { display: inline-block; margin: 8px 18px 8px 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
img.pixelated { image-rendering: pixelated; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 3px; max-width: 640px; }
.note { padding: 8px 12px; border-radius: 6px; margin: 8px 0; }
.missing { background: #fff6e0; border: 1px solid #f0d48a; }
.problem { background: #fdeaea; border: 1px solid #eba5a5; }
.muted { color: var(--muted); }
code { background: #eef2f6; padding: 1px 5px; border-radius: 4px; font-size: 13px; }
pre { background: #f3f5f8; padding: 10px; overflow-x: auto; font-size: 12.5px; }
ul.facts { columns: 2; padding-left: 18px; }
.cols { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
details summary { cursor: pointer; color: var(--accent); }
footer { color: var(--muted); font-size: 12.5px; text-align: center; padding: 10px; }
"""


def page(title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[str], footer: str) -> str:
    links = "".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t in nav)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{subtitle}</p></header><nav>{links}</nav>"
        f"<main>{''.join(sections)}</main><footer>{footer}</footer></body></html>\n"
    )
