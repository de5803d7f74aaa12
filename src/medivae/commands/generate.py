"""medivae sample / encode / interpolate / reconstruct."""

from __future__ import annotations

from medivae.commands.common import DEVICE, FORCE, PROGRESS, choice, number, path_arg, whole
from medivae.runtime.constants import CHECKPOINTS, MAX_GRID_IMAGES, MAX_ROW_IMAGES, MAX_SAMPLES

SPLITS = ("train", "val", "test")
SAMPLER_HELP = "prior (default), or gmm / flow / diffusion fitted with medivae fit-sampler"


def add_sampler_options(p, help: str = SAMPLER_HELP) -> None:
    """--sampler and the diffusion sampler's --guidance / --sampling-steps (sample, evaluate, synthesize,
    interpolate)."""
    p.add_argument("--sampler", default="prior", help=help)
    p.add_argument("--guidance", type=number(), default=0.0, metavar="W",
                   help="diffusion sampler, class-conditional run: classifier-free guidance w, "
                        "eps = eps_uncond + (1 + w)(eps_cond - eps_uncond) (default 0: the conditional model)")
    p.add_argument("--sampling-steps", type=whole(1, 10_000), default=None, metavar="N",
                   help="diffusion sampler: deterministic DDIM steps (default 50)")


def cmd_sample(args) -> int:
    from medivae import api

    print(api.sample(args.run, args.n, args.out, seed=args.seed, label=args.label, device=args.device,
                     temperature=args.temperature, sampler=args.sampler, guidance=args.guidance,
                     sampling_steps=args.sampling_steps, progress=not args.no_progress, force=args.force,
                     top_k=args.top_k))
    return 0


def cmd_fit_sampler(args) -> int:
    from medivae import api
    from medivae.models.samplers import DiffusionFit

    if args.sampler != "diffusion" and (args.epochs or args.patience or args.width or args.time_budget):
        from medivae.runtime.errors import UserError

        raise UserError("--epochs, --patience, --width and --time-budget are options of --sampler diffusion")
    opts = DiffusionFit(**{k: v for k, v in (("max_epochs", args.epochs), ("patience", args.patience),
                                             ("width", args.width), ("time_budget", args.time_budget)) if v})
    r = api.fit_sampler(args.run, args.sampler, max_components=args.max_components, checkpoint=args.checkpoint,
                        device=args.device, diffusion=opts, progress=not args.no_progress,
                        posterior_draws=args.posterior_draws)
    if args.sampler == "diffusion":
        fitted = (f"latent {tuple(r['latent_shape'])}, width {r['width']}, best epoch {r['best_epoch']} of "
                  f"{r['epochs']}, validation eps-MSE {r['val_eps_mse']}")
    else:
        per = r.get("components") or r.get("val_nll_nats")
        fitted = f"{'components' if 'components' in r else 'validation NLL, nats'} per class: {per}"
    print(f"{args.sampler} sampler fitted on {r['n_train']} training latents ({r['latents']}) in {r['seconds']} s "
          f"({fitted}); written to {r['json']}; draw with: "
          f"medivae sample {args.run} --sampler {args.sampler} --out FILE")
    return 0


def cmd_encode(args) -> int:
    from medivae import api

    shapes = api.encode(args.run, args.out, data=args.data, split=args.split, device=args.device, force=args.force)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()) + " + labels, label_names")
    return 0


def cmd_interpolate(args) -> int:
    from medivae import api

    out = api.interpolate_run(
        args.run, args.out, steps=args.steps, mode=args.mode, src=args.src, dst=args.dst,
        seed=args.seed, device=args.device, label=args.label, force=args.force, sampler=args.sampler,
        guidance=args.guidance, sampling_steps=args.sampling_steps,
    )
    print(out)
    return 0


def cmd_reconstruct(args) -> int:
    from medivae import api

    print(api.reconstruct_run(args.run, args.data, args.out, split=args.split, n=args.n, device=args.device,
                              force=args.force))
    return 0


def add(sub) -> None:
    seed = whole(0, 2**64 - 1)
    s = sub.add_parser("sample", help="decode draws from the prior into a PNG/JPEG grid, or a folder of PNGs",
                       parents=[DEVICE, PROGRESS, FORCE])
    s.add_argument("run", type=path_arg)
    s.add_argument("-n", type=whole(1, MAX_SAMPLES), default=64,
                   help=f"images (default 64); a grid holds at most {MAX_GRID_IMAGES}, a folder {MAX_SAMPLES}")
    s.add_argument("--out", type=path_arg, required=True,
                   help="FILE.png or FILE.jpg: one grid; a name without a suffix: a folder of one PNG per image")
    s.add_argument("--label", default=None, help="class name (conditional models)")
    s.add_argument("--seed", type=seed, default=None)
    s.add_argument("--temperature", type=number(0, 100, low_open=True), default=1.0,
                   help="prior temperature (default 1)")
    s.add_argument("--top-k", type=whole(0, 65_536), default=0, metavar="K",
                   help="code prior (vq_vae): draw each code from the K most likely at its position "
                        "(default 0: all; 1: greedy)")
    add_sampler_options(s)
    s.set_defaults(func=cmd_sample)

    f = sub.add_parser("fit-sampler", help="fit a latent sampler (GMM, RealNVP or diffusion) on the training latents",
                       parents=[DEVICE, PROGRESS])
    f.add_argument("run", type=path_arg)
    f.add_argument("--sampler", required=True,
                   help="gmm (components by validation BIC), flow (RealNVP) or diffusion (DDPM/DDIM; also for "
                        "vq_vae and hierarchical_vae)")
    f.add_argument("--max-components", type=whole(1, 1000), default=10,
                   help="gmm: most components tried (default 10)")
    f.add_argument("--epochs", type=whole(1, 100_000), default=None, help="diffusion: most epochs (default 400)")
    f.add_argument("--patience", type=whole(1, 100_000), default=None,
                   help="diffusion: stop this many epochs after the best validation loss (default 40)")
    f.add_argument("--width", type=whole(1, 65_536), default=None,
                   help="diffusion: denoiser width (default: 4 x latent dim in [128, 1024]; U-Net 64 channels)")
    f.add_argument("--time-budget", type=number(0), default=None, metavar="SECONDS",
                   help="diffusion: stop training after this many seconds (default: none)")
    f.add_argument("--posterior-draws", type=whole(0, 1000), default=0, metavar="K",
                   help="fit to K draws of q(z|x) per training image instead of the posterior means "
                        "(Gaussian-latent families; default 0: means)")
    f.add_argument("--checkpoint", default="best", type=choice(*CHECKPOINTS), help="best (default) or last")
    f.set_defaults(func=cmd_fit_sampler)

    e = sub.add_parser("encode", help="the family's representation of every image of a split -> .npz",
                       parents=[DEVICE, FORCE])
    e.add_argument("run", type=path_arg)
    e.add_argument("--data", default=None, help="data source (default: the run's own, with its split)")
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--out", type=path_arg, required=True, help=".npz to write")
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("interpolate", help="decode a latent path between two draws (prior or fitted sampler) "
                                           "or two images", parents=[DEVICE, FORCE])
    i.add_argument("run", type=path_arg)
    i.add_argument("--from", dest="src", type=path_arg, default=None, help="first image file")
    i.add_argument("--to", dest="dst", type=path_arg, default=None, help="second image file")
    i.add_argument("--steps", type=whole(2, MAX_ROW_IMAGES), default=8)
    i.add_argument("--mode", default="linear", choices=("linear", "slerp"), help="linear or slerp")
    i.add_argument("--label", default=None, help="class name (conditional models)")
    i.add_argument("--out", type=path_arg, required=True, help="PNG or JPEG to write")
    i.add_argument("--seed", type=seed, default=None, help="seed of the two draws (default: the run's)")
    add_sampler_options(i, help="the end points' source, without --from/--to: " + SAMPLER_HELP + "; a diffusion "
                                "sampler's output latents are interpolated like any other")
    i.set_defaults(func=cmd_interpolate)

    r = sub.add_parser("reconstruct", help="images and their reconstructions (posterior mean) in a grid",
                       parents=[DEVICE, FORCE])
    r.add_argument("run", type=path_arg)
    r.add_argument("--data", default=None, help="data source (default: the run's own)")
    r.add_argument("--split", default="test", choices=SPLITS)
    r.add_argument("-n", type=whole(1, MAX_ROW_IMAGES), default=16, help=f"images, at most {MAX_ROW_IMAGES}")
    r.add_argument("--out", type=path_arg, required=True, help="PNG or JPEG to write")
    r.set_defaults(func=cmd_reconstruct)
