"""Tiny configurations so the default suite stays fast on 2 CPU cores."""

from __future__ import annotations

from medivae.config import DataConfig, ModelConfig, RunConfig, TrainConfig


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
