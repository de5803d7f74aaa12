"""medivae evaluate."""

from __future__ import annotations

from pathlib import Path

from medivae.commands.common import BOOTSTRAP, DEVICE, PROGRESS, THREADS, choice, path_arg, whole
from medivae.commands.generate import add_sampler_options
from medivae.runtime.constants import CHECKPOINTS, MAX_SAMPLES


def cmd_evaluate(args) -> int:
    from medivae import api
    from medivae.evaluation.table import format_table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ev = api.evaluate(
        args.run, data=args.data, split=args.split, k=args.iwae_k, batch_size=args.batch_size,
        max_images=args.max_images, n_samples=args.n_samples, reference_epochs=args.reference_epochs,
        inception_weights=args.inception_weights, checkpoint=args.checkpoint, device=args.device,
        progress=not args.no_progress, sampler=args.sampler, bootstrap=args.bootstrap,
        foreground=args.foreground, guidance=args.guidance, sampling_steps=args.sampling_steps,
    )
    print(format_table(ev))
    print(f"\nwritten to {Path(args.run) / 'results.json'} (key \"evaluation\")")
    report = api.write_run_report(args.run)
    if report is not None:
        print(f"report: {report}")
    return 0


def add(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="likelihood bounds, reconstruction, posterior collapse, sample quality -> RUN/results.json",
        parents=[DEVICE, THREADS, PROGRESS, BOOTSTRAP],
    )
    p.add_argument("run", type=path_arg, help="run folder (from medivae train)")
    p.add_argument("--data", default=None, metavar="SOURCE", help="data source (default: the run's own)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    p.add_argument("-k", "--iwae-k", type=whole(1, 100_000), default=100,
                   help="importance samples per image (default 100)")
    p.add_argument("--batch-size", type=whole(1), default=64)
    p.add_argument("--max-images", type=whole(0), default=0, help="a seeded random subset of the split (0: all)")
    p.add_argument("--n-samples", type=whole(0, MAX_SAMPLES), default=0,
                   help="generated images for sample quality (0: as many as evaluated images)")
    p.add_argument("--reference-epochs", type=whole(1, 1000), default=5,
                   help="epochs of the reference feature extractor (default 5; one extractor per dataset, "
                   "cached in $MEDIVAE_CACHE/reference)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="local FID Inception state dict (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "or .safetensors) for a true FID; nothing is downloaded")
    p.add_argument("--checkpoint", default="best", type=choice(*CHECKPOINTS), help="best (default) or last")
    add_sampler_options(p)
    p.add_argument("--foreground", default=None, metavar="MASK",
                   help="also PSNR / SSIM over each real image's foreground: otsu (Otsu threshold, holes "
                        "filled, dilated; default: off)")
    p.set_defaults(func=cmd_evaluate)
