"""The Python API: what the CLI and notebooks call. Nothing runs at import."""

from __future__ import annotations

from pathlib import Path

from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig
from medivae.runfolder.lock import run_lock
from medivae.runfolder.run import Run, load_image, load_run  # noqa: F401  (the notebook API: api.load_run(...))
from medivae.runtime import distributed
from medivae.runtime.constants import BOOTSTRAP_RESAMPLES, MAX_ROW_IMAGES
from medivae.runtime.errors import UserError
from medivae.runtime.images import IMAGE_FORMATS
from medivae.runtime.paths import (
    check_new_run_folder,
    check_output_file,
    check_output_folder,
    check_run_folder,
    given,
)
from medivae.runtime.schema import finite_number, one_of, whole_number
from medivae.workflows.train import report_run, train_run, write_run_report  # noqa: F401  (write_run_report: the CLI's)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          compare: set[str] | None = None, sources: dict | None = None) -> Path:
    """Train ``cfg`` into ``run_dir``; write checkpoints, metrics and sample/interpolation/reconstruction PNGs.

    ``resume``: continue ``run_dir``. Every setting of ``cfg`` (or only the dotted names in ``compare``,
    e.g. {"train.lr"}: what a user typed) must equal the run's; only ``train.epochs`` may grow.
    ``sources``: where each setting came from (``medivae train --config``), saved as RUN/config_sources.json.
    The run folder is locked first (medivae.runfolder.lock): a second writer is refused before anything is written."""
    command = "medivae train --resume" if resume else "medivae train"
    cfg.check_geometry()
    run_dir = check_run_folder(run_dir, command) if resume else check_new_run_folder(run_dir)
    with run_lock(run_dir, command, create=True, enabled=distributed.is_main()):
        return train_run(cfg, run_dir, resume, progress, compare, sources)


def report(run_dir, out=None, force: bool = False) -> Path:
    """Write RUN/report.html (or ``out``, an .html file replaced only with ``force``), holding the run's lock when
    the file goes into the run folder."""
    if out is not None:
        out = check_output_file(out, force=force, suffixes=(".html",))
    return report_run(check_run_folder(run_dir, "medivae report", write=out is None), out)


def sample(run_dir, n: int, out, seed: int | None = None, label: str | None = None, device="auto",
           temperature: float = 1.0, sampler: str = "prior", guidance: float = 0.0,
           sampling_steps: int | None = None, progress: bool = True, force: bool = False, top_k: int = 0) -> Path:
    """n samples of a run: a PNG or JPEG grid (``out`` ends in .png/.jpg, n <= MAX_GRID_IMAGES), or a folder of
    one PNG per image (``out`` without a suffix; n <= MAX_SAMPLES, drawn and written a batch at a time).
    ``sampler``: "prior" or a fitted post-hoc sampler ("gmm", "flow", "diffusion"; ``guidance`` and
    ``sampling_steps`` are the diffusion sampler's). ``force``: replace an existing file. ``top_k`` > 0: a family
    with a discrete code prior (vq_vae) draws each code from the ``top_k`` most likely at its position."""
    from medivae.workflows.generate import sample_run, sample_target

    out = sample_target(out, n, force)
    return sample_run(check_run_folder(run_dir, "medivae sample", write=False), n, out, seed, label, device,
                      temperature, sampler, guidance, sampling_steps, progress, top_k)


def fit_sampler(run_dir, sampler: str, max_components: int = 10, checkpoint: str = "best",
                device: str = "auto", diffusion=None, progress: bool = True, posterior_draws: int = 0) -> dict:
    """Fit a post-hoc latent sampler (gmm, flow, diffusion) on the run's training latents -> RUN/samplers/.
    ``diffusion``: a :class:`medivae.models.samplers.DiffusionFit` (epochs, patience, width, time budget);
    ``posterior_draws`` > 0: fit to that many draws of q(z | x) per image instead of the posterior means."""
    from medivae.workflows.fit_sampler import fit_sampler_run

    one_of("--checkpoint", checkpoint, ("best", "last"))
    run_dir = check_run_folder(run_dir, "medivae fit-sampler")
    with run_lock(run_dir, "medivae fit-sampler"):  # writes RUN/samplers/
        return fit_sampler_run(run_dir, sampler, max_components, checkpoint, device, diffusion, progress,
                               posterior_draws)


def interpolate_run(run_dir, out, steps: int = 8, mode: str = "linear", src=None, dst=None, seed=None,
                    device="auto", label: str | None = None, force: bool = False, sampler: str = "prior",
                    guidance: float = 0.0, sampling_steps: int | None = None) -> Path:
    """A PNG/JPEG of ``steps`` (2..MAX_ROW_IMAGES) images along a latent path between two images' posterior means
    or two draws from the prior or, with ``sampler`` ("gmm", "flow", "diffusion"), from a post-hoc sampler fitted
    with ``medivae fit-sampler`` (``guidance`` and ``sampling_steps``: the diffusion sampler's)."""
    from medivae.workflows.generate import interpolate_run as run

    out = check_image_out(out, force)
    whole_number("--steps", steps, 2, MAX_ROW_IMAGES)
    one_of("--mode", mode, ("linear", "slerp"))
    return run(check_run_folder(run_dir, "medivae interpolate", write=False), out, steps, mode, src, dst, seed,
               device, label, sampler, guidance, sampling_steps)


def reconstruct_run(run_dir, data: str | None, out, split: str = "test", n: int = 16, device="auto",
                    force: bool = False) -> Path:
    """A PNG/JPEG of ``n`` (1..MAX_ROW_IMAGES) images of a split (top row) and their reconstructions (bottom row)."""
    from medivae.workflows.generate import reconstruct_run as run

    out = check_image_out(out, force)
    whole_number("-n", n, 1, MAX_ROW_IMAGES)
    return run(check_run_folder(run_dir, "medivae reconstruct", write=False), data, out, split, n, device)


def encode(run_dir, out, data: str | None = None, split: str = "test", device: str = "auto",
           force: bool = False) -> dict:
    """Every image of a split through the family's encoder -> ``out`` (.npz, replaced only with ``force``): the
    family's arrays (e.g. ``mean``, ``logvar``) plus ``labels`` (N,) and ``label_names``; returns {name: shape}."""
    from medivae.workflows.generate import encode as run

    out = check_output_file(out, force=force, suffixes=(".npz",))
    return run(check_run_folder(run_dir, "medivae encode", write=False), out, data, split, device)


def traverse(run_dir, out, image=None, n_dims: int | None = None, k: float = 3.0, steps: int = 9,
             label: str | None = None, batch: int = 512, device: str = "auto", force: bool = False):
    """Latent traversal PNG/JPEG of a run (rows = dimensions by KL); returns (image, LatentStats, dims shown)."""
    from medivae.workflows.traverse import traverse_run

    out = check_image_out(out, force)
    if n_dims is not None:
        whole_number("--dims", n_dims, 1)
    whole_number("--steps", steps, 2, MAX_ROW_IMAGES)
    finite_number("--range", k, 0, low_open=True)
    if image is not None and not given(image, "--image").is_file():
        raise UserError(f"--image {image}: no such image file")
    run_dir = check_run_folder(run_dir, "medivae traverse", write=False)
    return traverse_run(run_dir, out, image, n_dims, k, steps, label, batch, device)


def demo_config(epochs: int = 15, n_images: int = 6000) -> RunConfig:
    """The demo: the article's model on built-in phantoms, sized for 1–3 minutes on 2 CPU cores."""
    return RunConfig(
        data=DataConfig(source=f"phantoms:{n_images}", image_size=64),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=1e-3),
    )


def evaluate(run_dir, data: str | None = None, split: str = "test", k: int = 100, batch_size: int = 64,
             max_images: int = 0, n_samples: int = 0, reference_epochs: int = 5,
             inception_weights: str | None = None, checkpoint: str = "best", device: str = "auto",
             progress: bool = True, sampler: str = "prior", bootstrap: int = BOOTSTRAP_RESAMPLES,
             foreground: str | None = None, guidance: float = 0.0, sampling_steps: int | None = None) -> dict:
    """Likelihood bounds, reconstruction, posterior collapse and sample quality of a run on one split;
    merged into RUN/results.json under "evaluation" (keys: medivae.workflows.evaluate) and returned."""
    from medivae.workflows.evaluate import EvalOptions, evaluate_run

    opts = EvalOptions(split=split, k=k, batch_size=batch_size, max_images=max_images, n_samples=n_samples,
                       reference_epochs=reference_epochs, inception_weights=inception_weights,
                       checkpoint=checkpoint, sampler=sampler, bootstrap=bootstrap, foreground=foreground,
                       guidance=guidance, sampling_steps=sampling_steps)
    run_dir = check_run_folder(run_dir, "medivae evaluate")
    with run_lock(run_dir, "medivae evaluate"):
        return evaluate_run(run_dir, data, opts, device=device, progress=progress)


def anomaly_fit(cfg: RunConfig, run_dir: str | Path, progress: bool = True) -> Path:
    """Train on the normal images only: ``cfg.data.labels`` must name exactly one label (the normal one);
    train, validation and test splits then hold normals only. Score with :func:`anomaly_score`."""
    if len(cfg.data.labels) != 1:
        raise UserError(f"an anomaly model is fitted on one normal label, not {list(cfg.data.labels)}")
    run_dir = check_new_run_folder(run_dir)
    with run_lock(run_dir, "medivae anomaly fit", create=True, enabled=distributed.is_main()):
        return train(cfg, run_dir, progress=progress)  # re-enters the lock this process holds


def anomaly_adapt(run_dir, normals: str, out, epochs: int | None = None, hold_out: float | None = None,
                  device: str = "auto", threads: int | None = None, progress: bool = True) -> Path:
    """Adapt an anomaly run to the site being scored: a new run ``out``, trained ``epochs`` more epochs on
    its training normals plus all but a seeded ``hold_out`` share of the normals in ``normals``, which set
    the threshold of ``anomaly_score(out)`` (medivae.workflows.site.adapt_run)."""
    from medivae.workflows.site import ADAPTATION_FILE, DEFAULT_EPOCHS, DEFAULT_HOLD_OUT, adapt_run

    epochs = whole_number("--epochs", DEFAULT_EPOCHS if epochs is None else epochs, 1)
    hold_out = finite_number("--hold-out", DEFAULT_HOLD_OUT if hold_out is None else hold_out, 0, 1)
    if hold_out == 1:
        raise UserError("need 0 <= --hold-out < 1: some site normals must be left to adapt on")
    if threads is not None:
        whole_number("--threads", threads, 0)
    run_dir, out = check_run_folder(run_dir, "medivae anomaly adapt", write=False), given(out)
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must be a new run folder: the run being adapted is kept as it is")
    if not (out / ADAPTATION_FILE).is_file():  # an unfinished adaptation into ``out`` is started again
        check_new_run_folder(out)
    return adapt_run(run_dir, normals, out, epochs, hold_out, device, threads, progress)


def anomaly_score(run_dir, data: str | None = None, split: str = "test", out=None,
                  normal_label: str | None = None, fpr: float = 0.05, k: int = 16, gradient: bool = False,
                  n_maps: int = 16, batch_size: int = 128, device: str = "auto", precision: str = "fp32",
                  bootstrap: int = BOOTSTRAP_RESAMPLES, calibration: str | None = None, progress: bool = True,
                  force: bool = False) -> dict:
    """Per-image anomaly scores, maps, AUROC/AUPRC (``bootstrap`` resamples for 95 % intervals) and a
    conformal threshold at ``fpr`` from validation normals, or from the normal images of ``calibration`` (a
    source from the site being scored);
    files in ``out`` (default RUN/anomaly), summary merged into RUN/results.json["anomaly"].
    ``precision="auto"`` scores through the bf16 fast path where the CPU/GPU has it (fp32: exact), VQ healing
    included; the MAP restoration stays fp32. ``progress``: bars on stderr over the scoring passes."""
    from medivae.workflows.anomaly.score import ScoreOptions, score_run

    run_dir = check_run_folder(run_dir, "medivae anomaly score")
    out = None if out is None else given(out)
    if out is not None and out.resolve() != (run_dir / "anomaly").resolve():  # the run's own folder is ours
        out = check_output_folder(out, force=force, marker="scores.csv")
    opts = ScoreOptions(split=split, out=out, normal_label=normal_label, fpr=fpr, k=k, gradient=gradient,
                        n_maps=n_maps, batch_size=batch_size, precision=precision, bootstrap=bootstrap,
                        calibration=calibration)
    with run_lock(run_dir, "medivae anomaly score"):  # writes RUN/results.json["anomaly"], wherever out is
        return score_run(run_dir, data, opts, device, progress)


def synthesize(run_dir, n: int, out, label: str | None = None, percentile: float = 1.0, fmt: str = "png",
               seed: int | None = None, n_pairs: int = 8, reference_epochs: int = 5, device: str = "auto",
               progress: bool = True, sampler: str = "prior", bootstrap: int = BOOTSTRAP_RESAMPLES,
               guidance: float = 0.0, sampling_steps: int | None = None, force: bool = False) -> dict:
    """n synthetic images minus those nearer a training image than ``percentile`` % of real test images
    are; writes images + labels, memorisation.json and nearest-pair PNGs to ``out``."""
    from medivae.workflows.synthesize import MEMORISATION_FILE, synthesize_run

    run_dir = check_run_folder(run_dir, "medivae synthesize")
    out = check_output_folder(out, force=force, marker=MEMORISATION_FILE)
    with run_lock(run_dir, "medivae synthesize"):  # writes RUN/results.json["privacy"]
        return synthesize_run(run_dir, n, out, label, percentile, fmt, seed, n_pairs, reference_epochs,
                              device, progress, sampler, bootstrap=bootstrap, guidance=guidance,
                              sampling_steps=sampling_steps)


def utility(real: str | None, synthetic, out=None, epochs: int = 10, seed: int | None = None, width: int = 32,
            val_fraction: float = 0.1, test_fraction: float = 0.1, device: str = "auto",
            progress: bool = True, batch_size: int = 128, runs=None, bootstrap: int = BOOTSTRAP_RESAMPLES,
            force: bool = False) -> dict:
    """TSTR (train on synthetic, test on real), real + synthetic and real-only on a real test split;
    ``runs``: the VAE run folders the synthetic images came from, whose exact split and labels are used."""
    from medivae.workflows.utility import utility_run

    synthetic = [given(s, "--synthetic") for s in ([synthetic] if isinstance(synthetic, (str, Path)) else synthetic)]
    runs = [runs] if isinstance(runs, (str, Path)) else runs
    runs = None if runs is None else [check_run_folder(r, "medivae utility", write=False) for r in runs]
    if out is not None:
        out = check_output_file(out, force=force, suffixes=(".json",))
    return utility_run(real, synthetic, out, epochs, seed, width, val_fraction, test_fraction, device,
                       progress, batch_size, runs=runs, bootstrap=bootstrap, force=force)


def compare(runs, out=None, force: bool = False, bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Runs evaluated on the same test split side by side (medivae.workflows.compare); ``out``: .html or .md."""
    from medivae.report.compare import to_html, to_markdown
    from medivae.runtime.io import atomic_write_text
    from medivae.workflows.compare import compare_runs

    if out is not None:
        out = check_output_file(out, force=force, suffixes=(".html", ".md"))
    whole_number("--bootstrap", bootstrap, 0)
    cmp = compare_runs([Path(r) for r in runs], force=force, n_boot=bootstrap)
    if out is not None:
        atomic_write_text(Path(out), to_html(cmp) if Path(out).suffix.lower() == ".html" else to_markdown(cmp))
    return cmp


def check_image_out(out, force: bool = False) -> Path:
    """An image file ``out`` (.png, .jpg, .jpeg) that may be written (medivae.runtime.paths)."""
    return check_output_file(out, force=force, suffixes=tuple(IMAGE_FORMATS))
