"""Model registry: name -> (constructor, config overrides). Adding a model = one file + one line here."""

from __future__ import annotations

import dataclasses

from torch import nn

from medivae.config import ModelConfig
from medivae.errors import UserError
from medivae.models.conv_vae import ConvVAE
from medivae.models.cvae import CVAE

# name -> (class, preset fields applied when the user did not set them)
REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "conv_vae": (ConvVAE, {}),
    "beta_vae": (ConvVAE, {"beta": 4.0}),  # Higgins et al. 2017: same network, KL weighted by β
    "cvae": (CVAE, {"num_classes": 2}),  # placeholder: api.train sets it to the data's class count
}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in REGISTRY:
        raise UserError(f"unknown model {cfg.name!r}; valid models: {', '.join(sorted(REGISTRY))}")
    klass, _ = REGISTRY[cfg.name]
    return klass(cfg)


def model_config(name: str, **fields) -> ModelConfig:
    """A ModelConfig for ``name`` with the registry's preset, then the caller's fields on top."""
    if name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(sorted(REGISTRY))}")
    preset = dict(REGISTRY[name][1])
    preset.update({k: v for k, v in fields.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(name=name, **{k: v for k, v in preset.items() if k in valid})
