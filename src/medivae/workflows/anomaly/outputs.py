"""The files of ``medivae anomaly score``: scores.csv, maps.npz (every map the family has, one float16 array
(N, H, W) per map name, plus "maps", the map ``results.json["anomaly"]["map"]`` names), overlays.png (each of a
few images beside its map), maps.png (input, reconstruction and every map of the most and least anomalous
images) and roc.png (one ROC curve per score, when the scored split has labels).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from medivae.data.imageset import ImageSet
from medivae.runtime.io import atomic_write_text

MAX_GRID_ROWS = 8  # maps.png: a few of the most and least anomalous images, one row each


# --- rendering ----------------------------------------------------------------------------------------------
def plot_roc(scores: dict[str, np.ndarray], is_anomaly: np.ndarray, path: Path, title: str = "") -> Path:
    """One ROC curve per score in a PNG."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(is_anomaly, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(is_anomaly, s):.3f})", lw=1.4)
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1)
    ax.set(
        xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def colour_scale(maps: np.ndarray) -> float:
    """The 99.5th percentile of a map over every image: one colour scale, so rows compare."""
    return max(float(np.quantile(maps, 0.995)), 1e-12)


def _overlay(ax, gray: np.ndarray, amap: np.ndarray, vmax: float) -> None:
    """A map (H, W) in inferno over a gray image (H, W) in [0, 1]."""
    import matplotlib

    ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    level = np.clip(amap.astype(np.float32) / vmax, 0, 1)
    heat = matplotlib.colormaps["inferno"](level)
    heat[..., 3] = 0.85 * level  # opacity grows with the score: quiet pixels show the anatomy
    ax.imshow(heat)


def plot_overlays(
    images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path, per_row: int = 4
) -> Path:
    """(image, map over the image) pairs, ``per_row`` a row: images uint8 (N, C, H, W), maps (N, H, W)."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(per_row, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2 * 1.7 * cols, 1.9 * rows), dpi=100)
    vmax = colour_scale(maps)
    for i in range(n):
        gray = images[i].mean(0) / 255.0
        r, c = divmod(i, cols)
        a = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 1)
        a.imshow(gray, cmap="gray", vmin=0, vmax=1)
        a.set_title(titles[i], fontsize=6)
        b = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + 2)
        _overlay(b, gray, maps[i], vmax)
        b.set_title("anomaly map", fontsize=6)
        for ax in (a, b):
            ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def plot_map_grid(images: np.ndarray, recon: np.ndarray, maps: dict[str, np.ndarray], scales: dict[str, float],
                  titles: list[str], path: Path) -> Path:
    """Rows = images; columns = input, reconstruction, then each map over the input. images uint8
    (n, C, H, W); recon float (n, C, H, W) in [0, 1]; maps name -> (n, H, W), each drawn on its own colour
    scale ``scales[name]`` (shared by the rows, so a column compares images)."""
    from matplotlib.figure import Figure

    rows, cols = len(images), 2 + len(maps)
    fig = Figure(figsize=(1.35 * cols + 0.9, 1.4 * rows + 0.3), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        gray = images[i].mean(0) / 255.0
        axes[i, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(np.asarray(recon[i]).mean(0), cmap="gray", vmin=0, vmax=1)
        for j, (name, m) in enumerate(maps.items()):
            _overlay(axes[i, 2 + j], gray, m[i], scales[name])
        axes[i, 0].set_ylabel(titles[i], fontsize=6)
    for j, head in enumerate(["input", "reconstruction", *maps]):
        axes[0, j].set_title(head, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


def write_scores_csv(path: Path, scored, scores: dict[str, np.ndarray], is_anomaly, flagged) -> None:
    names = scored.label_names
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "label", "is_anomaly", *scores, "flagged"])
    for i in range(len(scored)):
        lab = int(scored.labels[i])
        w.writerow(
            [
                i,
                names[lab] if 0 <= lab < len(names) else "",
                "" if is_anomaly is None else int(is_anomaly[i]),
                *(f"{v[i]:.6g}" for v in scores.values()),
                int(flagged[i]),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def panel(ranking: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ceil(n / 2) highest of ``ranking`` (most anomalous first), then the floor(n / 2) lowest."""
    order = np.argsort(-ranking, kind="stable")
    return np.concatenate([order[: (n + 1) // 2], order[::-1][: n // 2]]) if n else order[:0]


def _half(maps: np.ndarray) -> np.ndarray:
    """float16 to keep maps.npz small; clipped so a large gradient stays finite."""
    big = float(np.finfo(np.float16).max)
    return np.clip(maps, -big, big).astype(np.float16)


def write_map_grid(path: Path, s: ImageSet, ranking: np.ndarray, rank_by: str, maps: dict[str, np.ndarray],
                   pick: np.ndarray, recon: np.ndarray) -> Path:
    """maps.png: the ``pick`` images (most and least anomalous by ``ranking``, the score ``rank_by``), their
    reconstructions ``recon`` (n, C, H, W) and every map of ``maps`` {name: (N, H, W)}, each map on one colour
    scale over the split."""
    names = [s.label_names[c] if 0 <= c < len(s.label_names) else "?" for c in s.labels[pick]]
    titles = [f"#{i} {n}\n{rank_by} {ranking[i]:.3g}" for i, n in zip(pick, names, strict=True)]
    scales = {n: colour_scale(m) for n, m in maps.items()}
    return plot_map_grid(s.images[pick], recon, {n: m[pick] for n, m in maps.items()}, scales, titles, path)


def write_files(out: Path, s: ImageSet, scores: dict[str, np.ndarray], maps: dict[str, np.ndarray], main_map: str,
                is_anomaly, flagged: np.ndarray, n_maps: int, title: str) -> dict[str, str]:
    """scores.csv, maps.npz, overlays.png (the ``n_maps`` most and least anomalous by ``combined``) and, with
    labels, roc.png of the scored split ``s``; -> {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    write_scores_csv(out / "scores.csv", s, scores, is_anomaly, flagged)
    np.savez_compressed(out / "maps.npz", maps=_half(maps[main_map]), **{n: _half(m) for n, m in maps.items()})
    files = {"scores": str(out / "scores.csv"), "maps": str(out / "maps.npz")}
    combined = scores["combined"]
    pick = panel(combined, n_maps)
    if len(pick):
        names = [s.label_names[c] if c >= 0 else "?" for c in s.labels[pick]]
        titles = [f"#{i} {n} score {combined[i]:.2f}" for i, n in zip(pick, names, strict=True)]
        files["overlays"] = str(plot_overlays(s.images[pick], maps[main_map][pick], titles, out / "overlays.png"))
    if is_anomaly is not None and (s.labels >= 0).any():
        labelled = s.labels >= 0
        y = is_anomaly[labelled]
        if y.any() and not y.all():
            files["roc"] = str(plot_roc({n: v[labelled] for n, v in scores.items()}, y, out / "roc.png", title))
    return files
