"""medivae demo / train."""

from __future__ import annotations

import argparse
from pathlib import Path

from medivae.commands.common import DEVICE, PROGRESS, number, path_arg
from medivae.runfolder.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    flat_settings,
    read_config_file,
    with_split_seed,
)
from medivae.runtime.constants import DEFAULT_FAMILY
from medivae.runtime.errors import UserError
from medivae.runtime.schema import build
from medivae.runtime.seeding import DEFAULT_SEED


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_FAMILY, help=f"model family (see the README; default {DEFAULT_FAMILY})")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the model family's config, e.g. --model-arg max_width=256 (repeatable)")
    g.add_argument("--image-size", type=int, default=64, help="32, 64, 128 or 256 (default 64)")
    g.add_argument("--channels", type=int, default=1, help="1 gray or 3 RGB (default 1)")
    taken = set(p._option_string_actions)
    for flag in model_flags().values():  # each family's shorthands (Family.cli_flags)
        option = "--" + flag.field.replace("_", "-")
        if option not in taken:  # a plugin's field named like a shared flag keeps --model-arg
            g.add_argument(option, type=_flag_type(flag.type), default=None, metavar=flag.field.upper(),
                           help=f"{flag.help} [{', '.join(flag.families)}]")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr-schedule", default="constant",
                   help="constant (default) or cosine: decay to 0 over --epochs (Loshchilov & Hutter 2017)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--precision", default="auto", help="auto (bf16 where native), fp32, bf16, fp16 (CUDA)")
    g.add_argument("--grad-clip", type=float, default=0.0)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: the cores idle at start)")
    g.add_argument("--tensorboard", action="store_true",
                   help="log scalars per epoch to RUN/tensorboard (pip install 'medivae[tensorboard]')")
    g.add_argument("--time-budget", type=number(0), default=0.0, metavar="SECONDS",
                   help="fit training into this many seconds (default 0: none): a one-stage run stops after the "
                        "epoch that spends them (not before one that may become best/); a two-stage one (vq_vae, "
                        "ldm) scales both stages' epochs after its first epoch, --epochs being the most")
    g.add_argument("--augment", default="", metavar="SPEC",
                   help="random changes of each training image, e.g. shift=2,contrast=0.1,brightness=0.05 "
                        "(pixels, fractions; default none)")


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="SOURCE",
                   help="phantoms[:N] | FILE.npz | medmnist:NAME[@SIZE] | FOLDER | FILE.csv | "
                        "ARCHIVE.tar.gz/.zip | FILE.dcm | FILE.nii.gz")
    g.add_argument("--labels", default="", help="comma-separated class names to keep (default: all)")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--test-fraction", type=float, default=0.1)
    g.add_argument("--resize-mode", default="pad", help="non-square images: pad (default) or crop")
    g.add_argument("--window", default=None,
                   help="DICOM/NIfTI window: CENTER,WIDTH (e.g. 40,80) or lung, mediastinum, bone, brain")
    g.add_argument("--normalize", default="percentile",
                   help="DICOM/NIfTI without a window: percentile (0.5-99.5), percentile:LO,HI, range:LO,HI")
    g.add_argument("--nifti-axis", default="axial", help="NIfTI slices: axial (default), coronal, sagittal")
    g.add_argument("--no-cache", action="store_true", help="decode in memory; do not use $MEDIVAE_CACHE")
    g.add_argument("--split-seed", type=int, default=DEFAULT_SEED,
                   help="seed of the data, not of training: the split of sources without their own split "
                        "(folders, CSV, archives, MedNIST) and the phantoms; runs with other --seed but the "
                        "same --split-seed share their test images (default: the article's seed)")


def data_values(args) -> dict:
    """The data settings the flags give, as a dict of DataConfig fields (checked when the config is built)."""
    return dict(
        source=args.data, image_size=args.image_size, channels=args.channels,
        labels=tuple(s.strip() for s in args.labels.split(",") if s.strip()),
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        resize_mode=args.resize_mode, window=args.window,
        normalize=getattr(args, "normalize", "percentile"), nifti_axis=getattr(args, "nifti_axis", "axial"),
        cache=not getattr(args, "no_cache", False), split_seed=getattr(args, "split_seed", DEFAULT_SEED),
    )


def train_values(args) -> dict:
    """The training settings the flags give, as a dict of TrainConfig fields (checked when the config is built)."""
    return dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, seed=args.seed,
        precision=args.precision, device=args.device, grad_clip=args.grad_clip,
        compile=args.compile, num_threads=args.threads, tensorboard=args.tensorboard,
        augment=getattr(args, "augment", ""), time_budget=getattr(args, "time_budget", 0.0),
    )


def data_config(args) -> DataConfig:
    return build(DataConfig, data_values(args), "data")


def train_config(args) -> TrainConfig:
    return build(TrainConfig, train_values(args), "train")


def model_flags() -> dict:
    """{config field: CliFlag} of every family's shorthand flags (models/family.py: Family.cli_flags)."""
    from medivae.models import family

    return family.cli_flags()


def _flag_type(kind: type):
    """argparse type of a config field: bool reads true/false (argparse's bool() would take any text)."""
    if kind is not bool:
        return kind

    def boolean(text: str) -> bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
        return text.lower() in ("true", "1")

    return boolean


def family_fields(args) -> dict:
    """The family shorthand flags given on the command line, {field: value}."""
    return {k: getattr(args, k) for k in model_flags() if getattr(args, k, None) is not None}


def model_args(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> {key: value}; values read as JSON (numbers, true/false), else strings."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--model-arg takes KEY=VALUE, not {pair!r}")
        if key.strip() in ("image_size", "channels"):  # they size the data too, so they have flags of their own
            flag = "--" + key.strip().replace("_", "-")
            raise UserError(f"--model-arg {pair}: give {flag} {value} instead (it sets the data's {key.strip()} too)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_config(args) -> RunConfig:
    """The run configuration the flags describe; a model option the family lacks is a one-line error."""
    from medivae.models import model_config

    fields = family_fields(args)
    fields.update(model_args(getattr(args, "model_arg", [])))
    model = model_config(args.model, image_size=args.image_size, channels=args.channels, **fields)
    return RunConfig(data=data_config(args), model=model, train=train_config(args))


# flag dest -> the config settings it sets; --resume compares only what the user typed
SETTINGS = {
    "data": ("data.source",), "labels": ("data.labels",), "val_fraction": ("data.val_fraction",),
    "test_fraction": ("data.test_fraction",), "resize_mode": ("data.resize_mode",), "window": ("data.window",),
    "normalize": ("data.normalize",), "nifti_axis": ("data.nifti_axis",), "no_cache": ("data.cache",),
    "split_seed": ("data.split_seed",),
    "image_size": ("data.image_size", "model.image_size"), "channels": ("data.channels", "model.channels"),
    "model": ("model.name",),
    "epochs": ("train.epochs",), "batch_size": ("train.batch_size",), "lr": ("train.lr",),
    "lr_schedule": ("train.lr_schedule",), "seed": ("train.seed",),
    "precision": ("train.precision",), "device": ("train.device",),
    "grad_clip": ("train.grad_clip",), "compile": ("train.compile",), "threads": ("train.num_threads",),
    "tensorboard": ("train.tensorboard",), "augment": ("train.augment",), "time_budget": ("train.time_budget",),
}


def typed_settings(args) -> set[str] | None:
    """The config settings whose flags appear on the command line (argparse cannot tell a typed value
    from a default, so the raw arguments are read; abbreviations are off in medivae's parser)."""
    parser, argv = getattr(args, "_parser", None), getattr(args, "_argv", None)
    if parser is None or argv is None:
        return None  # called without the command line: compare every setting
    typed = set()
    shorthands = model_flags()
    for action in parser._actions:
        if any(tok == o or tok.startswith(o + "=") for tok in argv for o in action.option_strings):
            typed.update(SETTINGS.get(action.dest, (f"model.{action.dest}",) if action.dest in shorthands else ()))
    typed.update(f"model.{k}" for k in model_args(getattr(args, "model_arg", [])))
    return typed


def flag_settings(args) -> dict:
    """Every setting the flags describe, typed or default, as dotted names: {"train.lr": 0.001, ...}."""
    model = {"name": args.model, "image_size": args.image_size, "channels": args.channels,
             **family_fields(args),
             **model_args(getattr(args, "model_arg", []))}
    return flat_settings({"data": data_values(args), "model": model, "train": train_values(args)})


def config_from_file(args) -> tuple[RunConfig, dict, set[str]]:
    """The run ``--config FILE`` describes with every typed flag on top: (config, where each setting came
    from, the settings the file gives). An unknown key in the file is a one-line error naming it."""
    from medivae.models.family import get_family

    path, d = args.config, read_config_file(args.config)
    try:
        RunConfig.from_dict(d)  # strict, before any flag is laid on top: the error is the file's
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    typed = typed_settings(args) or set()
    flags = {k: v for k, v in flag_settings(args).items() if k in typed}
    sections = {s: dict(d.get(s) or {}) for s in ("data", "model", "train")}
    model = sections["model"]
    name = flags.get("model.name", model.get("name", DEFAULT_FAMILY))
    if name != model.get("name", DEFAULT_FAMILY):  # another family: only the image geometry carries over
        model = {k: model[k] for k in ("image_size", "channels") if k in model}
    for k in ("image_size", "channels"):  # a hand-written file may give them once, under data
        if k in sections["data"]:
            model.setdefault(k, sections["data"][k])
    given = set(flat_settings({**d, **sections, "model": model})) - {"label_names", "medivae_version"}
    if "split_seed" not in sections["data"]:  # a run's config.json keeps its split; a hand-written file the default
        written = "medivae_version" in d
        sections["data"]["split_seed"] = with_split_seed(d)["data"]["split_seed"] if written else DEFAULT_SEED
        given |= {"data.split_seed"} if written else set()
    for key, value in flags.items():
        section, _, name_ = key.partition(".")
        (model if section == "model" else sections[section])[name_] = value
    preset = get_family(name).preset
    cfg = RunConfig.from_dict({**d, **sections, "model": {**preset, **model, "name": name}})
    return cfg, config_sources(path, cfg, typed, given, preset, flat_settings(d)), given


def config_sources(path, cfg: RunConfig, typed: set[str], given: set[str], preset: dict, file: dict) -> dict:
    """RUN/config_sources.json: each setting's origin, and the file's value of each one a flag replaced."""
    def origin(key: str) -> str:
        if key in typed:
            return "command line"
        if key in given:
            return "config file"
        return f"{cfg.model.name} preset" if key.removeprefix("model.") in preset else "default"

    keys = [k for k in flat_settings(cfg.to_dict()) if k not in ("label_names", "medivae_version")]
    return {"config_file": str(path), "settings": {k: origin(k) for k in keys},
            "overridden": {k: file[k] for k in keys if k in typed and k in file}}


def cmd_train(args) -> int:
    from medivae import api
    from medivae.runtime.distributed import is_main

    if args.config is None and args.data is None and args.resume:  # the run's own settings, typed flags on top
        from medivae.train.trainer import check_resumable

        check_resumable(args.out)
        args.config = args.out / "config.json"
    if args.config is not None:
        cfg, sources, given = config_from_file(args)
    elif args.data is None:
        raise UserError("the following arguments are required: --data (or --config FILE) "
                        "(see 'medivae train --help')")
    else:
        cfg, sources, given = run_config(args), None, set()
    compare = None
    if args.resume:  # the run keeps its own record of where its settings came from
        typed = typed_settings(args)
        compare, sources = (None if typed is None else typed | given), None
    run = api.train(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                    compare=compare, sources=sources)
    if is_main():  # under torchrun, say it once
        print(f"run written to {run}")
    return 0


def cmd_demo(args) -> int:
    from medivae import api

    cfg = api.demo_config(epochs=args.epochs)
    run = api.train(cfg, args.out, resume=False, progress=not args.no_progress)
    print(f"demo run written to {run}: samples.png, interpolation.png, reconstructions.png; open report.html")
    return 0


def add(sub) -> None:
    p = sub.add_parser("train", help="train a model on a data source", parents=[DEVICE, PROGRESS])
    add_data_args(p, required=False)  # required unless --config gives it (cmd_train checks)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="start from a run's config.json (or a JSON/YAML file with its keys); flags override it")
    p.add_argument("--out", required=True, type=path_arg, help="run folder to write (absent or empty)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last/, with the run's own settings (typed flags must agree)")
    add_model_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train, _parser=p)

    d = sub.add_parser("demo", help="train the article's VAE on built-in phantoms (1–3 min on 2 CPU cores)",
                       parents=[PROGRESS])
    d.add_argument("--out", type=path_arg, default=Path("runs/demo"))
    d.add_argument("--epochs", type=int, default=15)
    d.set_defaults(func=cmd_demo)
