"""Posterior-collapse ablation: β (Higgins et al. 2017) × KL warm-up × free bits (Kingma et al. 2016).

Trains ``conv_vae`` once per setting and measures on the test split: active units (Burda et al. 2015:
Var_x E[z_j|x] > 0.01), KL(q(z|x) || p(z)) in nats and the negative ELBO (β = 1, no free bits: the
honest bound, averaged over ``--elbo-samples`` draws of z per image). Writes JSON and prints the
README table. Finished runs are reused, so an interrupted sweep continues where it stopped.

    python benchmarks/kl_ablation.py --data ../shared/data/pneumoniamnist.npz --out /tmp/runs/kl_ablation
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from medivae import api
from medivae.data import load_dataset, to_float
from medivae.evaluation.collapse import collapse_metrics
from medivae.models import model_config
from medivae.models.losses import neg_elbo
from medivae.runfolder.config import DataConfig, RunConfig, TrainConfig
from medivae.runtime.io import atomic_write_text
from medivae.runtime.seeding import torch_generator
from medivae.train.metrics import read_metrics

BETAS = (0.5, 1.0, 4.0)
WARMUPS = (0.0, 5.0)  # epochs of linear warm-up; 0 = none
FREE_BITS = (0.0, 0.5)  # nats per latent dimension
# Active units count any mean variance > 0.01, which a dimension carrying ~0.01 nats passes; so the
# table also counts the dimensions whose mean KL exceeds this many nats
INFORMATIVE_KL = 0.1


def setting_name(beta: float, warmup: float, free_bits: float) -> str:
    return f"beta{beta:g}_warmup{warmup:g}_fb{free_bits:g}"


def run_config(args, beta: float, warmup: float, free_bits: float) -> RunConfig:
    return RunConfig(
        data=DataConfig(source=str(args.data), image_size=args.image_size),
        model=model_config("conv_vae", image_size=args.image_size, latent_dim=args.latent_dim,
                           base_width=args.base_width, beta=beta, kl_schedule="linear" if warmup > 0 else "constant",
                           warmup_epochs=warmup, free_bits=free_bits),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, num_threads=args.threads),
    )


def train_once(cfg: RunConfig, run_dir: Path) -> None:
    """Train unless ``run_dir`` already holds this finished run."""
    if (run_dir / "config.json").exists():
        saved = RunConfig.load(run_dir / "config.json")
        done = len(read_metrics(run_dir)) >= cfg.train.epochs and (run_dir / "best").exists()
        if saved.model == cfg.model and saved.train == cfg.train and done:
            return
        raise SystemExit(f"{run_dir} holds a different or unfinished run; remove it or choose another --out")
    api.train(cfg, run_dir, progress=False)


@torch.no_grad()
def measure(run_dir: Path, elbo_samples: int, batch: int = 256) -> dict:
    """Test-split collapse diagnostics and negative ELBO of the run's best checkpoint."""
    run = api.load_run(run_dir, device="cpu")
    model, cfg, dev = run.model, run.config, run.device
    test = load_dataset(cfg.data, progress=False)["test"]
    gen = torch_generator(cfg.train.seed, "kl-ablation-elbo")
    means, logvars, nelbo = [], [], []
    for i in range(0, len(test), batch):
        x = to_float(test.images[i : i + batch], dev)
        q = model.encode(x)
        means.append(q.mean.cpu().numpy())
        logvars.append(q.logvar.cpu().numpy())
        draws = [neg_elbo(model.likelihood, model(x, sample=True, generator=gen), x).neg_elbo
                 for _ in range(elbo_samples)]
        nelbo.append(torch.stack(draws).mean(0).cpu().numpy())
    mi_gen = torch_generator(cfg.train.seed, "mi")
    c = collapse_metrics(np.concatenate(means), np.concatenate(logvars), mi_gen)
    nelbo = np.concatenate(nelbo)
    metrics = read_metrics(run_dir)
    best_epoch = min(metrics, key=lambda r: r["val_loss"])["epoch"]
    return {
        "active_units": c["active_units"], "latent_dim": c["latent_dim"], "kl_nats": c["kl_total_nats"],
        "kl_per_dim": c["kl_per_dim"], "mutual_information_nats": c["mutual_information_nats"],
        "informative_dims": int(sum(k > INFORMATIVE_KL for k in c["kl_per_dim"])),
        "mi_upper_bound_nats": c["mi_upper_bound_nats"],
        "test_neg_elbo_nats": float(nelbo.mean()), "test_images": len(test), "best_epoch": best_epoch,
        "train_seconds": round(sum(r["seconds"] for r in metrics), 1),
    }


def table(rows: list[dict]) -> str:
    lines = [f"| β | warm-up | free bits | active units | dims with KL > {INFORMATIVE_KL:g} | KL (nats) | "
             "I(x; z) (nats) | test −ELBO (nats) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = f"linear, {r['warmup_epochs']:g} ep" if r["warmup_epochs"] else "none"
        fb = f"{r['free_bits']:g}" if r["free_bits"] else "none"
        lines.append(f"| {r['beta']:g} | {warm} | {fb} | {r['active_units']}/{r['latent_dim']} | "
                     f"{r['informative_dims']} | {r['kl_nats']:.1f} | {r['mutual_information_nats']:.2f} | "
                     f"{r['test_neg_elbo_nats']:.1f} |")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a MedMNIST-layout .npz (e.g. pneumoniamnist)")
    p.add_argument("--out", type=Path, default=Path("/tmp/runs/kl_ablation"), help="folder for the runs")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kl_ablation.json")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (the machine is shared)")
    p.add_argument("--elbo-samples", type=int, default=4)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    rows = []
    for beta in BETAS:
        for warmup in WARMUPS:
            for fb in FREE_BITS:
                name = setting_name(beta, warmup, fb)
                train_once(run_config(args, beta, warmup, fb), args.out / name)
                row = {"setting": name, "beta": beta, "warmup_epochs": warmup, "free_bits": fb,
                       **measure(args.out / name, args.elbo_samples)}
                rows.append(row)
                print(f"{name}: AU {row['active_units']}/{row['latent_dim']}, KL {row['kl_nats']:.2f}, "
                      f"test -ELBO {row['test_neg_elbo_nats']:.2f}", flush=True)
    result = {
        "command": "python benchmarks/kl_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": str(args.data), "image_size": args.image_size, "epochs": args.epochs,
        "torch": torch.__version__, "machine": platform.machine(), "runs": rows,
    }
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
