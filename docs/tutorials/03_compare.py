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
# # Comparing families and seeds
#
# Which family is better on your data, and is the difference real? `medivae compare` puts evaluated runs
# side by side with 95 % intervals and paired tests. This tutorial compares three families on one split,
# then three seeds of one family, and shows why a difference between two single runs must be read against
# the spread between seeds. Runs are tiny (32 px, three epochs on phantoms), so the numbers only illustrate.

# %%
import json
import shlex
from pathlib import Path

import numpy as np
from IPython.display import Markdown

from medivae import api
from medivae.cli import main
from medivae.runtime.errors import UserError


def medivae(command: str) -> None:
    """Run ``medivae COMMAND`` as a shell would; a non-zero exit code raises."""
    if main(shlex.split(command)) != 0:
        raise RuntimeError(f"medivae {command} failed")


DATA = "--data phantoms:800 --image-size 32 --epochs 3 --batch-size 64 --no-progress"
EVAL = "-k 5 --max-images 100 --bootstrap 200 --reference-epochs 1 --no-progress"

# %% [markdown]
# ## Three families on one split
#
# Runs with the same seed and source share their train / validation / test split, so they are evaluated on
# the same test images and in one reference feature space (FD, precision, recall, density, coverage).
# `vq_vae` trains its autoencoder for two epochs and its code prior for the last one.

# %%
families = {"conv_vae": "", "beta_vae": "", "vq_vae": "--model-arg prior_epochs=1"}
for name, extra in families.items():
    medivae(f"train {DATA} --model {name} {extra} --out runs/{name}")
    medivae(f"evaluate runs/{name} {EVAL}")

# %%
medivae("compare runs/conv_vae runs/beta_vae runs/vq_vae --bootstrap 200 --out families.md")
Markdown(Path("families.md").read_text())

# %% [markdown]
# Each cell is the run's value with its 95 % bootstrap interval over the test images; Δ and p compare each
# run with the first one, image by image (a paired bootstrap), which is far more sensitive than comparing
# two intervals. `vq_vae` has no likelihood, so its −ELBO row is empty. `--out compare.html` writes the same
# table as a self-contained page.
#
# ## Three seeds of one family
#
# A different training seed changes the initialisation and the order of batches, not the data: the split of
# a source without its own splits (and the phantoms themselves) comes from the data's own seed,
# `--split-seed`, fixed by default. The runs share their test images and their reference feature space, so
# `compare` pairs them image by image.

# %%
for seed in (1, 2):
    medivae(f"train {DATA} --model conv_vae --seed {seed} --out runs/conv_vae_seed{seed}")
    medivae(f"evaluate runs/conv_vae_seed{seed} {EVAL}")

medivae("compare runs/conv_vae runs/conv_vae_seed1 runs/conv_vae_seed2 --bootstrap 200 --out seeds.md")
Markdown(Path("seeds.md").read_text())

# %% [markdown]
# Another `--split-seed` is another split: other test images, which `compare` refuses to pair (here through
# its Python form, `api.compare`, which raises the error the command prints; `--force` would show them anyway).

# %%
medivae(f"train {DATA} --model conv_vae --split-seed 7 --out runs/conv_vae_split7")
medivae(f"evaluate runs/conv_vae_split7 {EVAL}")
try:
    api.compare(["runs/conv_vae", "runs/conv_vae_split7"])
except UserError as e:
    print("refused:", e)

# %% [markdown]
# ## Seed spread against interval width
#
# The intervals say how a number moves with the test images of *one* trained model. How it moves with the
# training seed is another matter, and often larger:

# %%
def evaluation(run: str) -> dict:
    return json.loads(Path(run, "results.json").read_text())["evaluation"]


seeds = [evaluation(r) for r in ("runs/conv_vae", "runs/conv_vae_seed1", "runs/conv_vae_seed2")]
psnr = np.array([e["reconstruction"]["psnr_db"] for e in seeds])
half_widths = [(e["ci95"]["psnr_db"][1] - e["ci95"]["psnr_db"][0]) / 2 for e in seeds]
print(f"PSNR over seeds: {psnr.mean():.2f} ± {psnr.std(ddof=1):.2f} dB (mean ± sd of 3 seeds)")
print(f"half-width of one run's 95 % interval: {np.mean(half_widths):.2f} dB")

# %% [markdown]
# A difference between two families is a finding only when it is larger than the seed-to-seed spread:
# train a few seeds of each before ranking them. The [results pages](../results/families.md) do this for
# the families on real chest X-rays. Next: [anomaly detection with maps](04_anomaly.ipynb).
