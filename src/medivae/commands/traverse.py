"""medivae traverse: one row per latent dimension (highest KL first), sweeping it around an image's code."""

from __future__ import annotations

from pathlib import Path


def cmd_traverse(args) -> int:
    from medivae import api

    out, stats, dims = api.traverse(
        args.run, args.out, image=args.image, n_dims=args.dims, k=args.range, steps=args.steps,
        label=args.label, device=args.device,
    )
    rows = ", ".join(f"z{j} {stats.kl[j]:.2f}" for j in dims.tolist())
    print(f"rows (latent dim, mean KL in nats): {rows}")
    print(out)
    return 0


def add(sub) -> None:
    t = sub.add_parser("traverse", help="latent traversal grid: rows = dimensions sorted by KL")
    t.add_argument("run", type=Path)
    t.add_argument("--out", type=Path, required=True, help="PNG to write")
    t.add_argument("--image", type=Path, default=None, help="reference image (default: first test image)")
    t.add_argument("--dims", type=int, default=None, help="show the N highest-KL dimensions (default all)")
    t.add_argument("--range", type=float, default=3.0, help="sweep ±k aggregate-posterior std (default 3)")
    t.add_argument("--steps", type=int, default=9, help="images per row (default 9)")
    t.add_argument("--label", default=None, help="class name (conditional models)")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_traverse)
