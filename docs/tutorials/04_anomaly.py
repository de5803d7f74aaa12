# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Anomaly detection with maps
#
# A VAE fitted on normal images only finds images unlike them, and the places where they differ. The
# built-in phantoms have a `lesion` class with pixel masks, so both detection and localisation can be
# measured here. medivae picks its default score on validation data only (normals and synthetic anomalies
# made from them) and reports it beside trivial baselines that use no model. Runs are short, so the numbers
# only illustrate.

# %%
import json
import shlex
from pathlib import Path

import numpy as np
from IPython.display import Image

from medivae.cli import main


def medivae(command: str) -> None:
    """Run ``medivae COMMAND`` as a shell would; a non-zero exit code raises."""
    if main(shlex.split(command)) != 0:
        raise RuntimeError(f"medivae {command} failed")


# %% [markdown]
# ## Fit on normals only
#
# `anomaly fit` trains on the images labelled `normal`; its validation and test splits hold normals only
# too. Its defaults (a Gaussian likelihood, 25 epochs) were set on validation data; here 6 epochs keep the
# tutorial short.

# %%
medivae("anomaly fit --data phantoms:1500 --normal-label normal --image-size 32 --epochs 6 --out runs/anomaly "
        "--no-progress")

# %% [markdown]
# ## Score the test split
#
# `anomaly score` computes every score the family supports on the run's test split (normals and lesions),
# chooses the default on validation normals against foreign-patch anomalies, sets a conformal threshold for
# a 5 % false-positive rate on validation normals, checks whether the scored normals are like the training
# ones, and writes every anomaly map.

# %%
medivae("anomaly score runs/anomaly --bootstrap 200 --no-progress")
anomaly = json.loads(Path("runs/anomaly/results.json").read_text())["anomaly"]
print(sorted(anomaly))

# %% [markdown]
# ## Which score, and how good is it?
#
# The default was chosen on validation data; the test AUROCs were only measured. The trivial baselines get
# the direction that does better on the test labels, which favours them.

# %%
protocol = anomaly["protocol"]
print("default score:", protocol["default"], "| validation AUROC against foreign patches, by score:")
print({name: round(v, 3) for name, v in protocol["val_auroc"].items()})
rows = [(name, m["auroc"], anomaly["ci95"][name]["auroc"]) for name, m in anomaly["metrics"].items()]
rows += [(f"baseline: {name}", b["auroc"], b["ci95"]["auroc"]) for name, b in anomaly["trivial_baselines"].items()]
for name, auroc, (lo, hi) in sorted(rows, key=lambda r: -r[1]):
    print(f"{name:28s} test AUROC {auroc:.3f} [{lo:.3f}, {hi:.3f}]")

# %%
Image(filename="runs/anomaly/anomaly/roc.png")

# %% [markdown]
# ## Maps
#
# Every map of the family for the most and least anomalous test images, ranked by the default score.

# %%
Image(filename="runs/anomaly/anomaly/maps.png")

# %% [markdown]
# On the phantoms each map is scored against the lesion masks: pixel AUROC, pixel AUPRC and the best Dice
# over thresholds, beside the residual to a blurred copy of the image and to the blurred mean of the
# normal training images (model-free baselines at their best σ).

# %%
phantoms = anomaly["localisation"]["phantoms"]
for name, m in {**phantoms["maps"], **{f"baseline: {k}": v for k, v in phantoms["baseline"].items()}}.items():
    print(f"{name:28s} pixel AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}  best Dice {m['best_dice']:.3f}")

maps = np.load("runs/anomaly/anomaly/maps.npz")
print({k: maps[k].shape for k in maps.files})

# %% [markdown]
# ## The threshold, and whether the normals match
#
# The conformal threshold promises at most 5 % flagged normals only for normals like the validation ones.
# `anomaly score` checks that with a classifier two-sample test (AUROC 0.5: alike).

# %%
threshold = anomaly["threshold"]
print(f"threshold on {threshold['n_calibration']} validation normals: "
      f"{threshold['fpr']:.1%} of test normals and {threshold['tpr']:.1%} of lesions flagged")
shift = anomaly.get("normal_shift", {})
for key in ("val", "scored"):
    if key in shift:
        print(f"{key} normals vs training normals: AUROC {shift[key]['auroc']:.3f}, differ: {shift[key]['differ']}")

# %% [markdown]
# The phantoms' test normals come from the same generator as the training ones, so they match. On real data
# they often do not (a different scanner, framing or site): then the test AUROC mixes anomalies with that
# shift, and the threshold flags more normals than promised. `anomaly score --calibration NORMALS` sets the
# threshold on normals from the scored site, and `anomaly adapt` trains further on them. What this looks
# like on PneumoniaMNIST, and the honest limits: [Anomaly detection](../guide/anomaly.md).
