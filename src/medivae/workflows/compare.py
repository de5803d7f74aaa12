"""``medivae compare RUN...``: runs evaluated on the same test images, side by side, with intervals.

Reads what ``medivae evaluate`` saved (results.json["evaluation"], RUN/eval_per_image.npz), the anomaly
block when present, and metrics.jsonl; computes nothing with a model. Per-image metrics get a 95 %
percentile-bootstrap interval and, against the first run, a paired bootstrap p-value over the test
images both runs scored (matched by content hash). FD / precision / recall / density / coverage and the
high-frequency power ratio show the intervals evaluate saved (no p-value: their samples are not paired
images). Runs evaluated on other data, another split or other test images, one run given twice, and
evaluations of weights no longer in their run folder (results.json records the checkpoint's manifest hash)
are refused unless ``force``, which shows them as notes. Runs whose image likelihoods differ still compare,
with their nats rows blank and a note. The five feature metrics of a run scored by another reference
extractor than the first run's (an older medivae's, or another dataset's) are marked and named in
``notes``: they are not on the same scale.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from medivae.evaluation.bootstrap import mean_ci, paired_difference
from medivae.runfolder.config import with_split_seed
from medivae.runfolder.results import (
    PER_IMAGE_FILE,
    RESULTS_FILE,
    STAGED_PER_IMAGE,
    file_sha256,
    read_results,
    stale_evaluation,
)
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES
from medivae.runtime.errors import UserError
from medivae.runtime.paths import check_run_folder
from medivae.train.metrics import read_metrics

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
    """A run's evaluation, per-image metrics, results and training log; a one-line UserError when it is not a
    run, has no evaluation, or its per-image file is missing, damaged or of another evaluation."""
    check_run_folder(run, "medivae compare", write=False)
    results = read_results(run / RESULTS_FILE)
    ev = results.get("evaluation")
    if not isinstance(ev, dict) or not ev:
        raise UserError(f"{run}: no evaluation in results.json; run 'medivae evaluate {run}' first")
    _check_values(run, ev)
    return {"run": run, "ev": ev, "per": read_per_image(run, ev), "results": results, "metrics": read_metrics(run),
            "stale": stale_evaluation(run, ev)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_values(run: Path, ev: dict) -> None:
    """The values compare reads from an evaluation have the types evaluate writes: a results.json edited by hand
    or by another tool is one line naming the value, not a TypeError while the table is drawn."""
    def bad(where: str, value) -> UserError:
        return UserError(f"{run / RESULTS_FILE}: evaluation.{where} = {value!r:.60} is not what medivae evaluate "
                         f"writes; rerun 'medivae evaluate {run}'")

    for _, _, path in ROWS:
        v = _get(ev, path)
        if v is not None and not _number(v):
            raise bad(".".join(path), v)
    for name in ("model", "sample_quality", "ci95"):
        if ev.get(name) is not None and not isinstance(ev[name], dict):
            raise bad(name, ev[name])
    if not isinstance((ev.get("sample_quality") or {}).get("extractor_version", 1), int):
        raise bad("sample_quality.extractor_version", ev["sample_quality"]["extractor_version"])
    for k, v in (ev.get("ci95") or {}).items():
        if v is not None and not (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)):
            raise bad(f"ci95.{k}", v)


def read_per_image(run: Path, ev: dict) -> dict[str, np.ndarray]:
    """RUN/eval_per_image.npz as {metric: (N,)}, the file results.json names by its SHA-256 (the staged one
    when an evaluation was killed between publishing its results and renaming it into place)."""
    final, staged = run / PER_IMAGE_FILE, run / STAGED_PER_IMAGE
    if not final.is_file() and not staged.is_file():
        raise UserError(f"{run}: no {PER_IMAGE_FILE}; rerun 'medivae evaluate {run}' with this version")
    want = ev.get("per_image_sha256")
    path = final
    if isinstance(want, str):
        path = next((p for p in (final, staged) if file_sha256(p) == want), None)
        if path is None:
            raise UserError(f"{run}: {PER_IMAGE_FILE} is not the one results.json describes (an evaluation was "
                            f"interrupted, or the file was replaced); rerun 'medivae evaluate {run}'")
    try:
        with np.load(path, allow_pickle=False) as d:
            per = {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: not a readable per-image file ({type(e).__name__}); rerun 'medivae evaluate "
                        f"{run}'") from None
    lengths = {len(v) for v in per.values() if v.ndim == 1}
    if "image_hash" not in per or len(lengths) != 1 or any(v.ndim != 1 for v in per.values()):
        raise UserError(f"{path}: not a per-image file of 'medivae evaluate'; rerun 'medivae evaluate {run}'")
    return per


def _refusals(opened: list[dict]) -> list[str]:
    """Why these runs cannot be compared as they are, beyond their test sets (:func:`_same_test_set`): one run
    given twice, or an evaluation of weights no longer in its run folder."""
    why, seen = [], {}
    for o in opened:
        key = o["run"].resolve()
        if key in seen:
            why.append(f"{seen[key]} and {o['run']} are the same run")
        seen.setdefault(key, o["run"])
        if o["stale"]:
            why.append(f"the evaluation in {o['run']} is out of date: {o['stale']}; rerun 'medivae evaluate "
                       f"{o['run']}'")
    return why


EXTRACTOR_METRICS = {"fd", "precision", "recall", "density", "coverage"}  # measured in the extractor's features


def _split_seed(o: dict) -> tuple[int | None, bool]:
    """(the seed that split the run's data, whether the run was made before data.split_seed existed: then its
    training seed split it). The seed is the one evaluate saved, else config.json's."""
    try:
        raw = json.loads((o["run"] / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    data = raw.get("data") if isinstance(raw, dict) else None
    legacy = isinstance(data, dict) and "split_seed" not in data
    seed = o["ev"].get("split_seed")
    if seed is None and isinstance(data, dict):
        seed = with_split_seed(raw)["data"]["split_seed"]
    return seed, legacy


def _same_data(a: dict, b: dict) -> bool:
    """Whether two evaluations ran on the same data: the same content (``data_identity``, the bytes wherever
    they were read from), or for evaluations without it the same source text."""
    if a.get("data_identity") and b.get("data_identity"):
        return a["data_identity"] == b["data_identity"]
    return a.get("data") == b.get("data")


def _test_set_differences(a: dict, b: dict) -> list[str]:
    why = []
    if not _same_data(a["ev"], b["ev"]):
        why.append(f"data {a['ev'].get('data')!r} vs {b['ev'].get('data')!r}")
    if a["ev"].get("split") != b["ev"].get("split"):
        why.append(f"split {a['ev'].get('split')!r} vs {b['ev'].get('split')!r}")
    if set(a["per"]["image_hash"].tolist()) != set(b["per"]["image_hash"].tolist()):
        (sa, old_a), (sb, old_b) = _split_seed(a), _split_seed(b)
        hint = f" (split seeds {sa} vs {sb}" if sa != sb else ""
        older = [str(o["run"]) for o, old in ((a, old_a), (b, old_b)) if old]
        if hint and older:
            hint += f"; {' and '.join(older)} predate data.split_seed: the training seed split the data"
        why.append("different test images" + (hint + ")" if hint else ""))
    return why


def _check_comparable(opened: list[dict], force: bool) -> list[str]:
    """Everything that makes these runs incomparable as one line (a UserError), unless ``force``: then the
    reasons are returned and shown as notes under the table."""
    why = _refusals(opened)
    for b in opened[1:]:
        diff = _test_set_differences(opened[0], b)
        if diff:
            why.append(f"{opened[0]['run']} and {b['run']} were not evaluated on the same test set ({'; '.join(diff)})")
    if why and not force:
        raise UserError(f"{'; '.join(why)}; pass --force to compare anyway")
    return why


def extractor_note(a: dict, b: dict) -> str | None:
    """Why run b's FD / precision / recall / density / coverage are not on run a's scale, or None."""
    qa, qb = (o["ev"].get("sample_quality") or {} for o in (a, b))  # dicts or absent: _check_values
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


def _likelihood_note(opened: list[dict]) -> str | None:
    """Nats of different image likelihoods (a Bernoulli's and a Gaussian's log-density of the same images) are
    not on one scale: a note, and those rows stay blank."""
    names = [_get(o["ev"], ("model", "likelihood")) for o in opened]
    names = [None if n is None else str(n) for n in names]  # a hand-edited list or number, shown as it is
    if len(set(names)) <= 1:
        return None
    runs = ", ".join(f"{o['run']} {n or 'none'}" for o, n in zip(opened, names, strict=True))
    return f"the runs' image likelihoods differ ({runs}): their nats and bits/dim are not comparable and are left blank"


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


def _sampler_note(opened: list[dict]) -> str | None:
    """Sample-quality rows of runs whose samples came from different samplers (the prior, a fitted gmm, flow or
    diffusion sampler) compare the samplers as much as the models: a note that names each run's."""
    def described(o: dict) -> str | None:
        q = o["ev"].get("sample_quality")
        if not q:
            return None
        name = str(q.get("sampler") or "prior")
        if name == "diffusion":
            name += f" (guidance {q.get('guidance', 0)}, {q.get('sampling_steps')} steps)"
        return name

    names = [described(o) for o in opened]
    if len({n for n in names if n is not None}) <= 1:
        return None
    runs = ", ".join(f"{o['run']} {n}" for o, n in zip(opened, names, strict=True) if n is not None)
    return (f"the runs' samples come from different samplers ({runs}): their FD, precision, recall, density, "
            "coverage and high-frequency power compare the samplers as well as the models")


def compare_runs(runs: list, force: bool = False, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """{"runs": [...], "rows": [{"metric", "values": [{"value", "ci95", "vs_first"}...]}], "notes": [...]}."""
    if len(runs) < 2:
        raise UserError("compare needs at least two run folders")
    opened = [_open(Path(r)) for r in runs]
    notes = _check_comparable(opened, force)
    extractor = [None] + [extractor_note(opened[0], o) for o in opened[1:]]
    notes += [n for n in extractor if n]
    blank_nats = _likelihood_note(opened)
    notes += [blank_nats] if blank_nats else []
    samplers = _sampler_note(opened)
    notes += [samplers] if samplers else []
    rows = []
    for label, key, path in ROWS:
        if blank_nats and path[0] == "likelihood":
            rows.append({"metric": label, "values": [{"value": None} for _ in opened]})
            continue
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
