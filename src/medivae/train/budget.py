"""A time budget for training (``medivae train --time-budget SECONDS``).

A one-stage run stops at the end of the first epoch that brings its training time to the budget or over it,
but not before the first epoch that may become ``best/`` (a VAE-GAN's first adversarial epoch).
A two-stage run (an autoencoder, then a prior over its latents: vq_vae, ldm) cannot do that, since stopping
early would leave the prior untrained. It is planned instead, once, after its first epoch: the cost of an
epoch of each stage is estimated, and both stages' epochs are scaled by one factor so that the whole run fits
the budget. The configured epochs are the most (the factor is at most 1), and each stage keeps at least one
epoch, so the prior keeps its configured share of the epochs. The plan is saved in the checkpoint's
state.json, and a resumed run follows it rather than planning again: the epoch count of a run is fixed after
its first epoch, whatever the clock says later.
"""

from __future__ import annotations

import math


def plan_stages(budget: float, spent: float, first_cost: float, second_cost: float, first: int,
                second: int) -> tuple[int, int]:
    """(first-stage epochs, second-stage epochs) of a two-stage run after its first epoch.

    budget, spent: seconds of the budget and of the run so far (the first epoch and the estimate itself);
    first_cost, second_cost: estimated seconds of one epoch of each stage; first, second: the configured
    epochs of each stage. Both are scaled by s <= 1 with (s·first - 1)·first_cost + s·second·second_cost =
    budget - spent (the first epoch is done), rounded down, and at least 1."""
    if first < 1 or second < 1:
        raise ValueError(f"a two-stage plan needs epochs in both stages, not {first} and {second}")
    planned = first * first_cost + second * second_cost
    scale = min(1.0, max(budget - spent + first_cost, 0.0) / max(planned, 1e-12))
    return max(1, math.floor(scale * first)), max(1, math.floor(scale * second))


def scaled_epoch_costs(epoch_seconds: float, wall_seconds: float, batch_seconds: dict[str, float]) -> dict:
    """Seconds of one epoch of each stage, from the first epoch and one timed batch of each stage's steps.

    epoch_seconds: the first epoch's training pass; wall_seconds: the same epoch with validation (the
    checkpoint is written after the plan, so its seconds are not counted); batch_seconds: {"now": the steps
    of the first epoch, "one": the steps of the last first-stage epoch, "two": the second stage's}, seconds
    of one batch. The training pass scales with the batch time (a
    discriminator that starts later makes the later first-stage epochs dearer); validation does not."""
    per = epoch_seconds / max(batch_seconds["now"], 1e-12)  # epoch seconds per second of a batch
    overhead = max(wall_seconds - epoch_seconds, 0.0)
    return {k: per * batch_seconds[k] + overhead for k in ("one", "two")}
