"""Do a trained run's BatchNorm running averages fit its final weights? The negative ELBO of the validation
images three ways, for runs that ``benchmarks/defaults.py`` (or anything else) trained:

- ``eval``: BatchNorm on the running averages, as ``medivae evaluate`` (IWAE, bits/dim) and sampling use them;
- ``batch``: BatchNorm on each batch's own statistics (training mode, the running averages left as they are),
  what the last training steps optimised;
- ``recalibrated``: the running averages recomputed as the exact mean over the training images with the final
  weights (``torch.optim.swa_utils.update_bn``, momentum None), then as ``eval``.

A VampPrior run's prior components are the encoder's posteriors at its pseudo-inputs, which pass the encoder on
the running averages in every mode (``ConvVAE.prior_components``): the recalibrated prior moves with them.

One record per ``--name`` in ``--out`` (added or replaced), with the commit of this code, the run's folder
(``benchmarks/defaults.py`` names it after the commit it trained at), CPU seconds and load. Nats per image,
single-sample ELBO with a fixed noise seed, so the three modes see the same draws:

    python benchmarks/bn_gap.py --run /tmp/medivae_defaults/pneumonia32_vamp_vae_0_COMMIT --name "vamp_vae seed 0"
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from common import children_cpu, git_commit, load_average, update_json  # noqa: E402  (benchmarks/ is on sys.path)


def batches(images: np.ndarray, size: int):
    """uint8 (N, C, H, W) -> float (B, C, H, W) in [0, 1], in order."""
    for i in range(0, len(images), size):
        yield torch.from_numpy(np.array(images[i:i + size])).float() / 255


def neg_elbo(model, images: np.ndarray, batch_stats: bool, seed: int, size: int) -> dict:
    """Mean reconstruction, KL and negative ELBO (nats per image) with BatchNorm in eval mode, or on each
    batch's statistics without touching the running averages (a deep copy is put in training mode)."""
    from medivae.models.losses import neg_elbo as terms_of

    net = copy.deepcopy(model)
    net.train(batch_stats)
    for m in net.modules():  # batch statistics, running averages frozen: momentum 0 keeps them as they are
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    gen = torch.Generator().manual_seed(seed)
    rec, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x in batches(images, size):
            t = terms_of(net.likelihood, net(x, None, sample=True, generator=gen), x)
            rec, kl, n = rec + float(t.rec.double().sum()), kl + float(t.kl.double().sum()), n + len(x)
    return {"rec": rec / n, "kl": kl / n, "neg_elbo": (rec + kl) / n}


def recalibrated(model, images: np.ndarray, size: int, seed: int = 0):
    """A copy whose BatchNorm running averages are the exact means over ``images`` (update_bn, momentum None).
    The forward passes draw z from the global generator, seeded here so that the averages are reproducible."""
    net = copy.deepcopy(model)
    loader = list(batches(images, size))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.optim.swa_utils.update_bn(loader, net)
    return net.eval()


def measure(run: Path, args) -> dict:
    from medivae.data import load_dataset
    from medivae.runfolder.run import load_run

    r = load_run(run, args.checkpoint, device="cpu")
    model = r.model.float().eval()
    splits = load_dataset(r.config.data, progress=False)
    val = np.asarray(splits["val"].images)[: args.max_images or None]
    train = np.asarray(splits["train"].images)[: args.max_train or None]
    modes = {"eval": neg_elbo(model, val, False, args.seed, args.batch_size),
             "batch": neg_elbo(model, val, True, args.seed, args.batch_size),
             "recalibrated": neg_elbo(recalibrated(model, train, args.batch_size, args.seed), val, False,
                                      args.seed, args.batch_size)}
    return {"run": str(run), "checkpoint": args.checkpoint, "family": r.config.model.name, "n_val": len(val),
            "n_train": len(train), "modes": modes,
            "eval_minus_batch": modes["eval"]["neg_elbo"] - modes["batch"]["neg_elbo"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--name", required=True, help="the record's key in --out")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    p.add_argument("--max-images", type=int, default=0, help="validation images (0: all)")
    p.add_argument("--max-train", type=int, default=0, help="training images for the recalibration (0: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="the noise of the single-sample ELBO")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bn_gap.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit, cpu0, own0 = git_commit(), children_cpu(), time.process_time()
    load0, start = load_average(), time.perf_counter()
    rec = measure(args.run, args)
    words = sys.argv[1:] if argv is None else argv
    rec.update(commit=commit, command="python benchmarks/bn_gap.py " + " ".join(words),
               cpu_seconds=round(children_cpu() - cpu0 + time.process_time() - own0, 1),
               wall_seconds=round(time.perf_counter() - start, 1), load_before=load0, load_after=load_average())

    def add(result: dict) -> dict:
        result["records"][args.name] = rec
        return result

    update_json(args.out, add, {"benchmark": "bn_gap", "records": {}})
    m = rec["modes"]
    print(f"{args.name}: -ELBO eval {m['eval']['neg_elbo']:.1f}  batch {m['batch']['neg_elbo']:.1f}  "
          f"recalibrated {m['recalibrated']['neg_elbo']:.1f} nats/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
