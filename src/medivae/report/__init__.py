"""Run reports: results.json, metrics and PNGs of a run folder rendered to one self-contained HTML file.

This package never imports torch, so reports can be built anywhere matplotlib runs.
"""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir: str | Path) -> str:
    """The report of ``run_dir`` as an HTML string."""
    from medivae.report.render import build

    return build(run_dir)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``) atomically."""
    from medivae.runtime.io import atomic_write_text

    out = Path(run_dir) / "report.html" if out is None else Path(out)
    atomic_write_text(out, build_report(run_dir))
    return out


__all__ = ["build_report", "write_report"]
