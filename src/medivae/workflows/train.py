"""Training a run: open its folder (config, data summary, environment), fit, then write its figures and
report. :func:`medivae.api.train` holds the run's lock around :func:`train_run`."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import torch

from medivae.data import ImageSet, load_dataset, to_float
from medivae.models import build_model
from medivae.models.family import config_for_data, describe, figures, has, labels_for
from medivae.models.inference import interpolate, reconstruct, sample_images
from medivae.runfolder.config import RunConfig, flat_settings
from medivae.runfolder.lock import run_lock
from medivae.runfolder.results import ADAPTATION_FILE
from medivae.runtime import distributed
from medivae.runtime.device import pick_device, preload_in_background, start_idle_probe
from medivae.runtime.errors import UserError
from medivae.runtime.images import save_grid
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import seed_everything, torch_generator
from medivae.train import checkpoint as ckpt
from medivae.train.trainer import Trainer, check_resumable


def train_run(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, compare: set[str] | None,
              sources: dict | None) -> Path:
    """The body of :func:`medivae.api.train`, run while the caller holds the run folder's lock."""
    if resume:
        if (run_dir / ADAPTATION_FILE).exists():  # its training set holds site normals this would not load
            raise UserError(f"{run_dir} is an adapted run ({ADAPTATION_FILE}); --resume would go on without its "
                            "site normals: adapt the original run again with 'medivae anomaly adapt' instead")
        check_resumable(run_dir)
        if not ckpt.exists(run_dir / "last") and ckpt.exists(run_dir / "best"):
            # a fresh start here would overwrite best/ and metrics.jsonl with epoch 1 of a new run
            raise UserError(f"{run_dir}: last/ is missing, so the run cannot go on from where it stopped "
                            "(best/ alone holds no optimizer state to resume); start a new run with another --out")
        saved = RunConfig.load(run_dir / "config.json")
        check_resume_settings(saved, cfg, compare)
        epochs = cfg.train.epochs if compare is None or "train.epochs" in compare else saved.train.epochs
        cfg = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=epochs))
    elif ckpt.exists(run_dir / "last"):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    t = cfg.train
    progress = progress and distributed.is_main()  # under torchrun only rank 0 talks and writes
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    start_idle_probe()  # measured while the data loads (train/device.py)
    if not distributed.env_info().enabled:  # under torchrun, no import on a thread beside the process group
        preload_in_background("torch._dynamo")
    seed_everything(t.seed)
    splits = load_dataset(cfg.data, progress=progress)
    names = tuple(splits["train"].label_names)
    cfg = dataclasses.replace(cfg, model=config_for_data(cfg.model, names, cfg.data.source), label_names=names)
    device = distributed.local_device(pick_device(t.device))  # cuda:LOCAL_RANK under torchrun
    own_group = distributed.setup(device)  # joins torchrun's process group; False without torchrun
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, device, run_dir, progress)
    # the checkpoint first: a damaged last/ is refused before config.json (a grown --epochs) and env.json change
    if resume and ckpt.exists(run_dir / "last"):  # also last.prev, left by a kill mid-swap
        trainer.resume()
    if distributed.is_main():
        open_run_folder(run_dir, cfg, splits, trainer)
        if sources is not None:
            atomic_write_text(run_dir / "config_sources.json", json.dumps(sources, indent=2) + "\n")
    trainer.fit(splits["train"], splits["val"])
    if distributed.is_main():
        finish_run_folder(run_dir, model, cfg, splits, device)
    if own_group:
        distributed.barrier()  # the other ranks exit once rank 0's figures and report are written
        # DDP's reducer keeps the process group and its gloo work alive, in reference cycles that only the
        # garbage collector frees; left to interpreter shutdown, a gloo thread then needs the GIL that is
        # gone, and a worker hung or aborted at exit (~1 run in 30 on a busy 2-core machine)
        del trainer, model
        gc.collect()
        distributed.cleanup()
    return run_dir


def open_run_folder(run_dir: Path, cfg: RunConfig, splits: dict[str, ImageSet], trainer: Trainer) -> None:
    """What a run folder holds before its first epoch: config.json, data.json, environment.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    _save_data_summary(run_dir, splits)
    _record_environment(run_dir, trainer)


def finish_run_folder(run_dir: Path, model, cfg: RunConfig, splits: dict[str, ImageSet], device) -> None:
    """What a run folder holds after its last epoch: the figures (of the test split, else validation) and
    report.html."""
    write_figures(run_dir, model, cfg, splits["test"] if len(splits["test"]) else splits["val"], device)
    write_run_report(run_dir)


def _record_environment(run_dir: Path, trainer: Trainer) -> None:
    from medivae.report.environment import write_environment

    dev = trainer.device
    write_environment(
        run_dir, device=str(dev), seed=trainer.cfg.train.seed, threads=torch.get_num_threads(),
        model=trainer.cfg.model.name, capabilities=sorted(trainer.model.capabilities),
        model_facts=describe(trainer.model).to_dict(),
        precision=str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32",
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    )


def write_run_report(run_dir: Path) -> Path | None:
    """RUN/report.html; a broken report only warns, since the run itself is complete and saved."""
    import warnings

    try:
        return report_run(run_dir)
    except Exception as e:  # the report must never cost the user a finished run
        why = f"{type(e).__name__}: {e}"
        warnings.warn(f"report not written ({why}); retry with: medivae report {run_dir}", stacklevel=2)
        return None


def report_run(run_dir, out=None) -> Path:
    """Write RUN/report.html (or ``out``), holding the run's lock when the file goes into the run folder."""
    from medivae.report import write_report

    run_dir = Path(run_dir)
    inside = out is None or run_dir.resolve() in Path(out).resolve().parents
    with run_lock(run_dir, "medivae report", enabled=inside):
        return write_report(run_dir, out)


def _save_data_summary(run_dir: Path, splits: dict[str, ImageSet]) -> None:
    summary = {k: {"n": len(v), "labels": v.label_counts(), "meta": _public_meta(v.meta)} for k, v in splits.items()}
    atomic_write_text(run_dir / "data.json", json.dumps(summary, indent=2, default=str) + "\n")


def _public_meta(meta: dict) -> dict:
    """Meta safe to write: drops anything that could identify a patient."""
    return {k: v for k, v in meta.items() if "patient" not in k.lower() and k not in ("groups", "series")}


def check_resume_settings(saved: RunConfig, cfg: RunConfig, compare: set[str] | None = None) -> None:
    """A one-line UserError naming every setting of ``cfg`` that differs from the run being resumed
    (only those in ``compare`` when given); ``train.epochs`` may grow, never shrink below the saved run's."""
    if (compare is None or "train.epochs" in compare) and cfg.train.epochs < saved.train.epochs:
        raise UserError(f"--resume: --epochs may only grow; this run is set for {saved.train.epochs} epochs "
                        f"(train.epochs), not {cfg.train.epochs}")
    # what the model config became when the run met its data
    cfg = dataclasses.replace(cfg, model=config_for_data(cfg.model, saved.label_names, saved.data.source))
    old, new = flat_settings(saved.to_dict()), flat_settings(cfg.to_dict())
    skip = {"train.epochs", "label_names", "medivae_version"}
    keys = (set(old) | set(new)) if compare is None else set(compare)
    diffs = [f"{k}: run has {old.get(k)!r}, you gave {new.get(k)!r}" for k in sorted(keys - skip)
             if k in new and old.get(k) != new.get(k)]
    if diffs:
        raise UserError(f"--resume continues the run as it was configured; these differ: {'; '.join(diffs)}. "
                        "Drop them, or start a new run with another --out")


def write_figures(run_dir: Path, model, cfg: RunConfig, split: ImageSet, device, n: int = 64) -> None:
    """samples.png, interpolation.png and reconstructions.png, each where the family can make it."""
    seed = cfg.train.seed
    if has(model, "sample"):
        save_grid(sample_images(model, n, torch_generator(seed, "samples")), run_dir / "samples.png", nrow=8)
    if has(model, "latent") and has(model, "sample"):
        z = model.prior_latents(2, torch_generator(seed, "interpolation"))
        first = 0 if has(model, "conditional") else None  # a conditional model interpolates within class 0
        mode = "slerp" if has(model, "gaussian_latent") else "linear"  # the rule `medivae interpolate` applies
        path = interpolate(model, z[0], z[1], 10, mode, device, first)
        save_grid(path, run_dir / "interpolation.png", nrow=10)
    if len(split):
        k = min(16, len(split))
        x = to_float(split.images[:k], device)
        y = labels_for(model, split.labels[:k], device)
        both = torch.cat([x.cpu(), reconstruct(model, x, y)])
        save_grid(both, run_dir / "reconstructions.png", nrow=k)
    for name, images in figures(model).items():  # the family's own, e.g. VampPrior pseudo-inputs
        save_grid(images, run_dir / f"{name}.png")
