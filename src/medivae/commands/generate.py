"""medivae sample / encode / interpolate / reconstruct."""

from __future__ import annotations

from pathlib import Path


def cmd_sample(args) -> int:
    from medivae import api

    print(api.sample(args.run, args.n, args.out, seed=args.seed, label=args.label, device=args.device,
                     temperature=args.temperature, sampler=args.sampler))
    return 0


def cmd_fit_sampler(args) -> int:
    from medivae import api

    r = api.fit_sampler(args.run, args.sampler, max_components=args.max_components, checkpoint=args.checkpoint,
                        device=args.device)
    fitted = r.get("components") or r.get("val_nll_nats")
    print(f"{args.sampler} sampler fitted on {r['n_train']} training means in {r['seconds']} s "
          f"({'components' if 'components' in r else 'validation NLL, nats'} per class: {fitted}); "
          f"written to {r['json']}; draw with: medivae sample {args.run} --sampler {args.sampler} --out FILE")
    return 0


def cmd_encode(args) -> int:
    from medivae import api

    shapes = api.encode(args.run, args.out, data=args.data, split=args.split, device=args.device)
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()) + " + labels, label_names")
    return 0


def cmd_interpolate(args) -> int:
    from medivae import api

    if args.mode not in ("linear", "slerp"):
        from medivae.runtime.errors import UserError

        raise UserError(f"--mode must be linear or slerp, not {args.mode!r}")
    out = api.interpolate_run(
        args.run, args.out, steps=args.steps, mode=args.mode, src=args.src, dst=args.dst,
        seed=args.seed, device=args.device, label=args.label,
    )
    print(out)
    return 0


def cmd_reconstruct(args) -> int:
    from medivae import api

    print(api.reconstruct_run(args.run, args.data, args.out, split=args.split, n=args.n, device=args.device))
    return 0


def add(sub) -> None:
    s = sub.add_parser("sample", help="decode draws from the prior into a PNG grid")
    s.add_argument("run", type=Path)
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--label", default=None, help="class name (conditional models)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature (default 1)")
    s.add_argument("--sampler", default="prior",
                   help="prior (default), or gmm / flow fitted with medivae fit-sampler")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    f = sub.add_parser("fit-sampler", help="fit a latent sampler (GMM or RealNVP) on the training posterior means")
    f.add_argument("run", type=Path)
    f.add_argument("--sampler", required=True, help="gmm (components by validation BIC) or flow (RealNVP)")
    f.add_argument("--max-components", type=int, default=10, help="gmm: most components tried (default 10)")
    f.add_argument("--checkpoint", default="best", help="best (default) or last")
    f.add_argument("--device", default="auto")
    f.set_defaults(func=cmd_fit_sampler)

    e = sub.add_parser("encode", help="the family's representation of every image of a split -> .npz")
    e.add_argument("run", type=Path)
    e.add_argument("--data", default=None, help="data source (default: the run's own, with its split)")
    e.add_argument("--split", default="test")
    e.add_argument("--out", type=Path, required=True, help=".npz to write")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("interpolate", help="decode a latent path between two prior draws or two images")
    i.add_argument("run", type=Path)
    i.add_argument("--from", dest="src", default=None, help="first image file")
    i.add_argument("--to", dest="dst", default=None, help="second image file")
    i.add_argument("--steps", type=int, default=8)
    i.add_argument("--mode", default="linear", help="linear or slerp")
    i.add_argument("--label", default=None, help="class name (conditional models)")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--seed", type=int, default=None)
    i.add_argument("--device", default="auto")
    i.set_defaults(func=cmd_interpolate)

    r = sub.add_parser("reconstruct", help="images and their reconstructions (posterior mean) in a grid")
    r.add_argument("run", type=Path)
    r.add_argument("--data", default=None, help="data source (default: the run's own)")
    r.add_argument("--split", default="test")
    r.add_argument("-n", type=int, default=16)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_reconstruct)
