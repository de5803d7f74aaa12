"""medivae synthesize: sample images, drop the ones too close to training images, report memorisation."""

from __future__ import annotations

from medivae.commands.common import BOOTSTRAP, DEVICE, PROGRESS, number, path_arg, whole
from medivae.commands.generate import add_sampler_options
from medivae.runtime.constants import MAX_ROW_IMAGES, MAX_SAMPLES


def cmd_synthesize(args) -> int:
    from medivae import api
    from medivae.evaluation.bootstrap import fmt_ci

    r = api.synthesize(
        args.run,
        args.n,
        args.out,
        label=args.label,
        percentile=args.percentile,
        fmt=args.format,
        seed=args.seed,
        n_pairs=args.pairs,
        reference_epochs=args.reference_epochs,
        device=args.device,
        progress=not args.no_progress,
        bootstrap=args.bootstrap,
        sampler=args.sampler,
        guidance=args.guidance,
        sampling_steps=args.sampling_steps,
        force=args.force,
    )
    print(
        f"{r['n_written']} of {r['n_synthetic']} images written to {args.out}; {r['n_rejected']} rejected as "
        f"too close to a training image (memorisation rate {r['memorisation_rate']:.3%}, "
        f"percentile {r['percentile']:g} of the distances of reconstructed held-out images)"
        f"{fmt_ci((r.get('ci95') or {}).get('memorisation_rate'))}"
    )
    mi = r["membership_inference"]
    for key, what in (("elbo", "the model's ELBO"), ("diffusion_loss", "the diffusion prior's loss"),
                      ("nearest_synthetic_pixel", "distance to the nearest sample")):
        if key in mi:
            print(f"  membership inference by {what}: AUROC {mi[key]['auroc']:.3f}{fmt_ci(mi[key]['ci95'])} "
                  f"({mi[key]['n_members']} training vs {mi[key]['n_held_out']} held-out images; 0.5: none)")
    return 0


def add(sub) -> None:
    p = sub.add_parser(
        "synthesize", help="write synthetic images + labels, with a memorisation (privacy) filter",
        parents=[DEVICE, PROGRESS, BOOTSTRAP],
    )
    p.add_argument("run", type=path_arg)
    p.add_argument("-n", type=whole(1, MAX_SAMPLES), required=True,
                   help=f"images to draw, at most {MAX_SAMPLES} (rejected ones are not written)")
    p.add_argument("--out", type=path_arg, required=True, help="output folder (absent or empty)")
    p.add_argument("--force", action="store_true", help="write over an earlier output of synthesize in --out")
    p.add_argument(
        "--label", default=None, help="class to draw (conditional run) or to write (one-class run)"
    )
    p.add_argument(
        "--percentile",
        type=number(0, 100),
        default=1.0,
        help="reject images nearer to a training image than this percentile of reconstructed held-out images",
    )
    p.add_argument("--format", default="png", choices=("png", "npz"), help="png (images/ + labels.csv, default) or npz")
    p.add_argument("--pairs", type=whole(0, MAX_ROW_IMAGES), default=8,
                   help="nearest (synthetic, training) pairs drawn per space")
    p.add_argument(
        "--reference-epochs", type=whole(1, 1000), default=5, help="epochs of the reference feature extractor"
    )
    p.add_argument("--seed", type=whole(0, 2**64 - 1), default=None)
    add_sampler_options(p)
    p.set_defaults(func=cmd_synthesize)
