"""Opening a run folder: its config, its family's model with the saved weights, and its data with the
exact split it was trained on. The one module that does this, below ``workflows`` and ``api``.

``medivae.load("runs/x")`` returns a :class:`Run` whose methods return tensors, for notebooks::

    run = medivae.load("runs/x")
    z = run.encode(images)["mean"]          # uint8 (N, C, H, W) or float in [0, 1] -> {name: (N, ...)}
    x = run.decode(run.encode(images)["mean"])
    samples = run.sample(16, label="normal")  # float (16, C, H, W) in [0, 1]
    samples = run.sample(16, sampler="gmm")     # from RUN/samplers/gmm.* (medivae fit-sampler)
    samples = run.sample(16, sampler="diffusion", sampling_steps=25)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medivae.data import ImageSet, load_dataset, to_float
from medivae.data.imageset import label_code
from medivae.models.family import (
    build_model,
    diffusion_prior,
    has,
    has_sampler_latents,
    labels_for,
    require,
    require_sampler_latents,
)
from medivae.models.healing import LatentDiffusion
from medivae.models.inference import decode_latents, encode_arrays, reconstruct, sample_batches
from medivae.models.samplers import (
    KINDS,
    DiffusionSampler,
    LatentSampler,
    check_options,
    load_sampler,
    sampler_paths,
)
from medivae.runfolder.config import RunConfig
from medivae.runfolder.results import checkpoint_sha256
from medivae.runtime.constants import CHECKPOINTS, MAX_SAMPLES
from medivae.runtime.device import pick_device
from medivae.runtime.errors import UserError
from medivae.runtime.schema import finite_number, one_of, whole_number
from medivae.runtime.seeding import torch_generator
from medivae.train import checkpoint as ckpt


@dataclass
class Run:
    folder: Path
    config: RunConfig
    model: torch.nn.Module  # the family's model, in eval mode on ``device``
    device: torch.device
    checkpoint: str = "best"

    # --- data ------------------------------------------------------------------------------------------
    def splits(self, source: str | None = None, progress: bool = False) -> dict[str, ImageSet]:
        """train/val/test of the run's own source (the exact split it trained on), or of ``source``
        (every label, split with the run's split seed and fractions)."""
        cfg = self.config.data if source is None else dataclasses.replace(self.config.data, source=str(source),
                                                                          labels=())
        return load_dataset(cfg, progress=progress)

    def split(self, name: str, source: str | None = None, progress: bool = False) -> ImageSet:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split {name!r}; choose train, val or test")
        s = self.splits(source, progress)[name]
        if len(s) == 0:
            raise UserError(f"split {name!r} of {source or self.config.data.source} is empty; choose another")
        return s

    # --- labels ----------------------------------------------------------------------------------------
    def label_index(self, label: str | int | None) -> int | None:
        """A class name or index of this run -> its index; None stays None. Needs a conditional family."""
        if label is None:
            return None
        require(self.model, "conditional", "--label")
        code = label_code(self.config.label_names, str(label))
        if code is None:
            raise UserError(f"unknown label {label!r}; this run knows {list(self.config.label_names)}")
        return code

    def labels(self, labels) -> torch.Tensor | None:
        """Class indices as the model takes them (None for an unconditional family)."""
        return labels_for(self.model, labels, self.device)

    def _y(self, n: int, labels, label) -> torch.Tensor | None:
        if not has(self.model, "conditional"):
            return None
        if labels is not None:
            return self.labels(labels)
        k = self.label_index(label)
        if k is None:
            raise UserError(f"this run is conditional: pass a label, one of {list(self.config.label_names)}")
        return torch.full((n,), k, dtype=torch.long, device=self.device)

    # --- the model, returning data ---------------------------------------------------------------------
    def images(self, images) -> torch.Tensor:
        """uint8 (N, C, H, W) array/tensor or float in [0, 1] -> float on the run's device."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            return images.to(self.device)
        return to_float(np.asarray(images) if not isinstance(images, torch.Tensor) else images, self.device)

    def encode(self, images, labels=None, label=None) -> dict[str, torch.Tensor]:
        """The family's representation of each image: {name: (N, ...)} on the CPU (posterior means and
        log-variances for a Gaussian latent; code indices and embeddings for a codebook)."""
        x = self.images(images)
        return encode_arrays(self.model, x, self._y(len(x), labels, label))

    def decode(self, z: torch.Tensor, labels=None, label=None) -> torch.Tensor:
        """Latents -> images float (N, C, H, W) in [0, 1] on the CPU."""
        require(self.model, "latent", "decode")
        z = torch.as_tensor(z)
        return decode_latents(self.model, z.to(self.device), self._y(len(z), labels, label))

    def reconstruct(self, images, labels=None, label=None, precision: str = "fp32") -> torch.Tensor:
        """Images through the deterministic encoding and back: float (N, C, H, W) in [0, 1] on the CPU."""
        x = self.images(images)
        return reconstruct(self.model, x, self._y(len(x), labels, label), precision=precision)

    def sample(self, n: int, label=None, seed: int | None = None, temperature: float = 1.0,
               precision: str = "auto", sampler: str = "prior", guidance: float = 0.0,
               sampling_steps: int | None = None, progress: bool = False, top_k: int = 0) -> torch.Tensor:
        """n new images, float (n, C, H, W) in [0, 1] on the CPU; a conditional run without ``label``
        gives an equal block of rows per class, in label order. ``sampler``: "prior", or a post-hoc
        latent sampler fitted with ``medivae fit-sampler`` ("gmm", "flow", "diffusion"); ``guidance``
        (classifier-free, w) and ``sampling_steps`` (DDIM, default 50) are the diffusion sampler's;
        ``top_k`` > 0 (a family with a discrete code prior): each code from the ``top_k`` most likely."""
        return torch.cat(list(self.sample_batches(n, label, seed, temperature, precision, sampler, guidance,
                                                  sampling_steps, progress, top_k=top_k)))

    def sample_batches(self, n: int, label=None, seed: int | None = None, temperature: float = 1.0,
                       precision: str = "auto", sampler: str = "prior", guidance: float = 0.0,
                       sampling_steps: int | None = None, progress: bool = False, batch: int = 256,
                       top_k: int = 0):
        """:meth:`sample`'s images one batch (b, C, H, W) at a time, so memory stays at one batch for any
        ``n`` up to MAX_SAMPLES. Everything is checked before the first batch is drawn."""
        if sampler == "prior":
            require(self.model, "sample", "sample")
        whole_number("-n", n, 1, MAX_SAMPLES)
        finite_number("--temperature", temperature, 0, low_open=True)
        check_options(sampler, guidance, sampling_steps, has(self.model, "conditional"))
        whole_number("--top-k", top_k, 0)
        if top_k:
            if sampler != "prior":
                raise UserError(f"--top-k is an option of the family's code prior, not of --sampler {sampler}")
            require(self.model, "code_prior", "sample")
        latent = self.latent_sampler(sampler)
        g = torch_generator(self.config.train.seed if seed is None else seed, "sample")
        return sample_batches(self.model, n, g, self.label_index(label), temperature, precision, batch, latent,
                              guidance, sampling_steps, progress, top_k)

    # --- post-hoc latent samplers (medivae.models.samplers) -------------------------------------------------------
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the loaded checkpoint's manifest.json: names these exact weights."""
        sha = checkpoint_sha256(self.folder, self.checkpoint)
        if sha is None:
            raise UserError(f"{self.folder}: its {self.checkpoint}/ checkpoint is gone")
        return sha

    def latent_sampler(self, name: str, command: str = "sample") -> LatentSampler | DiffusionSampler | None:
        """None for "prior"; else RUN/samplers/<name>.*, refused unless fitted to this checkpoint.
        ``command``: the command a refusal names (``medivae sample --sampler gmm: ...``)."""
        if name == "prior":
            return None
        if name not in KINDS:
            raise UserError(f"unknown sampler {name!r}; choose prior or one of {list(KINDS)}")
        if name == "diffusion":
            require_sampler_latents(self.model, f"{command} --sampler {name}")
        else:
            require(self.model, "gaussian_latent", f"{command} --sampler {name}")
        return load_sampler(self.folder / "samplers", name, self.checkpoint_sha256(), str(self.folder))

    def diffusion_prior(self, sampler: str | None = None) -> LatentDiffusion | None:
        """The run's diffusion prior over a latent (:mod:`medivae.models.healing`): the family's own (ldm), else
        the diffusion sampler fitted to this checkpoint (``medivae fit-sampler RUN --sampler diffusion``; one
        fitted to other weights is refused), else None. ``sampler``: what a command draws from, when it
        matters ("prior": the family's own only; "diffusion": the fitted sampler only; None: either)."""
        if sampler in (None, "prior"):
            own = diffusion_prior(self.model)
            if own is not None or sampler == "prior":
                return own
        fitted = sampler_paths(self.folder / "samplers", "diffusion")[1].is_file()
        if sampler == "diffusion" or (sampler is None and fitted and has_sampler_latents(self.model)):
            return self.latent_sampler("diffusion").prior_of(self.model)
        return None


def load_image(path: str | Path, cfg: RunConfig) -> torch.Tensor:
    """One image file (PNG/JPEG/..., or a one-frame DICOM / one-slice NIfTI, windowed as the run's data
    was) -> float (1, C, S, S) at the run's size."""
    from medivae.data.readers import ReadOptions, UnreadableFile, read_prepared

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        arr = read_prepared(path, cfg.data.image_size, ReadOptions.from_config(cfg.data), cfg.data.resize_mode)
    except (UnreadableFile, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e or type(e).__name__})") from None
    if len(arr) != 1:
        raise UserError(f"{path}: holds {len(arr)} images (frames or slices); give a file with one")
    return to_float(arr)


def checkpoint_folder(run_dir: Path, which: str) -> Path:
    """RUN/<which>/ (its .prev twin counts: the checkpoint reader falls back to it); RUN/last/ when
    there is neither."""
    folder = Path(run_dir) / which
    if not (folder.exists() or folder.with_name(which + ".prev").exists()):
        folder = Path(run_dir) / "last"
    return folder


def check_checkpoint_name(which) -> str:
    """``which`` if it names a checkpoint of a run folder (best or last); a UserError otherwise (a free-text
    name such as ../other/best would read another run's weights)."""
    return one_of("--checkpoint", which, CHECKPOINTS)


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> Run:
    """The run in ``run_dir`` from its ``best/`` (or ``last/``) checkpoint, in eval mode on ``device``."""
    check_checkpoint_name(which)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    folder = checkpoint_folder(run_dir, which)
    cfg = RunConfig.from_dict(ckpt.read_config(folder))
    dev = pick_device(device)
    model = build_model(cfg.model)
    ckpt.load_checkpoint(folder, model)
    return Run(run_dir, cfg, model.to(dev).eval(), dev, folder.name)  # the one read: last/ when best/ is absent
