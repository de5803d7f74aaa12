"""Normals from the site being scored: ``anomaly score --calibration`` and ``medivae anomaly adapt``.

``site_normals`` reads the normal images of any source for a run; ``shared_images`` / ``fingerprint`` compare
images pixel for pixel (a calibration or adaptation normal must not also be a training or scored image).

``medivae anomaly adapt``: a run fitted on one site's normals, trained further with normals from another.

When the normals of the images to score differ from the training normals (``medivae anomaly score`` says
so: the ``normal_shift`` check), the model calls that difference anomalous too. With some normal images
from the scored site, the run can be adapted: the same model, trained a few more epochs on its training
normals plus a share of the site normals, while the rest of them are held out to set the conformal
threshold on (a threshold set on images the model trained on would sit too low). The adapted run is an
ordinary run folder plus ``adaptation.json``, which names the site normals and which of them were used for
what, and fingerprints them: ``anomaly score`` reloads them (the latent and SSIM statistics of the
training normals include the adaptation normals; the threshold defaults to the held-out ones) and refuses
to score any of them.

This module prepares the data and reads the record; ``medivae.api.anomaly_adapt`` trains and writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from medivae.data import load_dataset
from medivae.data.imageset import ImageSet, concat, image_hashes, label_code
from medivae.data.sources import same_source
from medivae.runfolder.config import RunConfig
from medivae.runfolder.lock import LOCK_FILE, run_lock
from medivae.runfolder.results import ADAPTATION_FILE
from medivae.runfolder.run import checkpoint_folder, load_run
from medivae.runtime.errors import UserError
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import numpy_rng, seed_everything
from medivae.train import checkpoint as ckpt
from medivae.train.trainer import Trainer

DEFAULT_EPOCHS = 10  # not tuned: the first value tried (benchmarks/site_calibration.py measures it)
DEFAULT_HOLD_OUT = 0.5


def site_normals(cfg: RunConfig, normal_label: str, source: str, flag: str) -> ImageSet:
    """The normal images of ``source`` (every split), preprocessed as the run's: those with the normal label
    when the source is labelled, all of them when it is not (a folder of normals). They carry the run's own
    label number for the normal class (what a conditional model is given). ``flag`` names the option in errors."""
    data = dataclasses.replace(cfg.data, source=source, labels=(), val_fraction=0.0, test_fraction=0.0)
    every = concat(list(load_dataset(data, progress=False).values()))
    code = label_code(every.label_names, normal_label)
    if code is not None and (every.labels == code).any():
        keep = every.labels == code
    elif (every.labels < 0).all():
        keep = np.ones(len(every), dtype=bool)
    else:
        raise UserError(f"{flag} {source}: its labels {list(every.label_names)} do not include the normal "
                        f"label {normal_label!r}; pass a folder of normal images only, or a source with that label")
    normals = every.subset(np.flatnonzero(keep))
    own = label_code(cfg.label_names, normal_label)
    return dataclasses.replace(normals, labels=np.full(len(normals), -1 if own is None else own, dtype=np.int64))


def shared_images(images: np.ndarray, others) -> int:
    """How many of ``images`` are equal, pixel for pixel, to an image of one of the ImageSets ``others``."""
    seen = {h for s in others for h in image_hashes(s.images)}
    return sum(h in seen for h in image_hashes(images))


def fingerprint(images: np.ndarray) -> str:
    """One hex digest of a set of images in order: a source that still gives these images, in this order."""
    return hashlib.blake2b("".join(image_hashes(images)).encode(), digest_size=16).hexdigest()


def unique_images(s: ImageSet) -> ImageSet:
    """``s`` without repeats: the first of each set of pixel-identical images, in order (a copy of a site
    normal must not be both trained on and held out to set the threshold)."""
    _, first = np.unique(image_hashes(s.images), return_index=True)
    return s if len(first) == len(s) else s.subset(np.sort(first))


@dataclasses.dataclass
class AdaptPlan:
    """What ``api.anomaly_adapt`` trains: the run's config with the adaptation epochs, the training set
    (the run's training normals + the adaptation normals), the run's validation normals, its test normals
    (for the figures) and the record written as ``adaptation.json``."""

    cfg: RunConfig
    train: ImageSet
    val: ImageSet
    test: ImageSet
    record: dict


def plan_adaptation(run_dir: Path, cfg: RunConfig, checkpoint_sha256: str, normals: str, epochs: int,
                    hold_out: float) -> AdaptPlan:
    """Check the request and split the site normals (seeded by the run's seed) into adaptation and held-out
    normals. Refused with one line: a run not fitted on one normal label, an adapted run, the run's own
    source, site normals that are training or validation images of the run, too few of them (``anomaly score``
    refuses to score any of them)."""
    if len(cfg.data.labels) != 1:
        raise UserError(f"{run_dir} was not fitted on one normal label; adapt a run of 'medivae anomaly fit'")
    if (run_dir / ADAPTATION_FILE).exists():
        raise UserError(f"{run_dir} is already an adapted run; adapt the run it came from with all the site "
                        "normals instead")
    if epochs < 1 or not 0 <= hold_out < 1:
        raise UserError(f"need --epochs >= 1 and 0 <= --hold-out < 1 (got {epochs}, {hold_out})")
    if same_source(normals, cfg.data.source):
        raise UserError("--normals must come from the site being scored, not the run's own source (the model "
                        "was fitted on its normals)")
    normal_label = cfg.data.labels[0]
    seed = cfg.train.seed
    own = load_dataset(cfg.data, progress=False)
    every = site_normals(cfg, normal_label, normals, "--normals")
    site = unique_images(every)
    clash = shared_images(site.images, [own["train"], own["val"]])
    if clash:
        raise UserError(f"--normals {normals}: {clash} of its {len(site)} normal images are also training or "
                        "validation images of the run; adapt with other normals")
    order = numpy_rng(seed, "adapt-hold-out").permutation(len(site))
    n_held = int(round(hold_out * len(site)))
    held, used = np.sort(order[:n_held]), np.sort(order[n_held:])
    if len(used) < 2:
        raise UserError(f"--normals {normals}: {len(site)} normal images leave {len(used)} to adapt on after "
                        f"holding out {n_held}; give more normals or a smaller --hold-out")
    where = Path(normals)  # absolute, so the adapted run scores from any working directory
    record = {
        "from_run": str(Path(run_dir).resolve()), "from_checkpoint": "best",
        "from_checkpoint_sha256": checkpoint_sha256,
        "normals": str(where.resolve()) if where.exists() else str(normals), "n_normals": len(site),
        "n_repeats_dropped": len(every) - len(site), "fingerprint": fingerprint(site.images),
        "adapt": used.tolist(), "held_out": held.tolist(), "epochs": epochs, "hold_out": hold_out,
        "best_is": "last epoch", "complete": False,
    }  # fmt: skip
    # the run's own settings; the trainer goes on from its epoch count (api.anomaly_adapt). A time budget the run
    # was trained with was its own: the adaptation trains its --epochs
    new = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs, time_budget=0.0))
    return AdaptPlan(new, concat([own["train"], site.subset(used)]), own["val"], own["test"], record)


RECORD_KEYS = ("normals", "fingerprint", "adapt", "held_out", "epochs", "complete")


def read_adaptation(run_dir: Path, finished: bool = True) -> dict | None:
    """The run's ``adaptation.json``, or None for a run that was not adapted. ``finished``: refuse a record
    whose adaptation did not finish (a kill during training)."""
    path = Path(run_dir) / ADAPTATION_FILE
    if not path.exists():
        return None
    again = f"adapt the original run again with --out {run_dir}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); {again}") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise UserError(f"{path}: not an adaptation record (no {', '.join(missing)}); {again}")
    if finished and not record["complete"]:
        raise UserError(f"the adaptation that writes {run_dir} did not finish; {again}")
    return record


def adaptation_sets(run_dir: Path, cfg: RunConfig) -> dict | None:
    """{"adapt", "held_out": ImageSets, "record"} of an adapted run, reloaded from the site normals' source
    and checked against the fingerprint taken when the run was adapted; None for a run that was not."""
    record = read_adaptation(run_dir)
    if record is None:
        return None
    try:
        site = unique_images(site_normals(cfg, cfg.data.labels[0], record["normals"], "the adaptation normals"))
    except UserError as e:
        raise UserError(f"the site normals that {run_dir / ADAPTATION_FILE} names cannot be read: {e}") from None
    if fingerprint(site.images) != record["fingerprint"]:
        raise UserError(f"the site normals in {record['normals']} have changed since {run_dir} was adapted on "
                        "them, so which were held out is no longer known; adapt the original run again into a "
                        "new --out")
    return {"adapt": site.subset(np.asarray(record["adapt"], dtype=np.int64)),
            "held_out": site.subset(np.asarray(record["held_out"], dtype=np.int64)), "record": record}


def adapt_run(run_dir, normals: str, out, epochs: int | None = None, hold_out: float | None = None,
                  device: str = "auto", threads: int | None = None, progress: bool = True) -> Path:
    """Adapt an anomaly run to the site being scored: train it ``epochs`` more epochs (going on from its
    ``best/`` checkpoint's optimizer state and epoch count, see ``Trainer.continue_from``) on its training normals
    plus the normal images of ``normals`` (a folder of normals, or a source's images with the normal label)
    but a seeded ``hold_out`` share of them, kept to set the threshold on (None: the defaults of
    medivae.workflows.site, 10 epochs and half); write the adapted run to ``out``
    (its last epoch is its ``best/``; the validation loss on the run's own normals is logged, not used to
    choose). ``anomaly_score(out, ...)`` then calibrates on the held-out normals and refuses to score any
    site normal. See medivae.workflows.site."""
    from medivae.workflows.train import finish_run_folder, open_run_folder

    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    hold_out = DEFAULT_HOLD_OUT if hold_out is None else hold_out
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must be a new run folder: the run being adapted is kept as it is")
    with run_lock(out, "medivae anomaly adapt", create=True):
        unfinished = out.is_dir() and (read_adaptation(out, finished=False) or {}).get("complete") is False
        if not unfinished and (ckpt.exists(out / "last") or (out / "config.json").exists()):
            raise UserError(f"{out} already holds a run; choose another --out")
        with run_lock(run_dir, "medivae anomaly adapt"):  # nothing may rewrite the run while it is read
            src = load_run(run_dir, device=device)
            plan = plan_adaptation(run_dir, src.config, src.checkpoint_sha256(), normals, epochs, hold_out)
            cfg = plan.cfg
            if threads is not None:
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_threads=threads))
            if unfinished:  # a kill during an earlier adaptation into this folder: its files are ours, start over
                for p in out.iterdir():
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    elif p.name != LOCK_FILE:
                        p.unlink()
            seed_everything(cfg.train.seed)
            trainer = Trainer(cfg, src.model, src.device, out, progress)
            trainer.continue_from(checkpoint_folder(run_dir, src.checkpoint), epochs)  # optimizers, schedules go on
        cfg = trainer.cfg
        plan.record["continued_from_epoch"] = trainer.state.epoch
        splits = {"train": plan.train, "val": plan.val, "test": plan.test}
        out.mkdir(parents=True, exist_ok=True)
        record = json.dumps(plan.record, indent=1) + "\n"
        atomic_write_text(out / ADAPTATION_FILE, record)  # first: a folder with weights says what they saw
        open_run_folder(out, cfg, splits, trainer)
        trainer.fit(plan.train, plan.val)
        ckpt.link_copy(out / "last", out / "best")  # the adapted model is the last epoch, not the best old-site loss
        atomic_write_text(out / ADAPTATION_FILE, json.dumps({**plan.record, "complete": True}, indent=1) + "\n")
        finish_run_folder(out, src.model, cfg, splits, src.device)
    return out
