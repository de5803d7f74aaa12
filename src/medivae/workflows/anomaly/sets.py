"""Which images ``medivae anomaly score`` scores, and on which normals it fits and calibrates.

The training normals (the statistics of what normal looks like), the validation normals (choosing and, by
default, calibrating), the scored split, and the calibration normals of ``--calibration`` or of an adapted
run. No normal the model trained on is ever scored as a test normal, and no calibration normal is a
training, validation or scored image. Also the check of whether the scored normals are like the training ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medivae.data import load_dataset
from medivae.data.imageset import ImageSet, concat, label_code
from medivae.data.sources import same_source
from medivae.evaluation.anomaly.shift import normal_shift, two_sample_test
from medivae.runtime.errors import UserError
from medivae.workflows.site import shared_images, site_normals


def scoring_sets(cfg, normal_label: str, data: str | None, split: str) -> dict:
    """The images to score and the normals to calibrate on, without leaking training images.

    On the run's own source the scored split is that split's normals *as the run split them* plus
    the split's other-label images, so no normal the model trained on is ever scored as a test normal.
    Returns {"train", "val": normal ImageSets, "scored": ImageSet, "normal_code": int | None (the normal
    label's number among the scored split's labels), "same_source": bool, "val_labelled": (uint8 images,
    is_anomaly) of the scored source's validation split when it holds normal and other labelled images and is
    not the scored split (what the trivial baselines' directions are fixed on), else None}.
    """
    own = load_dataset(cfg.data, progress=False)
    names = own["train"].label_names
    code = label_code(names, normal_label)
    if code is None:
        raise UserError(f"normal label {normal_label!r} is not one of the run's labels {list(names)}")
    normals = {k: v.subset(np.flatnonzero(v.labels == code)) for k, v in own.items()}
    if len(normals["val"]) < 2:
        raise UserError("the run has fewer than 2 validation normals to calibrate on; refit with --val-fraction > 0")
    same = data is None or same_source(data, cfg.data.source)
    full = load_dataset(dataclasses.replace(cfg.data, source=data or cfg.data.source, labels=()), progress=False)
    if split not in full:
        raise UserError(f"unknown split {split!r}; choose train, val or test")
    s = full[split]
    if same:
        others = s.subset(np.flatnonzero((s.labels != code) & (s.labels >= 0)))
        scored = concat([normals[split], others])
    else:
        scored = s
    if len(scored) == 0:
        raise UserError(f"split {split!r} of {data or cfg.data.source} is empty")
    return {"train": normals["train"], "val": normals["val"], "scored": scored,
            "normal_code": label_code(scored.label_names, normal_label), "same_source": same,
            "val_labelled": labelled(full["val"], normal_label) if split != "val" else None}


def labelled(s: ImageSet, normal_label: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 images, is_anomaly) of the labelled images of ``s`` when both normal and other ones are there."""
    code = label_code(s.label_names, normal_label)
    if code is None:
        return None
    keep = s.labels >= 0
    y = s.labels[keep] != code
    return (s.images[keep], y) if y.any() and not y.all() else None


def with_adaptation(sets: dict, site: dict) -> None:
    """Fold an adapted run's site normals into ``sets`` (``scoring_sets``), in place: the adaptation normals
    join the training normals (the latent and SSIM statistics of what the model was trained on). Refused
    with one line when a scored image is one of the site normals (adaptation or held-out)."""
    clash = shared_images(sets["scored"].images, [site["adapt"], site["held_out"]])
    if clash:
        raise UserError(f"{clash} of the {len(sets['scored'])} images to score are normals the run was adapted "
                        f"with ({site['record']['normals']}); score other images")
    sets["train"] = concat([sets["train"], site["adapt"]])


def calibration_set(cfg, normal_label: str, source: str, scored_source: str, sets: dict) -> ImageSet:
    """The normal images of ``source`` (``site.site_normals``) for the threshold. None of them may be a
    training (including adaptation), validation or scored image of ``sets`` (``scoring_sets``), compared
    pixel for pixel."""
    if same_source(source, cfg.data.source):  # its normals include the ones the model was fitted on
        raise UserError("--calibration must not be the run's own source (the model was fitted on its normals); "
                        "the run's validation normals are the default calibration")
    if same_source(source, scored_source):
        raise UserError("--calibration must hold normals that are not scored: pass other images than --data")
    cal = site_normals(cfg, normal_label, source, "--calibration")
    shared = shared_images(cal.images, [sets[key] for key in ("train", "val", "scored")])
    if shared:
        raise UserError(f"--calibration {source}: {shared} of its {len(cal)} normal images are also training, "
                        "validation or scored images; calibrate on other normals")
    return cal


def shift_check(sets: dict, split: str, bootstrap: int, seed: int) -> dict:
    """``evaluation.anomaly.shift.normal_shift`` against the training normals of: the validation normals, the
    ``--calibration`` normals when given, and the scored split's normals (when its labels say which they are,
    and they are not the validation or training normals themselves); with both of the last two, also the
    scored normals against the calibration normals ("scored_vs_calibration")."""
    checked = {"val": sets["val"].images}
    if "calibration" in sets:
        checked["calibration"] = sets["calibration"].images
    s, code = sets["scored"], sets["normal_code"]
    if code is not None and not (sets["same_source"] and split in ("train", "val")):
        checked["scored"] = s.images[s.labels == code]
    out = {"scored_split": split, **normal_shift(sets["train"].images, checked, seed, bootstrap)}
    if "calibration" in checked and "scored" in checked:  # what the threshold's bound needs: these two alike
        test = two_sample_test(checked["calibration"], checked["scored"], seed, bootstrap)
        if test is not None:
            out["scored_vs_calibration"] = test
    return out
