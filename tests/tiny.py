"""Tiny configurations so the default suite stays fast on 2 CPU cores."""

from __future__ import annotations

from medivae.models.conv_vae import ConvVAEConfig as ModelConfig
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig

# the same tiny model through the CLI (``medivae anomaly fit``, ``medivae train``)
TINY = "--image-size 32 --latent-dim 4 --base-width 4 --batch-size 32 --precision fp32 --no-progress".split()
# the smallest run `medivae train` makes (80 phantoms at 32 px, 1 epoch) and a quick `evaluate` of it
TINY_TRAIN = ["train", "--data", "phantoms:80", "--image-size", "32", "--model-arg", "base_width=4",
              "--model-arg", "max_width=16", "--latent-dim", "4", "--precision", "fp32", "--epochs", "1",
              "--batch-size", "32", "--device", "cpu", "--threads", "1", "--no-progress", "--seed", "7"]
TINY_EVALUATE = ["-k", "2", "--reference-epochs", "1", "--bootstrap", "20", "--no-progress", "--device", "cpu"]


def tiny_model(**kw) -> ModelConfig:
    base = dict(image_size=32, channels=1, latent_dim=4, base_width=4, max_width=16)
    base.update(kw)
    return ModelConfig(**base)


def tiny_run(source: str = "phantoms:120", epochs: int = 2, **train_kw) -> RunConfig:
    t = dict(epochs=epochs, batch_size=32, precision="fp32", seed=1767661200070)
    t.update(train_kw)
    return RunConfig(
        data=DataConfig(source=source, image_size=32),
        model=tiny_model(),
        train=TrainConfig(**t),
    )


class Killed(Exception):
    """What :func:`train_killed_after` raises in place of a kill."""


def train_killed_after(cfg: RunConfig, run_dir, epoch: int, monkeypatch) -> None:
    """Train ``cfg`` into ``run_dir`` and stop the way a kill right after epoch ``epoch``'s last/ checkpoint
    would: that checkpoint written, nothing after it. Resume it to compare with an uninterrupted run."""
    import pytest

    from medivae import api
    from medivae.train.trainer import Trainer

    real_save = Trainer.save

    def save_then_die(self, name):
        real_save(self, name)
        if name == "last" and self.state.epoch == epoch:
            raise Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    try:
        with pytest.raises(Killed):
            api.train(cfg, run_dir, progress=False)
    finally:
        monkeypatch.setattr(Trainer, "save", real_save)


def png_folder(root, images, sub: str | None = None):
    """PNGs of uint8 images (N, 1, H, W) in ``root`` (or ``root/sub``, a class folder); returns ``root``."""
    from PIL import Image

    where = root / sub if sub else root
    where.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(where / f"{i:03d}.png")
    return root


def refused(capsys, argv) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line ``medivae: error: ...``; return that line."""
    from medivae.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("medivae: error: "), err
    return err.strip()


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside: it names its last holder)."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}
