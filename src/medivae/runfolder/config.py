"""Run configuration: frozen dataclasses, validated on creation, saved as JSON with every run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medivae.runtime.constants import DEFAULT_FAMILY, IMAGE_SIZES, MAX_THREADS
from medivae.runtime.errors import UserError
from medivae.runtime.schema import build, check_fields, convert
from medivae.runtime.seeding import DEFAULT_SEED

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DataConfig:
    source: str = "phantoms"
    image_size: int = 64
    channels: int = 1
    labels: tuple[str, ...] = ()  # keep only these class names (empty: all)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    resize_mode: str = "pad"  # non-square images: "pad" (keep all) or "crop" (centre)
    window: str | None = None  # DICOM/NIfTI: "CENTER,WIDTH" or a preset name (lung, mediastinum, bone, brain)
    cache: bool = True  # keep decoded images in $MEDIVAE_CACHE (default ~/.cache/medivae)
    nifti_axis: str = "axial"  # NIfTI slices: axial, coronal or sagittal
    normalize: str = "percentile"  # DICOM/NIfTI without a window: percentile[:LO,HI] or range:LO,HI
    # the data's own seed, apart from the training seed: it splits sources that have no split of their own
    # (folders, CSV, archives, MedNIST) and draws the built-in phantoms, so runs with other training seeds
    # share their test images and their reference extractor
    split_seed: int = DEFAULT_SEED

    def __post_init__(self):
        check_fields(self, "data")
        if self.image_size not in IMAGE_SIZES:
            raise UserError(f"image size {self.image_size} is not supported; use one of {list(IMAGE_SIZES)}")
        if self.channels not in (1, 3):
            raise UserError(f"channels must be 1 (gray) or 3 (RGB), not {self.channels}")
        if self.resize_mode not in ("pad", "crop"):
            raise UserError(f"resize mode must be 'pad' or 'crop', not {self.resize_mode!r}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 0.5:
                raise UserError(f"{name.replace('_', ' ')} must be in [0, 0.5), not {v}")
        if not self.source.strip():
            raise UserError("data source is empty; give --data SOURCE")
        if self.split_seed < 0:
            raise UserError(f"split seed must be >= 0, not {self.split_seed}")
        from medivae.data.nifti import SLICE_AXES
        from medivae.data.windowing import parse_normalize, parse_window

        parse_window(self.window)
        parse_normalize(self.normalize)
        if self.nifti_axis not in SLICE_AXES:
            raise UserError(f"NIfTI axis must be one of {list(SLICE_AXES)}, not {self.nifti_axis!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # cosine: lr * (1 + cos(pi * progress)) / 2 per step, progress = epochs done / epochs
    weight_decay: float = 0.0
    seed: int = DEFAULT_SEED
    precision: str = "auto"  # auto: bf16 where the hardware does it natively, else fp32
    channels_last: bool = True
    compile: bool = False
    grad_clip: float = 0.0  # 0: off
    num_threads: int = 0  # 0: torch default
    device: str = "auto"
    max_nan_retries: int = 3
    tensorboard: bool = False  # scalars per epoch to RUN/tensorboard (pip install medivae[tensorboard])
    augment: str = ""  # e.g. "shift=2,contrast=0.1,brightness=0.05" (train/augment.py); "": none
    time_budget: float = 0.0  # seconds; > 0: fit the run into them (train/budget.py); 0: none

    def __post_init__(self):
        check_fields(self, "train")
        for name, low in (("epochs", 1), ("batch_size", 1), ("num_threads", 0), ("max_nan_retries", 0)):
            if getattr(self, name) < low:
                raise UserError(f"train.{name} must be >= {low}, not {getattr(self, name)}")
        if self.num_threads > MAX_THREADS:
            raise UserError(f"train.num_threads must be <= {MAX_THREADS}, not {self.num_threads}")
        for name in ("weight_decay", "grad_clip", "time_budget"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, not {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be > 0, not {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"seed must be in [0, 2**64), not {self.seed}")
        from medivae.runtime.device import check_device_name
        from medivae.train.augment import parse_augment

        check_device_name(self.device)
        parse_augment(self.augment)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=lambda: _default_model())  # the family's config (models/family.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    label_names: tuple[str, ...] = ()  # filled from the data source when the run starts

    def to_dict(self) -> dict[str, Any]:
        from medivae.runtime.version import __version__

        return {**dataclasses.asdict(self), "medivae_version": __version__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Strict: an unknown key anywhere (or an unknown model family) is a one-line UserError. Settings
        that older versions kept among the training settings (``train.kl_schedule``, ...) move into the
        family's config (:meth:`medivae.models.family.Family.upgrade`), so old run folders open as they ran."""
        from medivae.models.family import LEGACY_TRAIN_SETTINGS, build_config, get_family

        if not isinstance(d, dict):
            raise UserError(f"a run configuration is an object of data/model/train settings, not {type(d).__name__}")
        unknown = set(d) - {"data", "model", "train", "label_names", "medivae_version"}
        if unknown:
            raise UserError(f"unknown run configuration key(s): {sorted(map(str, unknown))}")
        model = d.get("model", {})
        if not isinstance(model, dict):
            raise UserError(f"invalid model config: expected an object, got {type(model).__name__}")
        name = model.get("name", DEFAULT_FAMILY)
        if not isinstance(name, str):
            raise UserError(f"model.name = {name!r} is not allowed; expected the name of a model family")
        family = get_family(name, written_by=str(d.get("medivae_version", "0.1.0 or earlier")))
        d = with_split_seed(d)
        train = d.get("train", {})
        legacy = {}
        if isinstance(train, dict):
            legacy = {k: train[k] for k in LEGACY_TRAIN_SETTINGS if k in train}
            train = {k: v for k, v in train.items() if k not in legacy}
        return cls(
            data=build(DataConfig, d.get("data", {}), "data"),
            model=build_config(family.config, family.upgrade({**model, "name": name}, legacy), name),
            train=build(TrainConfig, train, "train"),
            label_names=convert("label_names", d.get("label_names", ()), tuple[str, ...]),
        )

    def check_geometry(self) -> None:
        """A UserError unless data and model agree on image size and channels. The data are made at data's and
        the network built for model's: a config file that splits them (edited by hand) was a shape error from
        torch in the first batch, after the run folder was started. Not in ``__post_init__``: a config file may
        give the geometry under data only, which is carried to model after the file is read."""
        for key in ("image_size", "channels"):
            here, there = getattr(self.data, key), getattr(self.model, key, getattr(self.data, key))
            if here != there:
                raise UserError(f"data.{key} = {here} but model.{key} = {there}; the model is built for its "
                                "data: give them one value")

    def save(self, path: str | Path) -> None:
        from medivae.runtime.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; is this a medivae run folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_dict(d)


def with_split_seed(d: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration with ``data.split_seed`` filled in: one written before the split had a seed of
    its own split its data with the training seed (``train.seed``), so that is its split seed, and its
    splits, phantoms and test images stay what they were."""
    data, train = d.get("data", {}), d.get("train", {})
    if not isinstance(data, dict) or "split_seed" in data:
        return d
    seed = train.get("seed", DEFAULT_SEED) if isinstance(train, dict) else DEFAULT_SEED
    return {**d, "data": {**data, "split_seed": seed}}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run configuration file as a dict: a run's config.json, or JSON/YAML with the same keys
    (YAML needs PyYAML, an optional dependency). Not validated here: see :meth:`RunConfig.from_dict`."""
    path = Path(path)
    yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config file ({e})") from None
    if yaml:
        d = _parse_yaml(path, text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected an object of data/model/train settings, got {type(d).__name__}")
    return d


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UserError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as JSON") \
            from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


def flat_settings(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; tuples become lists, as in JSON."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _default_model():
    from medivae.models import model_config

    return model_config(DEFAULT_FAMILY)
