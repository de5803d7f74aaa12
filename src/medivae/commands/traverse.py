"""medivae traverse: one row per latent dimension (highest KL first), sweeping it around an image's code."""

from __future__ import annotations

from medivae.commands.common import DEVICE, FORCE, number, path_arg, whole
from medivae.runtime.constants import MAX_ROW_IMAGES


def cmd_traverse(args) -> int:
    from medivae import api

    out, stats, dims = api.traverse(
        args.run, args.out, image=args.image, n_dims=args.dims, k=args.range, steps=args.steps,
        label=args.label, device=args.device, force=args.force,
    )
    rows = ", ".join(f"z{j} {stats.kl[j]:.2f}" for j in dims.tolist())
    print(f"rows (latent dim, mean KL in nats): {rows}")
    print(out)
    return 0


def add(sub) -> None:
    t = sub.add_parser("traverse", help="latent traversal grid: rows = dimensions sorted by KL",
                       parents=[DEVICE, FORCE])
    t.add_argument("run", type=path_arg)
    t.add_argument("--out", type=path_arg, required=True, help="PNG or JPEG to write")
    t.add_argument("--image", type=path_arg, default=None, help="reference image (default: first test image)")
    t.add_argument("--dims", type=whole(1), default=None, help="show the N highest-KL dimensions (default all)")
    t.add_argument("--range", type=number(0, 100, low_open=True), default=3.0,
                   help="sweep ±k aggregate-posterior std (default 3)")
    t.add_argument("--steps", type=whole(2, MAX_ROW_IMAGES), default=9, help="images per row (default 9)")
    t.add_argument("--label", default=None, help="class name (conditional models)")
    t.set_defaults(func=cmd_traverse)
