"""``medivae compare`` rendered: a Markdown or a self-contained HTML table (no torch, no network)."""

from __future__ import annotations

from medivae.report.html import esc, note, page, section
from medivae.runtime.version import __version__


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) or (isinstance(v, float) and abs(v) >= 1000):
        return f"{v:,.0f}"
    return f"{v:.4g}"


def cell_text(c: dict) -> str:
    """"value [lo, hi] (Δ vs first +d, p=...)" for one run's cell."""
    out = _num(c.get("value"))
    if c.get("ci95"):
        out += f" [{_num(c['ci95'][0])}, {_num(c['ci95'][1])}]"
    d = c.get("vs_first")
    if d:
        out += f" (Δ {d['mean_difference']:+.4g}, {p_text(d)})"
    if c.get("other_extractor"):
        out += " (other extractor: see notes)"
    return out


def p_text(d: dict) -> str:
    """"p=0.03", or "p<0.002" when no resample crossed 0: a bootstrap p of 0 only says p < 2 / n_boot."""
    if d["p_value"] == 0 and d.get("n_boot"):
        return f"p<{2 / d['n_boot']:.2g}"
    return f"p={d['p_value']:.3g}"


def _header(cmp: dict) -> list[str]:
    return [f"{r} ({m})" for r, m in zip(cmp["runs"], cmp["models"], strict=True)]


def _legend(cmp: dict) -> str:
    notes = "".join(f"Note: {n}. " for n in cmp.get("notes") or ())
    return notes + (f"{cmp['split']} split of {cmp['data']} ({cmp['n_images']} images). Brackets: 95 % percentile "
            f"bootstrap interval ({cmp['bootstrap']} resamples of the test images; for FD / precision / recall / "
            "density / coverage and the high-frequency power, the interval medivae evaluate saved, real and "
            "generated rows resampled). High-frequency power vs real: the samples' mean spectral power above 1/4 "
            "cycle/pixel over the real images' (1: as much fine detail). Δ, p: paired bootstrap of the per-image "
            "difference from the first run over the images both scored (two-sided).")


def notes(cmp: dict) -> list[str]:
    return [f"note: {n}" for n in cmp.get("notes") or []]


def to_markdown(cmp: dict) -> str:
    head = _header(cmp)
    lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for row in cmp["rows"]:
        lines.append(f"| {row['metric']} | " + " | ".join(cell_text(c) for c in row["values"]) + " |")
    return "\n".join(notes(cmp) + [""] * bool(cmp.get("notes")) + lines) + "\n\n" + _legend(cmp) + "\n"


def to_html(cmp: dict) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in _header(cmp))
    body = "".join(
        f"<tr><th>{esc(row['metric'])}</th>" + "".join(f"<td>{esc(cell_text(c))}</td>" for c in row["values"])
        + "</tr>" for row in cmp["rows"])
    warn = "".join(note(esc(n), "problem") for n in notes(cmp))
    table = (f"{warn}<table class='grid'><tr><th>metric</th>{head}</tr>{body}</table>"
             f"<p class='muted'>{esc(_legend(cmp))}</p>")
    return page("medivae compare", esc(f"{len(cmp['runs'])} runs"), [("compare", "Comparison")],
                [section("compare", "Comparison", table)], f"medivae {esc(__version__)}")
