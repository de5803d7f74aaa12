"""Execute every tutorial (``docs/tutorials/*.py``, jupytext percent format) and keep the executed notebooks.

Each tutorial runs in a fresh kernel (nbclient), in a temporary working folder with its own
``$MEDIVAE_CACHE``, so nothing it writes lands in the repository. A cell that raises stops the tutorial
and this script exits 1, naming the tutorial and the cell. The executed notebook is written beside its
source as ``NAME.ipynb`` (git-ignored), stamped with the source's SHA-256: ``docs/hooks.py`` renders it
with its outputs as long as the source is unchanged.

    python docs/run_tutorials.py                  # all tutorials; prints each one's wall time
    python docs/run_tutorials.py 02_dicom_nifti   # one tutorial
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TUTORIALS = DOCS / "tutorials"
sys.path.insert(0, str(DOCS))


def execute(source: Path, timeout: float) -> tuple[float, float]:
    """Run one tutorial; returns its wall time and the kernel's CPU time in seconds (on a shared machine the
    CPU time says more about its cost). Raises nbclient's CellExecutionError."""
    import jupytext
    import nbformat
    from hooks import source_digest
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    with tempfile.TemporaryDirectory(prefix=f"medivae-{source.stem}-") as work:
        os.environ["MEDIVAE_CACHE"] = str(Path(work) / "cache")  # the kernel inherits it
        start, cpu = time.perf_counter(), _children_cpu()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
        seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu  # the kernel has exited and been reaped
    nb.metadata["medivae"] = {"source_sha256": source_digest(source), "executed": True, "seconds": round(seconds, 1)}
    nbformat.write(nb, source.with_suffix(".ipynb"))
    return seconds, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="tutorial names (default: all)")
    # a tutorial's training cell takes about a minute here; ten times that on a CPU without AVX-512 kernels
    # (ATEN_CPU_CAPABILITY=default) under a load of five exceeded 600 s
    p.add_argument("--timeout", type=float, default=1800, help="seconds one cell may take (default 1800)")
    a = p.parse_args(argv)
    sources = sorted(TUTORIALS.glob("*.py"))
    if a.names:
        sources = [s for s in sources if s.stem in a.names]
    cache = os.environ.get("MEDIVAE_CACHE")
    # the kernels start in temporary folders: a relative PYTHONPATH (e.g. PYTHONPATH=src) must be made absolute
    if os.environ.get("PYTHONPATH"):
        paths = os.environ["PYTHONPATH"].split(os.pathsep)
        os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(x).resolve()) for x in paths)
    for source in sources:
        try:
            seconds, cpu = execute(source, a.timeout)
        except Exception as e:  # noqa: BLE001  (nbclient raises its own errors; say which tutorial)
            print(f"{source.name}: FAILED\n{e}", file=sys.stderr)
            return 1
        finally:
            os.environ.pop("MEDIVAE_CACHE", None) if cache is None else os.environ.update(MEDIVAE_CACHE=cache)
        print(f"{source.name}: {seconds:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
