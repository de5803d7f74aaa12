"""Report figures drawn with matplotlib's Agg backend straight to PNG bytes (no display, no files)."""

from __future__ import annotations

import io

from medivae.report.collect import series

CURVES = (  # (metric prefix, panel title)
    ("loss", "negative ELBO (nats / image)"),
    ("rec", "reconstruction term (nats / image)"),
    ("kl", "KL term (nats / image)"),
)


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


def training_curves(metrics: list[dict]) -> bytes | None:
    """2x2 panels: negative ELBO, reconstruction and KL (train and validation), and the learning rate."""
    if not metrics:
        return None
    fig = _figure(figsize=(11, 6.6), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    best = _best_epoch(metrics)
    for ax, (key, title) in zip(axes[:3], CURVES, strict=True):
        for split, style in (("train", "-o"), ("val", "--s")):
            xs, ys = series(metrics, f"{split}_{key}")
            if xs:
                ax.plot(xs, ys, style, ms=3, label="validation" if split == "val" else split)
        _decorate(ax, title, best)
    xs, ys = series(metrics, "lr")
    axes[3].plot(xs, ys, "-o", ms=3, color="tab:green")
    _decorate(axes[3], "learning rate", best)
    return _png(fig)


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


def kl_per_dimension(kl: list[float], threshold: float = 0.01) -> bytes:
    """Bar chart of KL(q(z_d|x) || p(z_d)) per latent dimension, sorted, on a log scale."""
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
    ax.set_title(f"KL per latent dimension (gray: ≤ {threshold} nats)", fontsize=10)
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
