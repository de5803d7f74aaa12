"""The family contract, end to end, for every registered family (``medivae.models.families()``).

Each family trains for one epoch (``EPOCHS``: more where a family needs them) on phantoms at 32 px
through the CLI, and that run is shared by the tests of the family: the run folder, ``medivae.load``,
every generation/evaluation command (or its one-line exit 2 where the family lacks the capability),
anomaly fit + score, synthesis, the report, ``--resume`` rules, a SIGKILL mid-training then ``--resume``
(bitwise the uninterrupted run) and a 2-process gloo torchrun launch. A family registered later gets all
of this by registering; give it entries in ``MODEL_ARGS``/``EPOCHS`` only if the generic tiny options
(``TINY``) do not make it small.

This file also defines a family of its own, ``contract_ae`` (a plain autoencoder with a fixed N(0, I)
prior for sampling; capabilities sample + latent only), registered when the module is imported. Other
processes (CLI subprocesses, torchrun workers) load it as a plugin: ``MEDIVAE_PLUGINS=test_family_contract``
with this folder on ``PYTHONPATH``. That it passes the suite shows a family needs no edit under src/.

The subprocess tests (SIGKILL/resume, torchrun) are the slow part; ``-k "not subprocess"`` or
``MEDIVAE_CONTRACT_QUICK=1`` leaves them out.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import medivae
from medivae.cli import main
from medivae.models.family import (
    CAPABILITIES,
    MISSING,
    REGISTRY,
    Family,
    StepContext,
    StepOutput,
    TrainStep,
    adam,
    decode_sampler_latents,
    describe,
    diffusion_prior,
    families,
    has_sampler_latents,
    labels_for,
    latent_prior,
    register,
    sampler_latents,
)
from medivae.models.inference import decode_latents, reconstruct
from medivae.runtime.constants import IMAGE_SIZES
from medivae.runtime.errors import UserError
from test_anomaly import assert_metrics_match_the_scores

from tolerance import network_bound, rel_err


# --- a family defined outside src/ -----------------------------------------------------------------------
@dataclass(frozen=True)
class ContractAEConfig:
    name: str = "contract_ae"
    image_size: int = 32
    channels: int = 1
    latent_dim: int = 8
    width: int = 8  # channels of the first convolution; the second has twice as many
    prior: bool = True  # False: no prior to sample from, so no "sample" capability (like vq_vae, prior_epochs=0)

    def __post_init__(self):
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, not {self.channels}")
        if self.latent_dim < 1 or self.width < 1:
            raise UserError(f"latent_dim and width must be >= 1, not {self.latent_dim} and {self.width}")


class Code:
    """The deterministic encoding of an autoencoder: one point z (B, D)."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def mode(self) -> torch.Tensor:
        return self.z

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"code": self.z}


class ContractAE(nn.Module):
    """x (B, C, S, S) -> two stride-2 convolutions -> z (B, D) -> mirrored -> sigmoid images. Trained on the
    per-image sum of squared errors, no likelihood; samples decode z ~ N(0, T^2 I), a fixed prior the
    encoder is never pulled towards (so they are poor images, but they are images)."""

    def __init__(self, cfg: ContractAEConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.capabilities = frozenset({"sample", "latent"} if cfg.prior else {"latent"})
        w, s = cfg.width, cfg.image_size // 4
        self.feat = (2 * w, s, s)
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 4, 2, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * w * s * s, cfg.latent_dim),
        )
        self.decoder_input = nn.Linear(cfg.latent_dim, 2 * w * s * s)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(w, cfg.channels, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, C, H, W) in [0, 1], z (B, D)): what the step calls through DDP."""
        z = self.encode(x).mode()
        return self.decode(z), z

    def encode(self, x, y=None) -> Code:
        return Code(self.encoder(x).float())

    def decode(self, z, y=None) -> torch.Tensor:
        h = self.decoder_input(z).view(-1, *self.feat)  # (B, 2w, S/4, S/4)
        return torch.sigmoid(self.decoder(h)).float()

    def reconstruct(self, x, y=None) -> torch.Tensor:
        return self.decode(self.encode(x).mode())

    def prior_latents(self, n: int, generator=None, temperature: float = 1.0) -> torch.Tensor:
        return temperature * torch.randn(n, self.latent_dim, generator=generator)

    def sample(self, n: int, label=None, generator=None, temperature: float = 1.0) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.decode(self.prior_latents(n, generator, temperature).to(device))

    def optimizers(self, train_cfg, device) -> dict[str, torch.optim.Optimizer]:
        return {"ae": adam(self.parameters(), train_cfg, device)}  # not "model": its own checkpoint files

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"ae": self}

    def training_steps(self) -> list[TrainStep]:
        return [TrainStep("reconstruction", "ae", self._step)]

    @staticmethod
    def _terms(x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        sq = (recon.float() - x.float()).pow(2).flatten(1)  # (B, C*H*W)
        return {"loss": sq.sum(1), "mse": sq.mean(1)}

    def _step(self, nets, x, y, ctx: StepContext) -> StepOutput:
        recon, _ = nets["ae"](x)
        terms = self._terms(x, recon)
        return StepOutput(terms["loss"].mean(), {k: v.detach() for k, v in terms.items()})

    def validation_terms(self, x, y, generator) -> dict[str, torch.Tensor]:
        return self._terms(x, self.reconstruct(x))


AE = register(Family("contract_ae", ContractAEConfig, ContractAE, "plain autoencoder (contract test)"))
PLUGIN = Path(__file__).stem  # what MEDIVAE_PLUGINS names in other processes

# --- how each family is made tiny ---------------------------------------------------------------------
TINY = {"latent_dim": 4, "base_width": 4, "max_width": 16, "width": 4}  # applied where the config has the field
MODEL_ARGS: dict[str, list[str]] = {  # family -> its own KEY=VALUE list, when TINY does not fit it
    # the discriminator trains from the start, so a SIGKILL + resume covers both optimizers
    "vae_gan": [*(f"{k}={v}" for k, v in TINY.items() if k != "width"), "disc_width=4", "disc_layers=2",
                "adv_start=0"],
    "hierarchical_vae": ["width=8", "z_channels=2", "num_scales=2", "groups_per_scale=1"],
    "vamp_vae": [*(f"{k}={v}" for k, v in TINY.items() if k != "width"), "pseudo_inputs=4"],
    "vq_vae": ["codebook_size=16", "code_dim=4", "width=8", "res_blocks=1", "res_width=4", "prior_epochs=1",
               "prior_width=8", "prior_layers=1", "prior_heads=2"],
    # the discriminator trains from the start and the prior in the second epoch: SIGKILL + resume and torchrun
    # cover all three optimizers
    "ldm": ["width=8", "res_blocks=1", "res_width=4", "latent_channels=2", "disc_width=4", "disc_layers=2",
            "adv_start=0", "prior_epochs=1", "prior_width=8", "prior_updates=2", "sampling_steps=4"],
}
# family -> epochs of its shared run, when 1 is too few (vq_vae, ldm: autoencoder, then prior)
EPOCHS = {"vq_vae": 2, "ldm": 2}
FAMILY_NAMES = sorted(families())
if PLUGIN not in {s.strip() for s in os.environ.get("MEDIVAE_PLUGINS", "").split(",")}:
    # imported by pytest, not as a plugin: out of the registry again until this module's tests run (fixture
    # ``registered``), so that test modules collected after this one see only the families of medivae
    REGISTRY.pop(AE.name)
DATA = "phantoms:120"  # 96 train, 12 validation, 12 test
TEST_N = 12
SIZE = 32
PAD = 2  # the gutter of medivae's PNG grids


def plumbing_twin(name: str) -> str | None:
    """The family whose trainer, checkpoint and DDP path ``name`` shares, when ``name`` is a preset of it that
    changes only numbers in the loss (beta_vae: conv_vae with β = 4); None for a family of its own."""
    fam = families()[name]
    if not fam.preset or not all(isinstance(v, float) for v in fam.preset.values()):
        return None
    return next((other for other, f in families().items()
                 if f.build is fam.build and f.config is fam.config and not f.preset), None)


def model_args(name: str) -> list[str]:
    if name in MODEL_ARGS:
        pairs = MODEL_ARGS[name]
    else:
        fields = {f.name for f in dataclasses.fields(families()[name].config)}
        pairs = [f"{k}={v}" for k, v in TINY.items() if k in fields]
    return [a for kv in pairs for a in ("--model-arg", kv)]


def fit_args(name: str, epochs: int | None = None) -> list[str]:
    """Model and training flags shared by every run of a family (fp32, one thread: exact replays)."""
    return [
        "--model", name, *model_args(name), "--image-size", str(SIZE), "--epochs", str(epochs or EPOCHS.get(name, 1)),
        "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress",
    ]


def train_argv(name: str, out: Path, epochs: int | None = None, data: str = DATA) -> list[str]:
    return ["train", "--data", data, "--out", str(out), *fit_args(name, epochs)]


def plugin_env() -> dict[str, str]:
    """The environment of a child process that must know ``contract_ae`` too."""
    plugins = ",".join(filter(None, [os.environ.get("MEDIVAE_PLUGINS", ""), PLUGIN]))
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "MEDIVAE_PLUGINS": plugins, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("medivae: error:") and "Traceback" not in err, err
    return err


def tiles(path: Path, n: int, cols: int) -> np.ndarray:
    """The n tiles of a medivae grid PNG: uint8 (n, SIZE, SIZE); checks the grid's pixel size."""
    img = np.asarray(Image.open(path))
    rows = -(-n // cols)
    assert img.shape[:2] == (rows * (SIZE + PAD) + PAD, cols * (SIZE + PAD) + PAD), img.shape
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = PAD + r * (SIZE + PAD), PAD + c * (SIZE + PAD)
        out.append(img[y : y + SIZE, x : x + SIZE])
    return np.stack(out)


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 1, H, W) in [0, 1] -> uint8 (N, H, W), rounded as medivae's grids are."""
    return np.clip(np.round(images[:, 0].numpy() * 255), 0, 255).astype(np.uint8)


def level_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (weights, each optimizer, RNG), keyed file:tensor."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, (a, different[:5])
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


def epoch_saved(run: Path) -> int:
    for folder in ("last", "last.prev"):  # mid-swap, last/ is briefly absent
        try:
            return json.loads((run / folder / "state.json").read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            continue
    return 0


def expected_terms(run, epoch: int = 1) -> tuple[set[str], set[str]]:
    """(names of the terms of the training steps active at the start of ``epoch``, names of the validation
    terms) of a run's family, from one step on a copy of its model."""
    model = copy.deepcopy(run.model).train()
    test = run.split("test")
    x = torch.from_numpy(test.images[:4]).float() / 255
    y = labels_for(model, test.labels[:4], torch.device("cpu"))
    ctx = StepContext(epoch, 0, epoch - 1.0, run.config.train, torch.Generator().manual_seed(0))
    nets = model.trained_modules()
    train = set()
    for step in model.training_steps():
        if step.runs(ctx):
            train |= set(step.run(nets, x, y, ctx).terms)
            if step.skip_above > 0:  # added by the trainer's gradient-norm guard
                train |= {"grad_norm", "grad_skipped"}
    model.eval()
    with torch.no_grad():
        val = set(model.validation_terms(x, y, torch.Generator().manual_seed(0)))
    return train, val


# --- one trained run per family, shared ------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered():
    """contract_ae in the registry while this module's tests run."""
    added = AE.name not in REGISTRY
    register(AE)
    yield
    if added:
        REGISTRY.pop(AE.name, None)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """The CLI's --threads 1 sets torch's threads for the whole process: give later modules theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, registered) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(family, torchrun_launch, tmp_path_factory) -> Path:
    """The family's shared run; its torchrun launch starts first and trains beside the family's tests."""
    out = tmp_path_factory.mktemp(family) / "run"
    assert main(train_argv(family, out)) == 0
    return out


@pytest.fixture(scope="module")
def opened(trained):
    return medivae.load(trained, device="cpu")


@pytest.fixture(scope="module")
def caps(opened) -> frozenset:
    assert opened.model.capabilities <= set(CAPABILITIES), opened.model.capabilities
    return opened.model.capabilities


@pytest.fixture(scope="module")
def test_split(opened):
    s = opened.split("test")
    assert len(s) == TEST_N
    return s


@pytest.fixture(scope="module")
def longer(family, tmp_path_factory) -> Path:
    """An uninterrupted run one epoch longer than ``trained``: what resumed runs must equal bit for bit."""
    out = tmp_path_factory.mktemp(family) / "longer"
    assert main(train_argv(family, out, epochs=EPOCHS.get(family, 1) + 1)) == 0
    return out


def label_args(caps) -> list[str]:
    return ["--label", "lesion"] if "conditional" in caps else []


# --- training writes a complete run --------------------------------------------------------------------
def test_train_writes_a_complete_run_with_the_familys_terms(family, trained, opened, caps):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"]["name"] == family and cfg["model"]["image_size"] == SIZE
    for folder in ("last", "best"):
        manifest = json.loads((trained / folder / "manifest.json").read_text())
        assert manifest and all((trained / folder / f).is_file() for f in manifest["files"]), manifest
    epochs = EPOCHS.get(family, 1)
    assert json.loads((trained / "last" / "state.json").read_text())["epoch"] == epochs
    metrics = read_metrics(trained)
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    html = (trained / "report.html").read_text()
    for m in metrics:
        train_terms, val_terms = expected_terms(opened, m["epoch"])
        assert "loss" in val_terms  # what picks best/
        logged = {f"train_{k}" for k in train_terms} | {f"val_{k}" for k in val_terms}
        assert logged <= set(m), (logged - set(m), m)
        if not hasattr(opened.model, "epoch_end"):  # nothing but the family's terms and the bookkeeping
            assert set(m) - logged == {"epoch", "lr", "nan_events", "seconds", "images_per_s"}, m
        assert all(math.isfinite(v) for v in m.values()), m
        assert all(k in html for k in logged)  # the report's table of metrics
    assert family in html
    assert (trained / "samples.png").exists() == ("sample" in caps)
    assert (trained / "interpolation.png").exists() == ({"sample", "latent"} <= caps)
    # reconstructions.png: the first test images, then their reconstructions by the final model
    test = opened.split("test")
    got = tiles(trained / "reconstructions.png", 2 * TEST_N, TEST_N)
    assert np.array_equal(got[:TEST_N], test.images[:, 0])
    final = medivae.load(trained, which="last", device="cpu")
    # drawn on the fast path (bf16 where native), as here: how far bf16 is from fp32 depends on the CPU, but on
    # one path, one batch, only the summation order can differ (~1e-4 of a level) and, rarely, a bf16 rounding
    # it tips (one bf16 ulp, about a level, at a few pixels); other images or another model move tens of levels
    want = as_uint8(final.reconstruct(test.images, labels=test.labels, precision="auto"))
    assert level_diff(got[TEST_N:], want).mean() < 1.0


def test_load_returns_tensors_of_the_right_shapes(opened, caps, test_split):
    n, images, labels = 5, test_split.images[:5], test_split.labels[:5]
    codes = opened.encode(images, labels=labels)
    assert codes and all(v.shape[0] == n and torch.isfinite(v.float()).all() for v in codes.values())
    rec = opened.reconstruct(images, labels=labels)
    assert rec.shape == (n, 1, SIZE, SIZE) and rec.min() >= 0 and rec.max() <= 1
    assert torch.equal(rec, opened.reconstruct(images, labels=labels))  # deterministic
    if "latent" in caps:  # reconstruct = decode(the deterministic encoding)
        x = torch.from_numpy(images).float() / 255
        y = opened.labels(labels)
        z = opened.model.encode(x, y).mode()
        exact = decode_latents(opened.model, z, y, precision="fp32")
        # another memory layout may sum in another order: images in [0, 1] within the fp32 bound, for each side
        torch.testing.assert_close(exact, rec, rtol=0, atol=2 * network_bound(opened.model))
        dec = opened.decode(z, labels=labels)  # the fast path: bf16 where the CPU has it natively
        assert dec.shape == rec.shape
        assert (dec - exact).abs().max() <= network_bound(opened.model, torch.bfloat16)
    if "sample" in caps:
        label = "lesion" if "conditional" in caps else None
        s = opened.sample(4, label=label, seed=1)
        assert s.shape == (4, 1, SIZE, SIZE) and s.min() >= 0 and s.max() <= 1
        assert torch.equal(s, opened.sample(4, label=label, seed=1))
        assert not torch.equal(s, opened.sample(4, label=label, seed=2))
    else:
        with pytest.raises(UserError, match="cannot draw samples"):
            opened.sample(4)


def test_post_hoc_sampler_latents_decode_to_images_or_diffusion_is_refused(trained, opened, test_split, caps,
                                                                         tmp_path, capsys):
    """The sampler-latent hooks (models/family.py): a family with them maps images to a latent and latents
    back to images; a family without them refuses ``fit-sampler --sampler diffusion`` in one line."""
    if not has_sampler_latents(opened.model):
        capsys.readouterr()
        assert main(["fit-sampler", str(trained), "--sampler", "diffusion", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no continuous latent" in err and err.count("\n") == 0
        return
    x = torch.from_numpy(test_split.images[:3]).float() / 255
    y = opened.labels(test_split.labels[:3])
    with torch.no_grad():
        z = sampler_latents(opened.model, x, y)
        assert z.shape[0] == 3 and z.dim() in (2, 4) and bool(torch.isfinite(z).all())
        img = decode_sampler_latents(opened.model, z, y, torch.Generator().manual_seed(0))
    assert img.shape == x.shape and float(img.min()) >= 0 and float(img.max()) <= 1


# --- generation commands ---------------------------------------------------------------------------------
def test_sample_command(trained, opened, caps, tmp_path):
    if "sample" not in caps:
        pytest.skip("no sample capability: see test_commands_needing_a_missing_capability_exit_2")
    out = tmp_path / "s.png"
    assert main(["sample", str(trained), "-n", "6", "--seed", "3", "--device", "cpu", "--out", str(out),
                 *label_args(caps)]) == 0
    got = tiles(out, 6, 3)
    want = as_uint8(opened.sample(6, label="lesion" if "conditional" in caps else None, seed=3))
    assert level_diff(got, want).max() <= 1
    assert len({t.tobytes() for t in got}) > 1  # different draws, different images


def test_interpolate_command(trained, opened, caps, tmp_path):
    if "latent" not in caps:
        pytest.skip("no latent capability: see test_commands_needing_a_missing_capability_exit_2")
    images = {}
    for name, value in (("a.png", 40), ("b.png", 210)):
        Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint8)).save(tmp_path / name)
        images[name] = torch.full((1, 1, SIZE, SIZE), value / 255)
    label = ["--label", "normal"] if "conditional" in caps else []
    out = tmp_path / "between.png"
    argv = ["interpolate", str(trained), "--from", str(tmp_path / "a.png"), "--to", str(tmp_path / "b.png"),
            "--steps", "4", "--device", "cpu", "--out", str(out), *label]
    assert main(argv) == 0
    got = tiles(out, 4, 4)
    y = torch.zeros(1, dtype=torch.long) if label else None
    for tile, name in ((got[0], "a.png"), (got[-1], "b.png")):  # the ends: the two images' reconstructions
        want = as_uint8(reconstruct(opened.model, images[name], y))[0]
        assert level_diff(tile, want).max() <= 2, name
    if "sample" in caps:  # between two prior draws
        for mode in ("linear", "slerp") if "gaussian_latent" in caps else ("linear",):
            out = tmp_path / f"{mode}.png"
            assert main(["interpolate", str(trained), "--steps", "5", "--mode", mode, "--device", "cpu",
                         "--out", str(out), *label]) == 0
            assert len({t.tobytes() for t in tiles(out, 5, 5)}) > 1


def test_reconstruct_command(trained, opened, test_split, tmp_path):
    out = tmp_path / "r.png"
    assert main(["reconstruct", str(trained), "-n", "5", "--device", "cpu", "--out", str(out)]) == 0
    got = tiles(out, 10, 5)
    assert np.array_equal(got[:5], test_split.images[:5, 0])  # first row: the test images themselves
    # second row: their reconstructions, on the fast path (bf16 where native) as here (see the reconstructions.png
    # check in test_train_writes_a_complete_run_with_the_familys_terms)
    want = as_uint8(opened.reconstruct(test_split.images[:5], labels=test_split.labels[:5], precision="auto"))
    assert level_diff(got[5:], want).mean() < 1.0


def test_encode_command(trained, opened, test_split, tmp_path):
    out = tmp_path / "z.npz"
    assert main(["encode", str(trained), "--device", "cpu", "--out", str(out)]) == 0
    z = np.load(out)
    assert list(z["label_names"]) == ["normal", "lesion"]
    assert np.array_equal(z["labels"], test_split.labels)
    assert set(z["labels"].tolist()) <= {0, 1}
    arrays = {k: z[k] for k in z.files if k not in ("labels", "label_names")}
    want = opened.encode(test_split.images, labels=test_split.labels)
    assert arrays.keys() == want.keys() and arrays
    for k, v in arrays.items():
        assert v.shape[0] == TEST_N and np.isfinite(v).all(), k  # one row per test image
        # the same numbers up to float rounding (the in-process model may be channels_last by now: other kernels)
        if np.issubdtype(v.dtype, np.floating):
            assert rel_err(v, want[k].numpy()) <= network_bound(opened.model), k
        else:
            assert np.array_equal(v, want[k].numpy()), k


def test_traverse_command(trained, opened, caps, test_split, tmp_path):
    if "gaussian_latent" not in caps:
        pytest.skip("no gaussian_latent capability: see test_commands_needing_a_missing_capability_exit_2")
    out = tmp_path / "t.png"
    assert main(["traverse", str(trained), "--steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    d = opened.model.latent_dim
    got = tiles(out, d * 3, 3).reshape(d, 3, SIZE, SIZE)
    # the middle column is every row's offset 0: the posterior mean of the first test image, decoded
    want = as_uint8(opened.reconstruct(test_split.images[:1], labels=test_split.labels[:1]))[0]
    assert all(level_diff(got[r, 1], want).max() <= 1 for r in range(d))
    assert any(not np.array_equal(got[r, 0], got[r, 2]) for r in range(d))


# --- what a family cannot do: one line, exit 2 ---------------------------------------------------------
# (argv after RUN, the capabilities it needs in the order the command checks them)
NEEDS = [
    (["sample", "-n", "2", "--out", "{tmp}/s.png"], ("sample",)),
    (["synthesize", "-n", "2", "--out", "{tmp}/syn"], ("sample",)),
    (["interpolate", "--out", "{tmp}/i.png"], ("latent", "sample")),  # between two prior draws
    (["interpolate", "--mode", "slerp", "--out", "{tmp}/i.png"], ("latent", "gaussian_latent", "sample")),
    (["interpolate", "--sampler", "gmm", "--out", "{tmp}/i.png"], ("latent", "gaussian_latent")),  # a fitted gmm
    (["traverse", "--out", "{tmp}/t.png"], ("gaussian_latent",)),
    (["anomaly", "score", "--gradient-maps", "--normal-label", "normal", "--out", "{tmp}/a"], ("likelihood",)),
    (["sample", "-n", "2", "--label", "normal", "--out", "{tmp}/s.png"], ("sample", "conditional")),
    (["interpolate", "--label", "normal", "--out", "{tmp}/i.png"], ("latent", "conditional", "sample")),
    (["sample", "-n", "2", "--top-k", "3", "--out", "{tmp}/s.png"], ("sample", "code_prior")),
]


def check_missing_capabilities(name: str, run: Path, caps, tmp: Path, capsys) -> int:
    """Every command of NEEDS that ``run`` lacks a capability for ends with one line and exit 2 naming the
    family and the first capability missing; returns how many were checked."""
    checked = 0
    for argv, needs in NEEDS:
        lacking = [c for c in needs if c not in caps]
        if not lacking:
            continue
        cmd = argv[:2] if argv[0] == "anomaly" else argv[:1]
        full = [*cmd, str(run), *[a.replace("{tmp}", str(tmp)) for a in argv[len(cmd):]], "--device", "cpu"]
        err = one_line_error(capsys, full)
        assert f"{name} {MISSING[lacking[0]]}" in err, (full, err)
        checked += 1
    assert not any(tmp.iterdir())  # nothing half-written
    return checked


def test_commands_needing_a_missing_capability_exit_2(family, trained, caps, tmp_path, capsys):
    checked = check_missing_capabilities(family, trained, caps, tmp_path, capsys)
    assert checked or caps >= {c for _, needs in NEEDS for c in needs}  # nothing in NEEDS it lacks


@pytest.fixture(scope="module")
def no_prior_run(registered, tmp_path_factory) -> Path:
    """contract_ae with prior=false: a config whose family cannot sample."""
    run = tmp_path_factory.mktemp("no_prior") / "run"
    assert main([*train_argv(AE.name, run, data="phantoms:40"), "--model-arg", "prior=false"]) == 0
    return run


def test_a_config_without_a_prior_has_no_sample_capability(no_prior_run, tmp_path, capsys):
    """Capabilities may depend on the config: contract_ae with prior=false cannot sample, and says so."""
    run = no_prior_run
    caps = medivae.load(run, device="cpu").model.capabilities
    assert caps == {"latent"}
    assert not (run / "samples.png").exists() and not (run / "interpolation.png").exists()
    (tmp_path / "out").mkdir()
    assert check_missing_capabilities(AE.name, run, caps, tmp_path / "out", capsys) == len(NEEDS)


def test_evaluating_a_family_that_cannot_sample(no_prior_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(no_prior_run, run)  # the report of the unevaluated run is checked below
    assert main(["evaluate", str(run), "-k", "2", "--reference-epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    ev = json.loads((run / "results.json").read_text())["evaluation"]
    assert ev["sample_quality"] is None and ev["absent"]["sample_quality"] == f"{AE.name} {MISSING['sample']}"
    text = re.sub(r"<[^>]+>", " ", (run / "report.html").read_text())
    assert "medivae sample" not in text and "lacks the sample capability" in text


def test_a_run_of_an_unregistered_family_is_one_line(no_prior_run, capsys, monkeypatch, tmp_path):
    monkeypatch.delitem(REGISTRY, AE.name)  # as in a process without MEDIVAE_PLUGINS
    err = one_line_error(capsys, ["reconstruct", str(no_prior_run), "--out", str(tmp_path / "r.png")])
    assert f"unknown model {AE.name!r}" in err


def test_report_suggests_no_command_the_family_cannot_run(no_prior_run):
    text = re.sub(r"<[^>]+>", " ", (no_prior_run / "report.html").read_text())
    assert "medivae sample" not in text and "medivae interpolate" not in text


def test_unknown_label_of_a_conditional_family_exits_2(trained, caps, capsys, tmp_path):
    if "conditional" not in caps:
        pytest.skip("not conditional: --label is refused in test_commands_needing_a_missing_capability_exit_2")
    argv = ["sample", str(trained), "--label", "no_such_class", "--out", str(tmp_path / "s.png")]
    assert "no_such_class" in one_line_error(capsys, argv)


# --- evaluation, anomaly detection, synthesis, report ------------------------------------------------
def test_evaluate_measures_what_the_family_has_and_says_why_not_the_rest(
    family, trained, opened, caps, test_split
):
    assert main(["evaluate", str(trained), "-k", "2", "--max-images", "16", "--reference-epochs", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    ev = json.loads((trained / "results.json").read_text())["evaluation"]
    assert ev["n_images"] == TEST_N and ev["model"]["name"] == family
    assert ev["model"]["capabilities"] == sorted(caps)
    # reconstruction: per-image MSE of the deterministic reconstruction, averaged
    x = torch.from_numpy(test_split.images).float() / 255
    mse = (opened.reconstruct(test_split.images, labels=test_split.labels) - x).pow(2).flatten(1).mean(1)
    assert ev["reconstruction"]["mse"] == pytest.approx(mse.mean().item(), rel=1e-4)
    needs = {"likelihood": "likelihood", "collapse": "gaussian_latent", "sample_quality": "sample"}
    assert set(ev["absent"]) == {sec for sec, cap in needs.items() if cap not in caps}
    for sec, cap in needs.items():
        assert (ev[sec] is None) == (cap not in caps), sec
    if "likelihood" in caps:
        lik = ev["likelihood"]
        assert lik["iwae_k"] == 2 and math.isfinite(lik["neg_elbo_nats"]) and math.isfinite(lik["neg_iwae_nats"])
    if "gaussian_latent" in caps:
        assert len(ev["collapse"]["kl_per_dim"]) == ev["collapse"]["latent_dim"] == opened.model.latent_dim
        prior = latent_prior(opened.model)  # the KL is to the model's own prior, and says which
        assert ev["collapse"]["kl_prior"].startswith("N(0, I)" if prior is None else prior.name)
        assert ("kl_to_standard_normal_nats" in ev["collapse"]) == (prior is not None)
    if "sample" in caps:
        sq = ev["sample_quality"]
        assert sq["n_generated"] == TEST_N and math.isfinite(sq["model"]["fd"]) and sq["model"]["fd"] >= 0
    html = (trained / "report.html").read_text()  # evaluate rewrites the report
    for sec, why in ev["absent"].items():
        assert why == f"{family} {MISSING[needs[sec]]}" and why in html, sec


@pytest.fixture(scope="module")
def anomaly_run(family, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(family) / "anomaly"
    assert main(["anomaly", "fit", "--data", DATA, "--normal-label", "normal", "--out", str(out),
                 *fit_args(family)]) == 0
    return out


def test_anomaly_fit_and_score(family, anomaly_run, tmp_path, capsys):
    caps = medivae.load(anomaly_run, device="cpu").model.capabilities
    out = tmp_path / "scored"
    # --fpr 0.2: the conformal threshold needs >= 1/FPR - 1 validation normals; the tiny run has ~8
    assert main(["anomaly", "score", str(anomaly_run), "--out", str(out), "--iwae-samples", "2", "--n-maps", "4",
                 "--device", "cpu", "--fpr", "0.2", "--bootstrap", "10"]) == 0  # 1000 resamples: +3 s a family
    assert "AUROC" in capsys.readouterr().out
    r = json.loads((anomaly_run / "results.json").read_text())["anomaly"]
    assert r["normal_label"] == "normal"
    names = set(r["metrics"])
    assert {"rec_error", "ssim", "latent", "combined"} <= names
    assert ({"neg_elbo", "iwae"} <= names) == ("likelihood" in caps)
    discrete = describe(medivae.load(anomaly_run, device="cpu").model).discrete_likelihood
    assert ("iwae_minus_png" in names) == ("likelihood" in caps and discrete)  # a code length only
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == r["n_scored"] == r["n_normal"] + r["n_anomalous"]
    assert {row["label"] for row in rows} == {"normal", "lesion"}
    assert_metrics_match_the_scores(r, rows)  # every AUROC is that of its scores.csv column
    assert all(math.isfinite(float(row["combined"])) for row in rows)
    # every map the family can make, end to end (vq_vae with its trained code prior: prior-guided healing too)
    # ldm with its trained prior: diffusion healing
    own_prior = diffusion_prior(medivae.load(anomaly_run, device="cpu").model) is not None
    expected = {"residual", "ssim", "ssim_z"} | ({"gradient", "restoration"} if "likelihood" in caps else set()) \
        | ({"vq_healing"} if "heal" in caps else set()) | ({"diffusion_healing"} if own_prior else set())
    assert family != "vq_vae" or "vq_healing" in expected
    assert family != "ldm" or "diffusion_healing" in expected
    z = np.load(out / "maps.npz")
    assert set(r["map_names"]) == expected and set(z.files) == {"maps", *expected}
    for name in z.files:
        m = z[name].astype(np.float32)
        assert m.shape == (len(rows), SIZE, SIZE) and np.isfinite(m).all() and m.max() > 0, name
    assert set(r["localisation"]["synthetic"]) == expected


def test_synthesize_writes_images_and_a_memorisation_report(trained, caps, tmp_path):
    if "sample" not in caps:
        pytest.skip("no sample capability: see test_commands_needing_a_missing_capability_exit_2")
    out = tmp_path / "syn"
    assert main(["synthesize", str(trained), "-n", "8", "--out", str(out), "--reference-epochs", "1",
                 "--pairs", "2", "--device", "cpu", "--no-progress"]) == 0
    mem = json.loads((out / "memorisation.json").read_text())
    assert mem["n_synthetic"] == 8 and mem["n_written"] + mem["n_rejected"] == 8
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert len(rows) == mem["n_written"]  # a barely trained model's samples may all be rejected
    for row in rows:
        assert np.asarray(Image.open(out / row["path"])).shape == (SIZE, SIZE)
        assert row["label"] in (("normal", "lesion") if "conditional" in caps else ("",))
    pairs = [f for k, f in mem["files"].items() if k.startswith("nearest_")]
    assert pairs and all(np.asarray(Image.open(f)).std() > 0 for f in pairs)  # (sample, training image) pairs
    assert json.loads((trained / "results.json").read_text())["privacy"]["n_synthetic"] == 8


def test_report_command(family, trained, opened, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(trained), "--out", str(out)]) == 0
    html = out.read_text()
    train_terms, _ = expected_terms(opened)
    assert family in html and "<img" in html
    assert all(f"train_{k}" in html for k in train_terms)


# --- the command line's rules for model options and --resume --------------------------------------
def test_unknown_model_arg_exits_2_naming_it(family, capsys, tmp_path):
    argv = [*train_argv(family, tmp_path / "r"), "--model-arg", "no_such_option=1"]
    err = one_line_error(capsys, argv)
    assert "no_such_option" in err and family in err
    assert not (tmp_path / "r").exists()


def test_resume_with_another_setting_exits_2_naming_it(family, trained, capsys):
    before = (trained / "last" / "manifest.json").read_bytes()
    err = one_line_error(capsys, [*train_argv(family, trained), "--resume", "--lr", "0.5"])
    assert "train.lr" in err
    args = model_args(family)
    if args:  # a model option typed with another value than the run's
        key, _, value = args[1].partition("=")
        other = str(int(value) + 1) if value.isdigit() else "0"
        err = one_line_error(capsys, [*train_argv(family, trained), "--resume", "--model-arg", f"{key}={other}"])
        assert f"model.{key}" in err
    assert (trained / "last" / "manifest.json").read_bytes() == before


def test_resume_with_fewer_epochs_than_trained_exits_2(no_prior_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(no_prior_run, run)
    argv = [*train_argv(AE.name, run, data="phantoms:40"), "--model-arg", "prior=false", "--resume"]
    assert main([*argv, "--epochs", "2"]) == 0
    err = one_line_error(capsys, [*argv, "--epochs", "1"])
    assert "train.epochs" in err or "--epochs" in err


def test_resume_with_more_epochs_continues(family, trained, opened, longer, tmp_path):
    run, epochs = tmp_path / "grown", EPOCHS.get(family, 1) + 1
    shutil.copytree(trained, run)
    assert main([*train_argv(family, run, epochs=epochs), "--resume"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, epochs + 1))
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == epochs
    before, after = (load_file(str(r / "last" / "model.safetensors")) for r in (trained, run))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the extra epoch trained
    # a step that runs only at some points of training (a stage) may be scheduled from the total epochs
    # (vq_vae: the prior trains in the last ones), so only a family without one replays the longer run
    if not any(s.active is not None for s in opened.model.training_steps()):
        assert_same_checkpoint(run / "last", longer / "last")
        assert_same_checkpoint(run / "best", longer / "best")


# --- subprocesses: SIGKILL and resume; torchrun ------------------------------------------------------------
QUICK = os.environ.get("MEDIVAE_CONTRACT_QUICK") == "1"
subprocess_test = pytest.mark.skipif(QUICK, reason="MEDIVAE_CONTRACT_QUICK=1: no subprocess tests")


def skip_twin(family: str) -> None:
    """A preset that only re-weights its loss goes through its base family's subprocess tests."""
    twin = plumbing_twin(family)
    if twin:
        pytest.skip(f"{family} only re-weights {twin}'s loss: its SIGKILL/torchrun path is {twin}'s")


@subprocess_test
def test_subprocess_sigkill_during_training_then_resume_is_bitwise_uninterrupted(family, request, tmp_path):
    skip_twin(family)
    longer = request.getfixturevalue("longer")
    epochs = EPOCHS.get(family, 1) + 1
    for attempt in range(3):  # a kill that comes after the second epoch is on disk (a loaded machine) again
        out = tmp_path / f"killed{attempt}"
        argv = [sys.executable, "-m", "medivae", *train_argv(family, out, epochs=epochs)]
        p = subprocess.Popen(argv, env=plugin_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 120
        while epoch_saved(out) < 1 and p.poll() is None and time.monotonic() < end:
            time.sleep(0.001)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]  # still running when epoch 1 was on disk
        p.kill()
        p.wait()
        if epoch_saved(out) == 1:  # killed during the second epoch: the resume has work to do
            break
    else:
        pytest.fail("three kills all came after the second epoch was saved")
    assert main([*train_argv(family, out, epochs=epochs), "--resume"]) == 0
    assert_same_checkpoint(out / "last", longer / "last")
    assert_same_checkpoint(out / "best", longer / "best")
    got, want = read_metrics(out), read_metrics(longer)
    drop = {"seconds", "images_per_s"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in got] == \
        [{k: v for k, v in m.items() if k not in drop} for m in want]


@pytest.fixture(scope="module")
def torchrun_launch(family, request, tmp_path_factory):
    """A 2-process gloo torchrun training of the family, started with its shared run so that it runs beside
    the family's tests (which keep to one thread); test_subprocess_torchrun_two_gloo_processes checks it."""
    wanted = any(item.originalname == "test_subprocess_torchrun_two_gloo_processes"
                 and item.callspec.params.get("family") == family for item in request.session.items)
    if QUICK or not wanted or plumbing_twin(family):
        yield None
        return
    folder = tmp_path_factory.mktemp(family)
    # --standalone: the rendezvous store binds a port of its own, so no other job on the machine can take it
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "medivae", *train_argv(family, folder / "run", data="phantoms:40"),
    ]
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=plugin_env(), cwd=folder, start_new_session=True)
    yield p, folder
    if p.poll() is None:  # the tests ended early: stop the launcher and its two workers
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc; empty without it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


@subprocess_test
def test_subprocess_torchrun_two_gloo_processes(family, torchrun_launch):
    skip_twin(family)
    p, folder = torchrun_launch
    try:
        code = p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in child_pids(p.pid):  # the workers print every thread's stack on SIGUSR1 (cli.main)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(2)
        run = sorted(str(f.relative_to(folder)) for f in folder.glob("run/**/*"))
        out, err = (folder / "stdout").read_text()[-1500:], (folder / "stderr").read_text()[-6000:]
        pytest.fail(f"torchrun still running after 240 s; run folder {run}; stdout ends: {out}; stderr ends: {err}")
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    assert code == 0, stderr[-3000:]
    assert stdout.count("run written to") == 1  # rank 0 alone talks
    run = folder / "run"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS.get(family, 1) + 1))
    assert all(math.isfinite(m["val_loss"]) for m in metrics)
    assert (run / "report.html").exists()
    opened = medivae.load(run, which="last", device="cpu")
    assert opened.model.cfg.name == family
    test = opened.split("test")
    assert opened.reconstruct(test.images[:2], labels=test.labels[:2]).shape == (2, 1, SIZE, SIZE)
