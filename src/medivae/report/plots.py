"""Report figures drawn with matplotlib's Agg backend straight to PNG bytes (no display, no files)."""

from __future__ import annotations

import io
import math

from medivae.report.collect import series

TITLES = {  # panel titles of the terms medivae's VAE logs; any other term is titled by its name
    "rec": "reconstruction term (nats / image)",
    "kl": "KL term (nats / image)",
    "beta": "β (KL weight)",
}
SPLITS = ("train", "val")


def _figure(*args, **kwargs):
    # the object-oriented API never touches pyplot's global state or a GUI backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def curve_terms(metrics: list[dict]) -> list[str]:
    """Names of the per-sample terms logged as ``train_<name>``/``val_<name>``: "loss" first, then in
    order of first appearance; a term that never has a number is left out."""
    names = []
    for row in metrics:
        for key, value in row.items():
            split, _, name = key.partition("_")
            if split in SPLITS and name and name not in names and _number(value):
                names.append(name)
    return sorted(names, key=lambda n: n != "loss")  # stable: the rest keep their order


def loss_is_neg_elbo(terms) -> bool:
    """A VAE's "loss" term is its negative ELBO (it logs "rec" and "kl" beside it); other families' is not."""
    return {"rec", "kl"} <= set(terms)


def curve_panels(metrics: list[dict]) -> list[tuple[str, str]]:
    """(metric, panel title) of every training-curve panel: each term, then the learning rate."""
    terms = curve_terms(metrics)
    loss = "negative ELBO (nats / image)" if loss_is_neg_elbo(terms) else "loss"
    titles = {**TITLES, "loss": loss}
    return [(t, titles.get(t, t.replace("_", " "))) for t in terms] + [("lr", "learning rate")]


def curves_figure(metrics: list[dict]):
    """One panel per term (train and validation together) and one for the learning rate, up to 3 columns."""
    panels = curve_panels(metrics)
    cols = min(len(panels), 2 if len(panels) <= 4 else 3)
    rows = -(-len(panels) // cols)
    fig = _figure(figsize=(5.5 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    best = _best_epoch(metrics)
    for ax, (key, title) in zip(axes, panels, strict=False):
        if key == "lr":
            ax.plot(*series(metrics, "lr"), "-o", ms=3, color="tab:green")
        else:
            _plot_splits(ax, metrics, key)
        _decorate(ax, title, best)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    return fig


def _plot_splits(ax, metrics: list[dict], key: str) -> None:
    for split, style in (("train", "-o"), ("val", "--s")):
        xs, ys = series(metrics, f"{split}_{key}")
        if xs:
            ax.plot(xs, ys, style, ms=3, label="validation" if split == "val" else split)


def training_curves(metrics: list[dict]) -> bytes | None:
    """The training curves (see :func:`curves_figure`) as PNG bytes; None without metrics."""
    return _png(curves_figure(metrics)) if metrics else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _best_epoch(metrics: list[dict]) -> int | None:
    xs, ys = series(metrics, "val_loss")
    return xs[ys.index(min(ys))] if ys else None


def _decorate(ax, title: str, best: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if best is not None:
        ax.axvline(best, color="gray", ls=":", lw=1, label=f"best val (epoch {best})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def kl_per_dimension(kl: list[float], threshold: float = 0.01, prior: str = "N(0, I)") -> bytes:
    """Bar chart of KL(q(z_d|x) || p(z_d)) per latent dimension, sorted, on a log scale; ``prior`` names p."""
    order = sorted(range(len(kl)), key=lambda d: -kl[d])
    values = [max(float(kl[d]), 1e-6) for d in order]
    fig = _figure(figsize=(min(11, max(6, 3 + 0.22 * len(kl))), 3.2), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:blue" if v > threshold else "lightgray" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(values)), [str(d) for d in order], fontsize=7)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per latent dimension to {prior} (gray: ≤ {threshold} nats)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def roc_curve(fpr: list[float], tpr: list[float], auroc: float | None = None) -> bytes:
    fig = _figure(figsize=(4.2, 4.2), layout="constrained")
    ax = fig.subplots()
    label = "ROC" if auroc is None else f"ROC (AUROC {auroc:.3f})"
    ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], ":", color="gray", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)
