"""The plain-text table ``medivae evaluate`` prints, rendered from the "evaluation" block of results.json."""

from __future__ import annotations

import textwrap


def _num(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ci(ci, fmt: str = ".2f") -> str:
    """" [lo, hi]" (95 % bootstrap interval) or "" when none was computed."""
    return "" if not ci else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def likelihood_lines(lik: dict, ci: dict | None = None) -> list[str]:
    ci = ci or {}
    bpd = lik["discrete_image_likelihood"]
    head = f"Likelihood ({lik['likelihood']}; bounds on {lik.get('quantity', '-log p(x)')})"
    lines = [f"{head:<44}{'nats/image':>12}" + (f"{'bits/dim':>10}" if bpd else "") + ("  95% CI" if ci else "")]
    rows = [("negative ELBO", lik["neg_elbo_nats"], lik["neg_elbo_bpd"], ci.get("neg_elbo_nats")),
            (f"negative IWAE bound, K={lik['iwae_k']}", lik["neg_iwae_nats"], lik["neg_iwae_bpd"],
             ci.get("neg_iwae_nats"))]
    for name, nats, b, c in rows:
        lines.append(f"  {name:<42}{_num(nats):>12}" + (f"{_num(b, '.4f'):>10}" if bpd else "") + _ci(c))
    curve = ", ".join(f"K={k}: {_num(v)}" for k, v in lik["neg_iwae_nats_by_k"].items())
    lines.append(f"  IWAE curve  {curve}")
    ess = lik.get("iwae_ess")
    if ess:
        lines.append(f"  IWAE effective sample size: median {ess['median']:.1f} of K={ess['k']}")
    for note in (lik["note"], (ess or {}).get("note")):
        if note:
            lines += textwrap.wrap("note: " + note, 96, initial_indent="  ", subsequent_indent="    ")
    return lines


def reconstruction_lines(rec: dict, ci: dict | None = None) -> list[str]:
    ci = ci or {}
    return ["Reconstruction (posterior mean, per image then averaged; 95% bootstrap intervals)" if ci else
            "Reconstruction (posterior mean, per image then averaged)",
            f"  MSE {rec['mse']:.5f}{_ci(ci.get('mse'), '.5f')}    PSNR {rec['psnr_db']:.2f}{_ci(ci.get('psnr_db'))} dB"
            f"    SSIM {rec['ssim']:.4f}{_ci(ci.get('ssim'), '.4f')}", *foreground_lines(rec, ci)]


def foreground_lines(rec: dict, ci: dict) -> list[str]:
    if not rec.get("foreground"):
        return []
    return [f"  foreground ({rec['foreground']} mask, {_num(rec.get('fg_fraction'), '.0%')} of pixels): "
            f"PSNR {_num(rec.get('psnr_fg_db'))}{_ci(ci.get('psnr_fg_db'))} dB    "
            f"SSIM {_num(rec.get('ssim_fg'), '.4f')}{_ci(ci.get('ssim_fg'), '.4f')}"]


def collapse_lines(c: dict) -> list[str]:
    kl = ", ".join(f"{v:.2f}" for v in c["kl_per_dim"])
    return [
        "Posterior collapse",
        f"  active units {c['active_units']} / {c['latent_dim']}  (Var_x E[z|x] > {c['active_threshold']})",
        f"  KL total {c['kl_total_nats']:.2f} nats;  I(x; z) >= {c['mutual_information_nats']:.2f} nats"
        f" (estimate saturates at log N = {c['mi_upper_bound_nats']:.2f})",
        *textwrap.wrap(f"KL per dimension (nats): {kl}", 96, initial_indent="  ", subsequent_indent="    "),
    ]


def quality_lines(q: dict, fid: dict | None, ci: dict | None = None) -> list[str]:
    ci = ci or {}
    name = "a classifier" if q["extractor"] == "cnn" else "an autoencoder's encoder"
    ref = q.get("reference_split", "train")
    floor = f"real {q['held_out_split']} vs {ref}"
    w = 30 if ci.get("fd") else 12  # room for " [lo, hi]"
    lines = [
        f"Sample quality: features from {name} trained on real training images"
        + (", with their fine detail (Laplacian pyramid)" if q.get("extractor_version", 1) >= 2 else ""),
        f"  ({q['n_generated']} {q.get('sampler', 'prior')} samples and {q['n_held_out']} real "
        f"{q['held_out_split']} images, each against {q['n_reference']} real {ref} images"
        + ("; 95% bootstrap intervals)" if ci.get("fd") else ")"),
        f"  {'':<22}{'model':>{w}}{floor:>{w + 12}}",
    ]
    rows = [(q["fd_name"], "fd"), ("HF power vs real", "hf_power_ratio"), ("precision (k=3)", "precision"),
            ("recall (k=3)", "recall"), ("density (k=5)", "density"), ("coverage (k=5)", "coverage")]
    for label, key in rows:
        if key not in q["model"]:  # results of an older medivae
            continue
        fmt = ".4g" if key == "fd" else ".3f"
        model = _num(q["model"][key], fmt) + _ci(ci.get(key), fmt)
        floor_ = _num(q["floor"][key], fmt) + _ci(ci.get(f"floor_{key}"), fmt)
        lines.append(f"  {label:<22}{model:>{w}}{floor_:>{w + 12}}")
    if "hf_power_ratio" in q["model"]:
        lines.append("  (HF power vs real: mean spectral power above 1/4 cycle/pixel over the real images'; "
                     "1 = as much fine detail)")
    if fid:
        model, floor_ = _num(fid["model"], ".4g"), _num(fid["floor"], ".4g")
        lines.append(f"  {'FID (Inception)':<22}{model:>{w}}{floor_:>{w + 12}}")
    return lines


def format_table(ev: dict) -> str:
    head = (f"{ev['run']}  ({ev['checkpoint']} checkpoint; {ev['split']} split of {ev['data']}: "
            f"{ev['n_images']} images; {ev['seconds']:.0f} s)")
    parts = [[head]]
    absent = ev.get("absent", {})
    ci = ev.get("ci95") or {}
    for key, lines in (("likelihood", likelihood_lines), ("reconstruction", reconstruction_lines)):
        if ev.get(key) is not None:
            parts.append(lines(ev[key], ci))
    if ev.get("collapse") is not None:
        parts.append(collapse_lines(ev["collapse"]))
    if ev.get("sample_quality") is not None:
        parts.append(quality_lines(ev["sample_quality"], ev.get("fid"), ci))
    parts += [[f"{key.replace('_', ' ')}: not measured ({why})"] for key, why in absent.items()]
    return "\n\n".join("\n".join(p) for p in parts)
