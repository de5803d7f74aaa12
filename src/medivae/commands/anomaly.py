"""medivae anomaly fit / anomaly score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medivae.commands.common import BOOTSTRAP, DEVICE, FORCE, PROGRESS, number, path_arg, whole
from medivae.commands.train import add_model_args, add_train_args
from medivae.runtime.constants import MAX_ROW_IMAGES, MAX_THREADS
from medivae.runtime.seeding import DEFAULT_SEED

# What `anomaly fit` uses when the flag is not given. On PneumoniaMNIST (28 px) a Gaussian
# likelihood trained 25 epochs at 32 px separated validation normals from foreign-patch anomalies made from
# them better than the training defaults (Bernoulli, 10 epochs, 64 px), and so did the labelled validation
# pneumonia images (AUROC of `ssim` 0.962 against 0.942 at 64 px and 0.946 with Bernoulli / 10 epochs);
# no test image was used. README, "Anomaly detection".
FIT_DEFAULTS = {"likelihood": "gaussian", "epochs": 25, "batch_size": 64}
LARGEST_AUTO_SIZE = 64  # the article's size: a larger model size is the user's call (CPU time)


def auto_image_size(native: int | None) -> int:
    """The model size for images whose longer side is ``native`` pixels: the smallest supported size that
    holds it without downsampling, at most LARGEST_AUTO_SIZE (unknown: LARGEST_AUTO_SIZE). Upsampling
    invents pixels a residual score then has to explain: 28-px MedMNIST goes to 32, not 64."""
    from medivae.runtime.constants import IMAGE_SIZES

    if native is None:
        return LARGEST_AUTO_SIZE
    return min([s for s in IMAGE_SIZES if s >= native] + [LARGEST_AUTO_SIZE])


def apply_fit_defaults(args) -> None:
    """Fill the flags the user left out with FIT_DEFAULTS and the automatic image size, in place; the
    likelihood only for a family that has one (vq_vae has none)."""
    from medivae.data.inspect import native_side
    from medivae.models import get_family

    if args.image_size is None:
        args.image_size = auto_image_size(native_side(args.data))
    if args.epochs is None:
        args.epochs = FIT_DEFAULTS["epochs"]
    if args.batch_size is None:
        args.batch_size = FIT_DEFAULTS["batch_size"]
    fields = {f.name for f in dataclasses.fields(get_family(args.model).config)}
    has_likelihood_arg = any(a.partition("=")[0].strip() == "likelihood" for a in args.model_arg)
    if args.likelihood is None and "likelihood" in fields and not has_likelihood_arg:
        args.likelihood = FIT_DEFAULTS["likelihood"]


def cmd_fit(args) -> int:
    from medivae import api
    from medivae.commands.train import run_config

    args.labels = args.normal_label  # train, validate and test on normals only
    apply_fit_defaults(args)
    run = api.anomaly_fit(run_config(args), args.out, progress=not args.no_progress)
    print(
        f"anomaly model (normal = {args.normal_label!r}) written to {run}; score it with "
        f"'medivae anomaly score {run}'"
    )
    return 0


def cmd_adapt(args) -> int:
    from medivae import api
    from medivae.evaluation.anomaly.calibration import min_calibration
    from medivae.workflows.site import read_adaptation

    out = api.anomaly_adapt(args.run, args.normals, args.out, epochs=args.epochs, hold_out=args.hold_out,
                            device=args.device, threads=args.threads, progress=not args.no_progress)
    r = read_adaptation(out)
    n_held, need = len(r["held_out"]), min_calibration(0.05)
    print(f"adapted run written to {out} ({len(r['adapt'])} site normals trained on, {n_held} held out); score "
          f"it with 'medivae anomaly score {out} --data IMAGES'")
    if n_held == 0:
        print("  no site normal was held out: its threshold is set on the run's validation normals unless "
              "'anomaly score --calibration NORMALS' is given")
    elif n_held < need:
        print(f"  {n_held} held-out normals cannot set a threshold at the default --fpr 0.05 (need {need}): "
              "score with a larger --fpr, or with --calibration NORMALS")
    return 0


def cmd_score(args) -> int:
    from medivae import api
    from medivae.evaluation.bootstrap import fmt_ci

    r = api.anomaly_score(
        args.run,
        data=args.data,
        split=args.split,
        out=args.out,
        normal_label=args.normal_label,
        fpr=args.fpr,
        k=args.iwae_samples,
        gradient=args.gradient_maps,
        n_maps=args.n_maps,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        bootstrap=args.bootstrap,
        calibration=args.calibration,
        progress=not args.no_progress,
        force=args.force,
    )
    print(f"scored {r['n_scored']} images of {r['data']} ({r['split']}); files in "
          f"{Path(r['files']['scores']).parent}{beaten_note(r)}")
    if "prevalence" in r:
        print(f"  {r['n_anomalous']} anomalous of {r['n_normal'] + r['n_anomalous']} labelled images "
              f"(prevalence {r['prevalence']:.3f}: the AUPRC of a random score); 95% bootstrap intervals")
    for name, m in r.get("metrics", {}).items():
        ci = (r.get("ci95") or {}).get(name) or {}
        print(f"  {name:17s} AUROC {m['auroc']:.3f}{fmt_ci(ci.get('auroc'))}  "
              f"AUPRC {m['auprc']:.3f}{fmt_ci(ci.get('auprc'))}")
    for name, m in r.get("baselines", {}).items():
        print(f"  baseline {name} (no model): AUROC {m['auroc']:.3f}")
    for name, m in r.get("trivial_baselines", {}).items():
        ci = m.get("ci95") or {}
        print(f"  baseline {name} ({m['direction']} = anomalous, no model): AUROC {m['auroc']:.3f}"
              f"{fmt_ci(ci.get('auroc'))}  AUPRC {m['auprc']:.3f}{fmt_ci(ci.get('auprc'))}")
    if r.get("trivial_baselines"):
        fixed = next(iter(r["trivial_baselines"].values())).get("direction_fixed_on", "validation data")
        print(f"  (each baseline's direction was fixed on {fixed}, not on these labels)")
    if "protocol" in r:
        p = r["protocol"]
        kinds = len(p.get("val_auroc_by_kind", {})) or 1
        print(f"  default score, chosen on validation normals vs {kinds} kinds of synthetic anomaly only: "
              f"{p['default']} (validation AUROC {p['val_auroc'][p['default']]:.3f}, mean over kinds)")
    t = r["threshold"]
    on = t.get("calibrated_on", "validation normals")
    on = on if isinstance(on, str) else f"normals of {on['source']}"
    line = (f"  conformal threshold {t['value']:.3f} on {t['score']} (rank {t['rank']} of {t['n_calibration']} "
            f"{on}: a new normal like them is flagged with probability <= {t['target_fpr']:g})")
    if "tpr" in t:
        line += f": {r['split']} FPR {t['fpr']:.3f}, TPR {t['tpr']:.3f}"
    print(line)
    if shift := shift_line(r.get("normal_shift") or {}):
        print(shift)
    return 0


def beaten_note(r: dict) -> str:
    """"; the default score X (AUROC a) is beaten by a trivial baseline: ..." when one is, else ""."""
    beaten = r.get("default_beaten_by")
    if not beaten:
        return ""
    d = r["protocol"]["default"]
    names = ", ".join(f"{n} (AUROC {a:.3f})" for n, a in sorted(beaten.items(), key=lambda x: -x[1]))
    return (f"; the default score {d} (AUROC {r['metrics'][d]['auroc']:.3f}) is beaten on this split by a trivial "
            f"baseline with no model: {names}")


def shift_line(ns: dict) -> str:
    """One line: how well a classifier tells the validation, calibration and scored normals from the training
    normals, and the scored normals from the calibration normals; what follows when they differ."""
    from medivae.evaluation.bootstrap import fmt_ci

    names = {"val": "validation normals", "calibration": "calibration normals",
             "scored": f"{ns.get('scored_split', 'scored')} normals"}
    parts = [f"{names[k]} {ns[k]['auroc']:.3f}{fmt_ci(ns[k].get('ci95'))}" for k in names if k in ns]
    if not parts:
        return ""
    line = "  normals vs the training normals (classifier two-sample test, AUROC 0.5 = alike): " + "; ".join(parts)
    if ns.get("scored", {}).get("differ"):
        line += (f". The {names['scored']} differ from the training normals (p < 0.01): the model calls that "
                 "difference anomalous too, so the AUROCs above also measure it")
        if "calibration" not in ns:
            line += (", and the threshold from the validation normals need not keep its false-positive bound "
                     "there (--calibration NORMALS sets it on normals from where the scored images come)")
        line += ("; with normals from that site, 'medivae anomaly adapt RUN --normals NORMALS --out NEW' trains "
                 "the model on some of them and sets the threshold on the rest")
    if cal := ns.get("scored_vs_calibration"):
        verdict = ("differ (p < 0.01): the threshold's bound need not hold for them" if cal["differ"]
                   else "no evidence that they differ")
        line += (f". {names['scored'].capitalize()} vs the calibration normals: {cal['auroc']:.3f}"
                 f"{fmt_ci(cal.get('ci95'))}, {verdict}")
    return line


def add(sub) -> None:
    a = sub.add_parser("anomaly", help="anomaly detection with a VAE fitted on normal images only")
    s = a.add_subparsers(dest="anomaly_command", metavar="{fit,adapt,score}", parser_class=type(a))
    a.set_defaults(func=lambda args: a.print_help() or 2)

    f = s.add_parser("fit", help="train on the normal images of a source", parents=[DEVICE, PROGRESS])
    g = f.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="SOURCE", help="phantoms | FILE.npz | FOLDER | FILE.csv")
    g.add_argument("--normal-label", required=True, help="the class name of normal images, e.g. 0 or normal")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g.add_argument("--resize-mode", default="pad", help="non-square images: pad (default) or crop")
    g.add_argument("--window", default=None, help="DICOM window: CENTER,WIDTH or a preset")
    g.add_argument("--split-seed", type=whole(0, 2**64 - 1), default=DEFAULT_SEED,
                   help="seed of the data's split (sources without their own), apart from --seed")
    f.add_argument("--out", required=True, type=path_arg, help="run folder to write (absent or empty)")
    add_model_args(f)
    add_train_args(f)
    helps = {"image_size": "32, 64, 128 or 256 (default: the smallest that holds the source's images without "
                           "downsampling, at most 64, read from the headers of MedMNIST sources and folders of "
                           "images or DICOM files; else 64)",
             "likelihood": "default gaussian (families with a likelihood)", "epochs": "default 25",
             "batch_size": "default 64"}
    for action in f._actions:
        if action.dest in helps:
            action.help, action.default = helps[action.dest], None
    f.set_defaults(func=cmd_fit)

    d = s.add_parser("adapt", help="train a fitted run further with normal images from the site being scored",
                     parents=[DEVICE, PROGRESS])
    d.add_argument("run", type=path_arg, help="a run of 'medivae anomaly fit'")
    d.add_argument("--normals", required=True, metavar="SOURCE",
                   help="normal images from the site whose images will be scored: a folder of normals, or a "
                   "source whose images with the normal label are used (every split)")
    d.add_argument("--out", required=True, type=path_arg, help="new run folder to write (the run itself is kept)")
    d.add_argument("--epochs", type=whole(1), default=None,
                   help="more epochs on training + site normals (default 10; a family that trains a prior in its "
                   "last epochs, such as vq_vae, does so in these too)")
    d.add_argument("--hold-out", type=number(0, 1), default=None,
                   help="share of the site normals kept out of training to set the threshold on (default 0.5; "
                   "'anomaly score' uses them unless --calibration is given; 0: the run's validation normals)")
    d.add_argument("--threads", type=whole(0, MAX_THREADS), default=None,
                   help="CPU threads (default: the run's setting)")
    d.set_defaults(func=cmd_adapt)

    c = s.add_parser("score", help="score images; write scores.csv, anomaly maps, ROC and results.json",
                     parents=[DEVICE, PROGRESS, BOOTSTRAP, FORCE])
    c.add_argument("run", type=path_arg)
    c.add_argument("--data", default=None, metavar="SOURCE", help="default: the run's own source")
    c.add_argument("--split", default="test", help="train, val or test (default test)")
    c.add_argument("--out", type=path_arg, default=None,
                   help="output folder (default RUN/anomaly); another one must be absent or empty")
    c.add_argument("--normal-label", default=None, help="default: the label the run was fitted on")
    c.add_argument("--fpr", type=number(0, 1, low_open=True), default=0.05,
                   help="false-positive rate the conformal threshold guarantees (needs >= 1/FPR - 1 validation "
                   "normals)")
    c.add_argument("--calibration", default=None, metavar="SOURCE",
                   help="normal images from where the scored images come (a folder, or a source whose images "
                   "with the normal label are used; every split) to set the threshold on, instead of the run's "
                   "validation normals: the false-positive bound then holds for normals like them")
    c.add_argument("--iwae-samples", type=whole(1, 10_000), default=16, help="posterior draws per image (default 16)")
    c.add_argument(
        "--gradient-maps", action="store_true", help="maps from |d(-ELBO)/dx| instead of residuals"
    )
    c.add_argument("--n-maps", type=whole(0, MAX_ROW_IMAGES), default=16,
                   help="images drawn in overlays.png (default 16); maps.png shows at most 8 of them, with every map")
    c.add_argument("--batch-size", type=whole(1), default=128)
    c.add_argument(
        "--precision", choices=("fp32", "auto"), default="fp32",
        help="fp32 (default: exact scores) or auto: bf16 networks where native, ~1.8x faster on AVX-512 BF16 "
        "(VQ healing included; the MAP restoration stays fp32: its gradient steps are not safe in bf16)",
    )
    c.set_defaults(func=cmd_score)
