"""Helpers the benchmark scripts share: the commit a result was made at, what a reused run holds, the data sets
the staged benchmarks name, and readers of what ``medivae evaluate`` and ``medivae synthesize`` write.

The scripts run as files (``python benchmarks/NAME.py``), so this folder is on ``sys.path`` and they
import ``common`` directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the folder of worktrees it sits in)
SHARED = next((p / "shared" / "data" for p in ROOT.parents[:2] if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data")
MEDNIST = SHARED / "mednist" / "MedNIST.tar.gz"
DATA = {  # name -> medivae train data arguments
    "pneumonia32": ["--data", str(SHARED / "pneumoniamnist.npz"), "--image-size", "32"],
    "cxr64": ["--data", str(MEDNIST), "--labels", "CXR", "--image-size", "64"],
    "hand64": ["--data", str(MEDNIST), "--labels", "Hand", "--image-size", "64"],
    "headct64": ["--data", str(MEDNIST), "--labels", "HeadCT", "--image-size", "64"],
    "phantoms32": ["--data", "phantoms:200", "--image-size", "32"],  # the smoke tests' (tests/test_benchmarks.py)
}
SEED0 = 1767661200070  # the article's seed (medivae's default); seed i of a staged benchmark is SEED0 + i
SAMPLE_METRICS = ("fd", "precision", "recall", "density", "coverage", "hf_power_ratio")  # hf: generated over real


CODE = ("src", "benchmarks", ":(exclude)benchmarks/results")  # the code that makes the numbers (not the numbers)


def git_commit(root: Path = ROOT) -> str:
    """HEAD of the checkout the benchmark runs from ("" outside git), with ``+dirty.<8 hex digits>`` (a hash of the
    uncommitted changes) when ``src/`` or ``benchmarks/`` differ from it: a record never names a commit whose
    code did not make it, and work folders kept per commit are not shared by different edits."""
    def git(*args) -> bytes:
        return subprocess.run(["git", *args], cwd=root, capture_output=True).stdout

    try:
        head = git("rev-parse", "HEAD").decode().strip()
        if not head:
            return ""
        changes = hashlib.sha1(git("diff", "HEAD", "--", *CODE))
        for name in sorted(git("ls-files", "--others", "--exclude-standard", "-z", "--", *CODE).split(b"\0")):
            if name:  # a new file not yet committed is a change too
                changes.update(name + b"\0" + (Path(root) / name.decode()).read_bytes())
    except OSError:
        return ""
    clean = changes.hexdigest() == hashlib.sha1(b"").hexdigest()
    return head if clean else f"{head}+dirty.{changes.hexdigest()[:8]}"


def still_at(commit: str) -> None:
    """Stop before a record is written when the checkout moved off ``commit`` while the benchmark ran (a commit,
    a checkout or an edit under src/ or benchmarks/): the commands it ran later may have imported other code, so
    no single commit made its numbers. Run long benchmarks from a checkout nobody works in."""
    now = git_commit()
    if now != commit:
        raise SystemExit(f"the checkout at {ROOT} moved from {commit or 'no commit'} to {now or 'no commit'} while the "
                         "benchmark ran: no record written (run it from a checkout nobody changes)")


def commit_key(commit: str) -> str:
    """The short name of a commit (7 hex digits, and ``+dirty.<hash>`` when the code had uncommitted changes),
    as work folders and tables show it."""
    head, plus, dirty = commit.partition("+")
    return head[:7] + plus + dirty


@contextlib.contextmanager
def json_lock(path: Path) -> Iterator[None]:
    """Hold the lock of result file ``path`` (a sidecar in the temporary folder, one per file name: calls that
    write one JSON file side by side take turns; the folder of results gets no lock files)."""
    with open(Path(tempfile.gettempdir()) / f"medivae_{Path(path).stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: Path, update: Callable[[dict], dict], empty: dict) -> dict:
    """Read result file ``path`` (``empty`` when absent), apply ``update`` and write it back atomically, all
    under :func:`json_lock`: a benchmark running beside this one cannot lose the record it adds meanwhile."""
    from medivae.runtime.io import atomic_write_text

    path = Path(path)
    with json_lock(path):
        result = update(json.loads(path.read_text()) if path.exists() else empty)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    return result


def trained_epochs(out: Path) -> int:
    """Epochs a run's last/ checkpoint holds (0 when there is none)."""
    state = Path(out) / "last" / "state.json"
    return json.loads(state.read_text())["epoch"] if state.exists() else 0


def run_settings(run_dir: Path) -> dict:
    """What trained a run (its config.json): a finished run is reused, so the JSON says what made it."""
    c = json.loads((Path(run_dir) / "config.json").read_text())
    m, t, d = c["model"], c["train"], c["data"]
    return {
        "source": d["source"],
        "labels": d["labels"],
        "model": m["name"],
        "image_size": m["image_size"],
        "latent_dim": m["latent_dim"],
        "likelihood": m["likelihood"],
        "beta": m["beta"],
        "epochs": t["epochs"],
        "epochs_trained": trained_epochs(run_dir),
        "batch_size": t["batch_size"],
        "seed": t["seed"],
    }


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def medivae(*args) -> dict:
    """Run one ``medivae`` command (printed first; its output goes to stderr): {wall_seconds, cpu_seconds,
    load_before, load_after}. Stops the script with the command's exit code when it fails."""
    args = [str(a) for a in args]
    print("$ medivae", " ".join(args), file=sys.stderr, flush=True)
    before, load, start = children_cpu(), load_average(), time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "medivae", *args], stdout=sys.stderr).returncode
    if code:
        raise SystemExit(f"medivae {args[0]} exited with {code} (its message is above)")
    return {"wall_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(children_cpu() - before, 1),
            "load_before": load, "load_after": load_average()}


def sample_quality(run_dir: Path, sampler: str) -> dict:
    """The sample-quality block ``medivae evaluate RUN --sampler S`` left in RUN/results.json (the next
    evaluation of the run overwrites it): the generated images' and the real-vs-real floor's metrics, their
    95 % bootstrap intervals ({fd, ..., floor_fd, ...}: None where not given) and what they were measured with."""
    ev = json.loads((Path(run_dir) / "results.json").read_text())["evaluation"]
    q = ev["sample_quality"]
    if q is None or q.get("sampler") != sampler:
        raise SystemExit(f"{run_dir}/results.json holds no sample quality for --sampler {sampler}")
    ci = ev.get("ci95") or {}
    keys = ("fd_name", "reference_hash", "n_generated", "n_reference", "n_held_out", "held_out_split",
            "reference_split")
    return {"n_images": ev["n_images"], "split": ev["split"], **{k: q[k] for k in keys}, "model": q["model"],
            "floor": q["floor"], "ci95": {k: ci.get(k) for m in SAMPLE_METRICS for k in (m, f"floor_{m}")},
            "neg_elbo_nats": (ev["likelihood"] or {}).get("neg_elbo_nats")}


def privacy(folder: Path) -> dict:
    """What ``medivae synthesize ... --out FOLDER`` measured (FOLDER/memorisation.json): the memorisation
    rate and its interval, nearest-neighbour distances per space, membership-inference AUROCs."""
    rep = json.loads((Path(folder) / "memorisation.json").read_text())
    nn = {name: {"synthetic_median": s["synthetic_distance_percentiles"]["50"],
                 "held_out_recon_median": s["real_distance_percentiles"]["50"],
                 "synthetic_p1": s["synthetic_distance_percentiles"]["1"],
                 "threshold": s["threshold"], "n_rejected": s["n_rejected"]}
          for name, s in rep["spaces"].items()}
    mi = {k: {"auroc": v["auroc"], "ci95": v["ci95"]} for k, v in rep["membership_inference"].items()
          if isinstance(v, dict)}
    return {"n_synthetic": rep["n_synthetic"], "memorisation_rate": rep["memorisation_rate"],
            "memorisation_ci95": rep.get("ci95", {}).get("memorisation_rate"),
            "expected_rate_for_fresh_real_images": rep["expected_rate_for_fresh_real_images"],
            "reference_hash": rep["reference_hash"], "nearest_neighbour": nn, "membership_inference": mi}
