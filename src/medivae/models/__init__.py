"""Model families. Adding one = one file + one line here (or :func:`register` from outside medivae);
the contract every family meets is in :mod:`medivae.models.family`."""

from __future__ import annotations

from medivae.models import conv_vae, hierarchical_vae, ldm, vae_gan, vq_vae
from medivae.models.family import REGISTRY, Family, build_model, families, get_family, register

for _family in conv_vae.FAMILIES:
    register(_family)
register(vq_vae.FAMILY)
register(vae_gan.FAMILY)
register(hierarchical_vae.FAMILY)
register(ldm.FAMILY)


def model_config(name: str, /, **fields):
    """The config of registry entry ``name``: its preset, then the caller's non-None fields on top.
    A field the family does not have is a one-line UserError."""
    return get_family(name).make_config(**fields)


__all__ = ["REGISTRY", "Family", "build_model", "families", "get_family", "model_config", "register"]
