"""``medivae compare RUN...``: runs evaluated on the same test images, side by side, with intervals.

Reads what ``medivae evaluate`` saved (results.json["evaluation"], RUN/eval_per_image.npz), the anomaly
block when present, and metrics.jsonl; computes nothing with a model. Per-image metrics get a 95 %
percentile-bootstrap interval and, against the first run, a paired bootstrap p-value over the test
images both runs scored (matched by content hash). FD / precision / recall / density / coverage and the
high-frequency power ratio show the intervals evaluate saved (no p-value: their samples are not paired
images). Runs evaluated on other data, another split or other test images are refused unless ``force``.
The five feature metrics of a run scored by another reference extractor than the first run's (an older
medivae's, or another dataset's) are marked and named in ``notes``: they are not on the same scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medivae.evaluation.bootstrap import mean_ci, paired_difference
from medivae.runfolder.config import RunConfig
from medivae.runfolder.results import RESULTS_FILE, read_results
from medivae.runtime.errors import UserError
from medivae.train.metrics import read_metrics

PER_IMAGE_FILE = "eval_per_image.npz"
# (row label, per-image key in eval_per_image.npz or None, where the value sits in results["evaluation"])
ROWS = [
    ("-ELBO (nats/image)", "neg_elbo", ("likelihood", "neg_elbo_nats")),
    ("-IWAE (nats/image)", "neg_iwae", ("likelihood", "neg_iwae_nats")),
    ("-IWAE (bits/dim)", None, ("likelihood", "neg_iwae_bpd")),
    ("PSNR (dB)", "psnr_db", ("reconstruction", "psnr_db")),
    ("SSIM", "ssim", ("reconstruction", "ssim")),
    ("MSE", "mse", ("reconstruction", "mse")),
    ("PSNR, foreground (dB)", "psnr_fg_db", ("reconstruction", "psnr_fg_db")),
    ("SSIM, foreground", "ssim_fg", ("reconstruction", "ssim_fg")),
    ("FD (reference features)", None, ("sample_quality", "model", "fd")),
    ("high-frequency power vs real", None, ("sample_quality", "model", "hf_power_ratio")),
    ("precision", None, ("sample_quality", "model", "precision")),
    ("recall", None, ("sample_quality", "model", "recall")),
    ("density", None, ("sample_quality", "model", "density")),
    ("coverage", None, ("sample_quality", "model", "coverage")),
    ("active units", None, ("collapse", "active_units")),
    ("parameters", None, ("model", "parameters")),
]


def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or tree.get(k) is None:
            return None
        tree = tree[k]
    return tree


def _open(run: Path) -> dict:
    ev = read_results(run / RESULTS_FILE).get("evaluation")
    if not ev:
        raise UserError(f"{run}: no evaluation in results.json; run 'medivae evaluate {run}' first")
    per_path = run / PER_IMAGE_FILE
    if not per_path.is_file():
        raise UserError(f"{run}: no {PER_IMAGE_FILE}; rerun 'medivae evaluate {run}' with this version")
    with np.load(per_path, allow_pickle=False) as d:
        per = {k: d[k] for k in d.files}
    return {"run": run, "ev": ev, "per": per, "results": read_results(run / RESULTS_FILE),
            "metrics": read_metrics(run)}


EXTRACTOR_METRICS = {"fd", "precision", "recall", "density", "coverage"}  # measured in the extractor's features


def _split_seed(o: dict) -> int | None:
    """The seed that split the run's data: saved by evaluate, else read from config.json (where a run made
    before the split had its own seed has its training seed)."""
    if o["ev"].get("split_seed") is not None:
        return o["ev"]["split_seed"]
    try:
        return RunConfig.load(o["run"] / "config.json").data.split_seed
    except UserError:
        return None


def _test_set_differences(a: dict, b: dict) -> list[str]:
    why = []
    for key in ("data", "split"):
        if a["ev"].get(key) != b["ev"].get(key):
            why.append(f"{key} {a['ev'].get(key)!r} vs {b['ev'].get(key)!r}")
    if set(a["per"]["image_hash"].tolist()) != set(b["per"]["image_hash"].tolist()):
        seeds = _split_seed(a), _split_seed(b)
        why.append("different test images" + (f" (split seeds {seeds[0]} vs {seeds[1]}; a run made before "
                                              "data.split_seed split its data with its training seed)"
                                              if seeds[0] != seeds[1] else ""))
    return why


def _same_test_set(opened: list[dict], force: bool) -> list[str]:
    """Refuses runs not evaluated on the same test images (unless ``force``); returns what differs."""
    a, caveats = opened[0], []
    for b in opened[1:]:
        why = _test_set_differences(a, b)
        if why and not force:
            raise UserError(f"{a['run']} and {b['run']} were not evaluated on the same test set "
                            f"({'; '.join(why)}); pass --force to compare anyway")
        caveats += [f"{b['run']} vs {a['run']}: {w} (compared with --force)" for w in why]
    return caveats


def extractor_note(a: dict, b: dict) -> str | None:
    """Why run b's FD / precision / recall / density / coverage are not on run a's scale, or None."""
    qa, qb = (o["ev"].get("sample_quality") or {} for o in (a, b))
    if not qa or not qb:
        return None
    va, vb = qa.get("extractor_version", 1), qb.get("extractor_version", 1)
    if va != vb:
        old = a if va < vb else b
        return (f"{old['run']} was scored by an older reference extractor (version {min(va, vb)}, without the "
                f"fine-detail features): its FD, precision, recall, density and coverage are not comparable; "
                f"rerun 'medivae evaluate {old['run']}'")
    if qa.get("reference_hash") != qb.get("reference_hash"):
        return (f"{b['run']} was scored by another reference extractor than {a['run']} ({qb.get('reference_hash')} "
                f"vs {qa.get('reference_hash')}): its FD, precision, recall, density and coverage are not "
                "comparable")
    return None


def _paired(a: dict, b: dict, key: str, n_boot: int, seed: int) -> dict | None:
    """Paired bootstrap of b - a over the images both runs scored."""
    if key not in a["per"] or key not in b["per"]:
        return None
    ia = {h: i for i, h in enumerate(a["per"]["image_hash"].tolist())}
    pairs = [(ia[h], j) for j, h in enumerate(b["per"]["image_hash"].tolist()) if h in ia]
    if len(pairs) < 2:
        return None
    i, j = np.array(pairs).T
    out = paired_difference(b["per"][key][j], a["per"][key][i], n_boot, seed)
    return None if out is None else {**out, "n_shared": len(pairs)}


def _training(metrics: list[dict]) -> dict:
    ips = [m["images_per_s"] for m in metrics if isinstance(m.get("images_per_s"), (int, float))]
    secs = [m["seconds"] for m in metrics if isinstance(m.get("seconds"), (int, float))]
    return {"images_per_s": float(np.median(ips)) if ips else None, "wall_s": float(sum(secs)) if secs else None,
            "epochs": len(metrics)}


def _anomaly(results: dict) -> dict:
    an = results.get("anomaly") or {}
    score = (an.get("threshold") or {}).get("score", "combined")
    m = (an.get("metrics") or {}).get(score)
    if not m:
        return {}
    ci = (an.get("ci95") or {}).get(score) or {}
    return {"score": score, "auroc": m["auroc"], "auroc_ci95": ci.get("auroc"), "auprc": m["auprc"],
            "auprc_ci95": ci.get("auprc"), "prevalence": an.get("prevalence")}


def _cells(opened: list[dict], key: str | None, path: tuple, other_extractor: list[bool], n_boot: int,
           seed: int) -> list[dict]:
    """One row's cells: the value, its interval, the paired difference from the first run where per-image
    values exist, and ``other_extractor`` for a feature metric measured in another extractor's features."""
    values = []
    for o, other in zip(opened, other_extractor, strict=True):
        v = _get(o["ev"], path)
        cell = {"value": v}
        if key and key in o["per"]:
            cell["ci95"] = mean_ci(o["per"][key], n_boot, seed)
            if o is not opened[0]:
                cell["vs_first"] = _paired(opened[0], o, key, n_boot, seed)
        elif path[0] == "sample_quality" and v is not None:  # evaluate resampled the feature rows
            cell["ci95"] = (o["ev"].get("ci95") or {}).get(path[-1])
        if other and path[0] == "sample_quality" and path[-1] in EXTRACTOR_METRICS and v is not None:
            cell["other_extractor"] = True
        values.append(cell)
    return values


def compare_runs(runs: list, force: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"runs": [...], "rows": [{"metric", "values": [{"value", "ci95", "vs_first"}...]}], "notes": [...]}."""
    if len(runs) < 2:
        raise UserError("compare needs at least two run folders")
    opened = [_open(Path(r)) for r in runs]
    notes = _same_test_set(opened, force)
    extractor = [None] + [extractor_note(opened[0], o) for o in opened[1:]]
    notes += [n for n in extractor if n]
    rows = []
    for label, key, path in ROWS:
        values = _cells(opened, key, path, [n is not None for n in extractor], n_boot, seed)
        if any(c["value"] is not None for c in values):
            rows.append({"metric": label, "values": values})
    for label, field in (("anomaly AUROC", "auroc"), ("anomaly AUPRC", "auprc")):
        cells = [_anomaly(o["results"]) for o in opened]
        if any(cells):
            rows.append({"metric": label, "values": [{"value": c.get(field), "ci95": c.get(f"{field}_ci95")}
                                                     for c in cells]})
    for label, field in (("training images/s (median epoch)", "images_per_s"), ("training wall time (s)", "wall_s")):
        rows.append({"metric": label, "values": [{"value": _training(o["metrics"])[field]} for o in opened]})
    first = opened[0]["ev"]
    return {"runs": [str(o["run"]) for o in opened],
            "models": [_get(o["ev"], ("model", "name")) for o in opened],
            "data": first.get("data"), "split": first.get("split"), "n_images": first.get("n_images"),
            "bootstrap": n_boot, "rows": rows, "notes": notes}
