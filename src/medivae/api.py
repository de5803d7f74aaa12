"""The Python API: what the CLI and notebooks call. Nothing runs at import."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from medivae.data import ImageSet, load_dataset, to_float
from medivae.models import build_model
from medivae.models.family import config_for_data, has, labels_for, require
from medivae.models.inference import encode_mean, interpolate, reconstruct, sample_images
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig, flat_settings
from medivae.runfolder.lock import run_lock
from medivae.runfolder.run import Run, checkpoint_folder, load, load_image, load_run  # noqa: F401  (the notebook API: api.load(...))
from medivae.runtime import distributed
from medivae.runtime.device import pick_device, preload_in_background, start_idle_probe
from medivae.runtime.errors import UserError
from medivae.runtime.images import save_grid
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import seed_everything, torch_generator
from medivae.train import checkpoint as ckpt
from medivae.train.trainer import Trainer, check_resumable


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          compare: set[str] | None = None, sources: dict | None = None) -> Path:
    """Train ``cfg`` into ``run_dir``; write checkpoints, metrics and sample/interpolation/reconstruction PNGs.

    ``resume``: continue ``run_dir``. Every setting of ``cfg`` (or only the dotted names in ``compare``,
    e.g. {"train.lr"}: what a user typed) must equal the run's; only ``train.epochs`` may grow.
    ``sources``: where each setting came from (``medivae train --config``), saved as RUN/config_sources.json.
    The run folder is locked first (medivae.runfolder.lock): a second writer is refused before anything is written."""
    run_dir = Path(run_dir)
    command = "medivae train --resume" if resume else "medivae train"
    with run_lock(run_dir, command, create=True, enabled=distributed.is_main()):
        return _train(cfg, run_dir, resume, progress, compare, sources)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, compare: set[str] | None,
           sources: dict | None) -> Path:
    if resume:
        from medivae.workflows.site import ADAPTATION_FILE

        if (run_dir / ADAPTATION_FILE).exists():  # its training set holds site normals this would not load
            raise UserError(f"{run_dir} is an adapted run ({ADAPTATION_FILE}); --resume would go on without its "
                            "site normals: adapt the original run again with 'medivae anomaly adapt' instead")
        check_resumable(run_dir)
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
    splits = load_dataset(cfg.data, t.seed, progress)
    names = tuple(splits["train"].label_names)
    cfg = dataclasses.replace(cfg, model=config_for_data(cfg.model, names, cfg.data.source), label_names=names)
    device = distributed.local_device(pick_device(t.device))  # cuda:LOCAL_RANK under torchrun
    own_group = distributed.setup(device)  # joins torchrun's process group; False without torchrun
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, device, run_dir, progress)
    if distributed.is_main():
        _open_run_folder(run_dir, cfg, splits, trainer)
        if sources is not None:
            atomic_write_text(run_dir / "config_sources.json", json.dumps(sources, indent=2) + "\n")
    if resume and ckpt.exists(run_dir / "last"):  # also last.prev, left by a kill mid-swap
        trainer.resume()
    trainer.fit(splits["train"], splits["val"])
    if distributed.is_main():
        _finish_run_folder(run_dir, model, cfg, splits, device)
    if own_group:
        distributed.barrier()  # the other ranks exit once rank 0's figures and report are written
        # DDP's reducer keeps the process group and its gloo work alive, in reference cycles that only the
        # garbage collector frees; left to interpreter shutdown, a gloo thread then needs the GIL that is
        # gone, and a worker hung or aborted at exit (~1 run in 30 on a busy 2-core machine)
        del trainer, model
        gc.collect()
        distributed.cleanup()
    return run_dir


def _open_run_folder(run_dir: Path, cfg: RunConfig, splits: dict[str, ImageSet], trainer: Trainer) -> None:
    """What a run folder holds before its first epoch: config.json, data.json, environment.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    _save_data_summary(run_dir, splits)
    _record_environment(run_dir, trainer)


def _finish_run_folder(run_dir: Path, model, cfg: RunConfig, splits: dict[str, ImageSet], device) -> None:
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
        precision=str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "fp32",
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    )


def write_run_report(run_dir: Path) -> Path | None:
    """RUN/report.html; a broken report only warns, since the run itself is complete and saved."""
    import warnings

    try:
        return report(run_dir)
    except Exception as e:  # the report must never cost the user a finished run
        why = f"{type(e).__name__}: {e}"
        warnings.warn(f"report not written ({why}); retry with: medivae report {run_dir}", stacklevel=2)
        return None


def report(run_dir, out=None) -> Path:
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
    for name, images in getattr(model, "figures", dict)().items():  # family figures, e.g. VampPrior pseudo-inputs
        save_grid(images, run_dir / f"{name}.png")


def sample(run_dir, n: int, out, seed: int | None = None, label: str | None = None, device="auto",
           temperature: float = 1.0, sampler: str = "prior") -> Path:
    """A PNG grid of n samples; ``sampler``: "prior" or a fitted post-hoc sampler ("gmm", "flow")."""
    run = load_run(run_dir, device=device)
    return save_grid(run.sample(n, label, seed, temperature, sampler=sampler), out)


def fit_sampler(run_dir, sampler: str, max_components: int = 10, checkpoint: str = "best",
                device: str = "auto") -> dict:
    """Fit a post-hoc latent sampler (gmm, flow) on the run's training posterior means -> RUN/samplers/."""
    from medivae.workflows.fit_sampler import fit_sampler_run

    with run_lock(run_dir, "medivae fit-sampler"):  # writes RUN/samplers/
        return fit_sampler_run(run_dir, sampler, max_components, checkpoint, device)


def interpolate_run(
    run_dir, out, steps: int = 8, mode: str = "linear", src=None, dst=None, seed=None, device="auto",
    label: str | None = None,
):
    run = load_run(run_dir, device=device)
    model, cfg, dev = run.model, run.config, run.device
    require(model, "latent", "interpolate")
    if mode == "slerp":
        require(model, "gaussian_latent", "interpolate --mode slerp")
    if steps < 2:
        raise UserError(f"--steps must be >= 2, not {steps}")
    if (src is None) != (dst is None):
        raise UserError("give both --from and --to, or neither (then two prior draws are used)")
    k = run.label_index(label)
    if has(model, "conditional") and k is None:
        raise UserError(f"this run is conditional: pass --label, one of {list(cfg.label_names)}")
    y = None if k is None else torch.tensor([k], device=dev)
    if src is not None:
        z0 = encode_mean(model, load_image(src, cfg).to(dev), y)[0]
        z1 = encode_mean(model, load_image(dst, cfg).to(dev), y)[0]
    else:
        require(model, "sample", "interpolate (between prior draws; give --from and --to instead)")
        z0, z1 = model.prior_latents(2, torch_generator(cfg.train.seed if seed is None else seed, "interpolate"))
    return save_grid(interpolate(model, z0, z1, steps, mode, dev, k), out, nrow=steps)


def traverse(run_dir, out, image=None, n_dims: int | None = None, k: float = 3.0, steps: int = 9,
             label: str | None = None, batch: int = 512, device: str = "auto"):
    """Latent traversal PNG of a run (rows = dimensions by KL); returns (png, LatentStats, dims shown)."""
    from medivae.workflows.traverse import traverse_run

    return traverse_run(run_dir, out, image, n_dims, k, steps, label, batch, device)


def reconstruct_run(run_dir, data: str | None, out, split: str = "test", n: int = 16, device="auto") -> Path:
    run = load_run(run_dir, device=device)
    s = run.split(split, data)
    k = min(n, len(s))
    x = to_float(s.images[:k], run.device)
    return save_grid(torch.cat([x.cpu(), reconstruct(run.model, x, run.labels(s.labels[:k]))]), out, nrow=k)


def encode(run_dir, out, data: str | None = None, split: str = "test", device: str = "auto") -> dict:
    """Every image of a split through the family's encoder -> ``out`` (.npz): the family's arrays (e.g.
    ``mean``, ``logvar``) plus ``labels`` (N,) and ``label_names``; returns {name: shape}."""
    import io

    from medivae.runtime.io import atomic_write_bytes

    run = load_run(run_dir, device=device)
    s = run.split(split, data)
    arrays = {k: v.numpy() for k, v in run.encode(s.images, labels=s.labels).items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, labels=np.asarray(s.labels), label_names=np.array(s.label_names, dtype=str))
    atomic_write_bytes(Path(out), buf.getvalue())
    return {k: tuple(v.shape) for k, v in arrays.items()}


def demo_config(epochs: int = 15, n_images: int = 6000) -> RunConfig:
    """The demo: the article's model on built-in phantoms, sized for 1–3 minutes on 2 CPU cores."""
    return RunConfig(
        data=DataConfig(source=f"phantoms:{n_images}", image_size=64),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=1e-3),
    )


def evaluate(run_dir, data: str | None = None, split: str = "test", k: int = 100, batch_size: int = 64,
             max_images: int = 0, n_samples: int = 0, reference_epochs: int = 5,
             inception_weights: str | None = None, checkpoint: str = "best", device: str = "auto",
             progress: bool = True, sampler: str = "prior", bootstrap: int = 1000,
             foreground: str | None = None) -> dict:
    """Likelihood bounds, reconstruction, posterior collapse and sample quality of a run on one split;
    merged into RUN/results.json under "evaluation" (keys: medivae.workflows.evaluate) and returned."""
    from medivae.workflows.evaluate import EvalOptions, evaluate_run

    opts = EvalOptions(split=split, k=k, batch_size=batch_size, max_images=max_images, n_samples=n_samples,
                       reference_epochs=reference_epochs, inception_weights=inception_weights,
                       checkpoint=checkpoint, sampler=sampler, bootstrap=bootstrap, foreground=foreground)
    with run_lock(run_dir, "medivae evaluate"):
        return evaluate_run(run_dir, data, opts, device=device, progress=progress)


def anomaly_fit(cfg: RunConfig, run_dir: str | Path, progress: bool = True) -> Path:
    """Train on the normal images only: ``cfg.data.labels`` must name exactly one label (the normal one);
    train, validation and test splits then hold normals only. Score with :func:`anomaly_score`."""
    if len(cfg.data.labels) != 1:
        raise UserError(f"an anomaly model is fitted on one normal label, not {list(cfg.data.labels)}")
    with run_lock(run_dir, "medivae anomaly fit", create=True, enabled=distributed.is_main()):
        return train(cfg, run_dir, progress=progress)  # re-enters the lock this process holds


def anomaly_adapt(run_dir, normals: str, out, epochs: int | None = None, hold_out: float | None = None,
                  device: str = "auto", threads: int | None = None, progress: bool = True) -> Path:
    """Adapt an anomaly run to the site being scored: train it ``epochs`` more epochs (going on from its
    ``best/`` checkpoint's optimizer state and epoch count, see ``Trainer.continue_from``) on its training normals
    plus the normal images of ``normals`` (a folder of normals, or a source's images with the normal label)
    but a seeded ``hold_out`` share of them, kept to set the threshold on (None: the defaults of
    medivae.workflows.site, 10 epochs and half); write the adapted run to ``out``
    (its last epoch is its ``best/``; the validation loss on the run's own normals is logged, not used to
    choose). ``anomaly_score(out, ...)`` then calibrates on the held-out normals and refuses to score any
    site normal. See medivae.workflows.site."""
    from medivae.runfolder.lock import LOCK_FILE
    from medivae.workflows.site import (
        ADAPTATION_FILE,
        DEFAULT_EPOCHS,
        DEFAULT_HOLD_OUT,
        plan_adaptation,
        read_adaptation,
    )

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
        _open_run_folder(out, cfg, splits, trainer)
        trainer.fit(plan.train, plan.val)
        ckpt.link_copy(out / "last", out / "best")  # the adapted model is the last epoch, not the best old-site loss
        atomic_write_text(out / ADAPTATION_FILE, json.dumps({**plan.record, "complete": True}, indent=1) + "\n")
        _finish_run_folder(out, src.model, cfg, splits, src.device)
    return out


def anomaly_score(run_dir, data: str | None = None, split: str = "test", out=None,
                  normal_label: str | None = None, fpr: float = 0.05, k: int = 16, gradient: bool = False,
                  n_maps: int = 16, batch_size: int = 128, device: str = "auto", precision: str = "fp32",
                  bootstrap: int = 1000, calibration: str | None = None, progress: bool = True) -> dict:
    """Per-image anomaly scores, maps, AUROC/AUPRC (``bootstrap`` resamples for 95 % intervals) and a
    conformal threshold at ``fpr`` from validation normals, or from the normal images of ``calibration`` (a
    source from the site being scored);
    files in ``out`` (default RUN/anomaly), summary merged into RUN/results.json["anomaly"].
    ``precision="auto"`` scores through the bf16 fast path where the CPU/GPU has it (fp32: exact), VQ healing
    included; the MAP restoration stays fp32. ``progress``: bars on stderr over the scoring passes."""
    from medivae.workflows.anomaly import score_run

    with run_lock(run_dir, "medivae anomaly score"):  # writes RUN/results.json["anomaly"], wherever out is
        return score_run(
            run_dir, data, split, out, normal_label, fpr, k, gradient, n_maps, batch_size, device, precision,
            bootstrap, calibration, progress,
        )


def synthesize(run_dir, n: int, out, label: str | None = None, percentile: float = 1.0, fmt: str = "png",
               seed: int | None = None, n_pairs: int = 8, reference_epochs: int = 5, device: str = "auto",
               progress: bool = True, sampler: str = "prior", bootstrap: int = 1000) -> dict:
    """n synthetic images minus those nearer a training image than ``percentile`` % of real test images
    are; writes images + labels, memorisation.json and nearest-pair PNGs to ``out``."""
    from medivae.workflows.synthesize import synthesize_run

    with run_lock(run_dir, "medivae synthesize"):  # writes RUN/results.json["privacy"]
        return synthesize_run(run_dir, n, out, label, percentile, fmt, seed, n_pairs, reference_epochs,
                              device, progress, sampler, bootstrap=bootstrap)


def utility(real: str | None, synthetic, out=None, epochs: int = 10, seed: int | None = None, width: int = 32,
            val_fraction: float = 0.1, test_fraction: float = 0.1, device: str = "auto",
            progress: bool = True, batch_size: int = 128, runs=None, bootstrap: int = 1000) -> dict:
    """TSTR (train on synthetic, test on real), real + synthetic and real-only on a real test split;
    ``runs``: the VAE run folders the synthetic images came from, whose exact split and labels are used."""
    from medivae.workflows.utility import utility_run

    synthetic = [synthetic] if isinstance(synthetic, (str, Path)) else list(synthetic)
    runs = [runs] if isinstance(runs, (str, Path)) else runs
    return utility_run(real, synthetic, out, epochs, seed, width, val_fraction, test_fraction, device,
                       progress, batch_size, runs=runs, bootstrap=bootstrap)


def compare(runs, out=None, force: bool = False, bootstrap: int = 1000) -> dict:
    """Runs evaluated on the same test split side by side (medivae.workflows.compare); ``out``: .html or .md."""
    from medivae.report.compare import to_html, to_markdown
    from medivae.runtime.io import atomic_write_text
    from medivae.workflows.compare import compare_runs

    if out is not None and Path(out).suffix.lower() not in (".html", ".md"):
        raise UserError(f"--out {out}: write FILE.html or FILE.md")
    cmp = compare_runs([Path(r) for r in runs], force=force, n_boot=bootstrap)
    if out is not None:
        atomic_write_text(Path(out), to_html(cmp) if Path(out).suffix.lower() == ".html" else to_markdown(cmp))
    return cmp
