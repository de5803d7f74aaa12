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
# # The article's VAE, end to end
#
# The seed article trains a convolutional VAE on 64×64 images and then samples from it and interpolates in
# its latent space. This tutorial does the same from Python on medivae's built-in chest-radiograph phantoms
# (nothing to download), then goes further: a latent traversal and an honest evaluation with intervals.
# It runs on a laptop CPU in a couple of minutes; the numbers it prints come from this short run and say
# little about a fully trained model.

# %%
import json

import matplotlib.pyplot as plt
import torch
from IPython.display import Image

import medivae
from medivae import api
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig


def show(images: torch.Tensor, nrow: int = 8, title: str = "") -> None:
    """A grid of float images (N, 1, H, W) in [0, 1]."""
    rows = (len(images) + nrow - 1) // nrow
    fig, axes = plt.subplots(rows, nrow, figsize=(nrow * 1.1, rows * 1.1))
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, images, strict=False):  # the grid may have empty cells
        ax.imshow(im[0], cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title)
    plt.show()


# %% [markdown]
# ## Train
#
# A `RunConfig` holds everything a run needs; it is saved as `runs/article/config.json`. The model is the
# default family, `conv_vae`: at 64 px and latent size 32 it is the article's network layer for layer. The
# seed is the article's, 1767661200070. A real run would use more images and epochs (`medivae demo` trains
# 6,000 phantoms for 15 epochs).

# %%
cfg = RunConfig(
    data=DataConfig(source="phantoms:1200", image_size=64),
    train=TrainConfig(epochs=4, batch_size=64),
)
run_dir = api.train(cfg, "runs/article", progress=False)
sorted(p.name for p in run_dir.iterdir())

# %% [markdown]
# Every epoch is one line of `metrics.jsonl`: the loss (the negative ELBO per image) and its two terms, for
# training and validation, on the same scale.

# %%
metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
epochs = [m["epoch"] for m in metrics]
fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
a.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
a.plot(epochs, [m["val_loss"] for m in metrics], "o-", label="validation")
a.set(xlabel="epoch", ylabel="−ELBO (nats/image)")
a.legend()
b.plot(epochs, [m["val_kl"] for m in metrics], "o-")
b.set(xlabel="epoch", ylabel="validation KL (nats)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Sample
#
# `medivae.load` opens the run's best checkpoint. Its methods take and return tensors.

# %%
run = medivae.load(run_dir)
show(run.sample(16), title="samples from the prior N(0, I)")
show(run.sample(16, temperature=0.7), title="temperature 0.7")

# %% [markdown]
# ## Reconstruct and interpolate
#
# The run keeps its own test split. Encoding gives the posterior mean and log-variance of every image;
# decoding a straight line between two posterior means is the article's interpolation.

# %%
test = run.split("test")
codes = run.encode(test.images[:8])
print({name: tuple(v.shape) for name, v in codes.items()})
show(torch.cat([run.images(test.images[:8]).cpu(), run.reconstruct(test.images[:8])]),
     title="test images (top) and reconstructions")

z0, z1 = codes["mean"][0], codes["mean"][1]
t = torch.linspace(0, 1, 8)[:, None]
show(run.decode((1 - t) * z0 + t * z1), title="linear path between two test images")

# %% [markdown]
# The same from the command line is `medivae interpolate`; its Python form takes the run folder and writes
# a PNG. `mode="slerp"` follows the sphere between two prior draws, where the prior puts its mass.

# %%
Image(filename=api.interpolate_run(run_dir, "slerp.png", steps=8, mode="slerp"))

# %% [markdown]
# ## Traverse
#
# A traversal sweeps one latent dimension at a time around a reference image (± 3 posterior standard
# deviations), rows sorted by how much KL each dimension carries: the top rows show what the model uses.

# %%
png, stats, dims = api.traverse(run_dir, "traverse.png", n_dims=6, device="cpu")
print("dimensions shown, by KL:", [int(d) for d in dims])
Image(filename=png)

# %% [markdown]
# ## Evaluate
#
# `api.evaluate` is `medivae evaluate`: likelihood bounds (with `k` importance samples), reconstruction,
# posterior collapse and sample quality, with 95 % bootstrap intervals. Sample quality is measured in the
# feature space of a small network trained on this data set's own training images (no download); a
# real-vs-real floor shows what "as good as real" reads. Small settings keep this quick.

# %%
res = api.evaluate(run_dir, k=10, max_images=150, bootstrap=100, reference_epochs=1, progress=False)
lik, rec, col, sq, ci = res["likelihood"], res["reconstruction"], res["collapse"], res["sample_quality"], res["ci95"]


def interval(name: str, digits: int = 1) -> str:
    lo, hi = ci[name]
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


print(f"-ELBO {lik['neg_elbo_nats']:.1f} nats/image {interval('neg_elbo_nats')}, "
      f"-IWAE (K=10) {lik['neg_iwae_nats']:.1f}")
print(f"PSNR {rec['psnr_db']:.2f} dB {interval('psnr_db', 2)}, SSIM {rec['ssim']:.3f} {interval('ssim', 3)}")
print(f"active units {col['active_units']}/{col['latent_dim']}, I(x; z) {col['mutual_information_nats']:.2f} nats")
print(f"{sq['fd_name']} {sq['model']['fd']:.3g} (real vs real: {sq['floor']['fd']:.3g}), "
      f"precision {sq['model']['precision']:.2f}, recall {sq['model']['recall']:.2f}")

# %% [markdown]
# The Bernoulli likelihood (the article's BCE) is not a probability of 8-bit images, so there are no
# bits/dim; train with `likelihood="discretized_logistic"` (`--likelihood discretized_logistic`) for a real
# negative log-likelihood. Everything `evaluate` computed is in `runs/article/results.json` and in the run's
# report, `runs/article/report.html`. Next: [your own DICOM or NIfTI folder](02_dicom_nifti.ipynb).
