"""Assemble the report: one section per part of a run, each saying what is missing and how to make it.

Known ``results.json`` keys get special treatment (plots, headlines); every other key, and every
unknown field inside a known one, is rendered by the generic table code so new results show up
without changes here.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from medivae.report import anomaly, plots
from medivae.report.collect import RunFiles, find_key, is_numbers, read_run
from medivae.report.html import blocks, command, esc, fmt, image, note, page, section
from medivae.runfolder.results import stale_evaluation
from medivae.runtime.version import __version__

KNOWN_RESULTS = ("evaluation", "anomaly", "privacy", "utility", "benchmark", "benchmarks")
MAX_IMAGES_PER_SECTION = 24
EVALUATION_SECTIONS = (  # evaluation parts a model family may lack (None in results.json, reason in "absent")
    ("likelihood", "Likelihood"), ("collapse", "Posterior collapse"), ("sample_quality", "Sample quality"),
)
GENERATION = {  # file -> (title, caption, how to make it)
    "samples.png": (
        "Samples", "Decoded draws from the model's prior (N(0, I), or the VampPrior of a vamp run).",
        "sample RUN -n 64 --out RUN/samples.png",
    ),
    "interpolation.png": (
        "Interpolation", "Decoded points on a path between two prior draws.",
        "interpolate RUN --mode slerp --out RUN/interpolation.png",
    ),
    "reconstructions.png": (
        "Reconstructions", "Top row: held-out images; bottom row: decoded posterior means.",
        "reconstruct RUN --out RUN/reconstructions.png",
    ),
}
GENERATION_NEEDS = {"samples.png": ("sample",), "interpolation.png": ("sample", "latent")}  # capabilities
GROUP_WORDS = (  # first match wins; matched against the words of a figure's relative path
    ("generation", ("traversal", "traversals")),
    ("anomaly", ("anomaly", "anomalies", "roc", "auroc", "overlay", "overlays", "map", "maps", "residual")),
    ("privacy", ("privacy", "memorisation", "memorization", "nearest", "synthetic")),
    ("utility", ("utility", "tstr")),
    ("benchmark", ("benchmark", "benchmarks", "bench", "throughput", "scaling")),
    ("evaluation", ("evaluation", "eval", "kl", "active", "latent")),
)


@dataclass
class Report:
    run: RunFiles
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what, command that makes it)
    nav: list[tuple[str, str]] = field(default_factory=list)
    used: set[Path] = field(default_factory=set)

    def cmd(self, template: str) -> str:
        """A copy-pasteable medivae command for this run."""
        src = _dict(_dict(self.run.config).get("data")).get("source", "SOURCE")
        text = "medivae " + template.replace("SOURCE", shlex.quote(str(src)))
        return text.replace("RUN", shlex.quote(str(self.run.run_dir)))

    def lack(self, what: str, template: str) -> str:
        """Record a missing piece and return the note that says so where it would have been."""
        cmd = self.cmd(template)
        self.missing.append((what, cmd))
        return note(f"{esc(what)}: run {command(cmd)}, then {command(self.cmd('report RUN'))}.")

    def section(self, anchor: str, title: str, body: str) -> str:
        self.nav.append((anchor, title))
        return section(anchor, title, body)

    def figures(self, paths: list[Path], pixelated: bool = False) -> str:
        shown = paths[:MAX_IMAGES_PER_SECTION]
        self.used.update(paths)
        out = "".join(
            image((self.run.run_dir / p).read_bytes(), p.stem, esc(p.as_posix()), p.suffix, pixelated)
            for p in shown
        )
        if len(paths) > len(shown):
            out += note(f"{len(paths) - len(shown)} more figure(s) in the run folder.", "muted")
        return out


def group_of(path: Path) -> str:
    words = set(re.split(r"[^a-z0-9]+", path.as_posix().lower()))
    for group, keys in GROUP_WORDS:
        if words & set(keys):
            return group
    return "other"


def build(run_dir: str | Path) -> str:
    rep = Report(read_run(run_dir))
    groups: dict[str, list[Path]] = {}
    for p in rep.run.images:
        groups.setdefault(group_of(p), []).append(p)
    body = [
        training_section(rep),
        generation_section(rep, groups.get("generation", [])),
        evaluation_section(rep, groups.get("evaluation", [])),
        *application_sections(rep, groups),
        *other_results_sections(rep),
    ]
    leftover = [p for p in rep.run.images if p not in rep.used]
    if leftover:
        body.append(rep.section("figures", "Other figures", rep.figures(leftover)))
    body += [data_section(rep), config_section(rep), environment_section(rep)]
    nav, rep.nav = rep.nav, []
    head = summary_section(rep)
    return page(
        f"medivae run report: {rep.run.run_dir.resolve().name}",
        esc(f"{rep.run.run_dir} · generated {_now()} · medivae {__version__}"),
        rep.nav + nav, [head, *body],
        "Self-contained: every figure is embedded in this file and nothing is loaded from the network.",
    )


def _dict(value) -> dict:
    """``value`` if it is a dict, else {}: a hand-edited JSON file must not stop the report."""
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- sections -------------------------------------------------------------------------------------
def summary_section(rep: Report) -> str:
    facts = [f"<li>{k}: {v}</li>" for k, v in _facts(rep) if v is not None]
    out = f"<ul class='facts'>{''.join(facts)}</ul>" if facts else ""
    for problem in rep.run.problems:
        out += note(esc(problem), "problem")
    if rep.missing:
        items = "".join(f"<li>{esc(w)}: {command(c)}</li>" for w, c in rep.missing)
        out += f"<div class='note missing'><b>Not in this run yet</b><ul>{items}</ul></div>"
    return rep.section("summary", "Summary", out)


def _facts(rep: Report):
    cfg, m = _dict(rep.run.config), rep.run.metrics
    model, data, train = (_dict(cfg.get(k)) for k in ("model", "data", "train"))
    if model:
        facts = _dict((rep.run.env or {}).get("model_facts")) or model  # a run from before env.json had facts
        yield "model", esc(_model_fact({**facts, "name": model.get("name")}))
    if data:
        yield "data", esc(f"{data.get('source')} at {data.get('image_size')}×{data.get('image_size')}")
    if rep.run.data:
        counts = (f"{k} {fmt(v.get('n'))}" for k, v in rep.run.data.items() if isinstance(v, dict))
        yield "images", esc(" · ".join(counts))
    if m:
        yield "epochs", f"{m[-1]['epoch']} of {train.get('epochs', '?')}"
        val = [(r["val_loss"], r["epoch"]) for r in m if isinstance(r.get("val_loss"), (int, float))]
        if val:
            best = min(val)
            if plots.loss_is_neg_elbo(plots.curve_terms(m)):
                yield "best validation negative ELBO", f"{fmt(best[0])} nats (epoch {best[1]})"
            else:
                yield "best validation loss", f"{fmt(best[0])} (epoch {best[1]})"
        speeds = [r["images_per_s"] for r in m if isinstance(r.get("images_per_s"), (int, float))]
        if speeds:
            yield "training speed", f"{fmt(statistics.median(speeds))} images/s (median over epochs)"
        seconds = sum(r.get("seconds", 0) for r in m if isinstance(r.get("seconds"), (int, float)))
        yield "training time", f"{seconds / 60:.1f} min"
    env = rep.run.env or {}
    if env:
        yield "device", esc(f"{env.get('device')} ({env.get('precision', '?')})")
    if train.get("seed") is not None:
        yield "seed", esc(train["seed"])


MODEL_FACTS = (("latent_dim", "latent {}"), ("likelihood", "{} likelihood"), ("beta", "β {}"))  # ModelFacts


def _model_fact(model: dict) -> str:
    """E.g. ``conv_vae · latent 16 · bernoulli likelihood · β 1.0``; fields a family lacks are left out."""
    parts = [str(model.get("name"))]
    parts += [text.format(model[key]) for key, text in MODEL_FACTS if model.get(key) is not None]
    return " · ".join(parts)


def training_section(rep: Report) -> str:
    m = rep.run.metrics
    if not m:
        missing = rep.lack("No training metrics", "train --data SOURCE --out RUN")
        return rep.section("training", "Training", missing)
    png = plots.training_curves(m)
    out = image(png, "training curves", "Train (solid) and validation (dashed) per epoch; dotted: best.")
    cols = list(dict.fromkeys(k for r in m for k in r))
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in m)
    summary = f"<summary>Per-epoch metrics ({len(m)} epochs)</summary>"
    out += f"<details>{summary}<table class='grid'>{head}{rows}</table></details>"
    return rep.section("training", "Training", out)


def generation_section(rep: Report, traversals: list[Path]) -> str:
    out = ""
    for name, (title, caption, how) in GENERATION.items():
        path = Path(name)
        out += f"<h3>{esc(title)}</h3>"
        if path in rep.run.images:
            rep.used.add(path)
            out += image((rep.run.run_dir / path).read_bytes(), title, esc(caption), pixelated=True)
        elif lacking := _lacking(rep, GENERATION_NEEDS.get(name, ())):
            out += note(esc(f"{title}: not available — {lacking}"), "muted")
        else:
            out += rep.lack(f"No {title.lower()}", how)
    if traversals:
        out += "<h3>Latent traversals</h3>" + rep.figures(traversals, pixelated=True)
    return rep.section("generation", "Samples, interpolations, reconstructions", out)


def _lacking(rep: Report, needs) -> str:
    """Why the run's family cannot make a figure, from the capabilities the evaluation or the training run
    (env.json) recorded; "" when it can, or when nothing says."""
    model = _dict(_dict(rep.run.results.get("evaluation")).get("model"))
    env = _dict(rep.run.env)
    caps = model.get("capabilities", env.get("capabilities"))
    name = model.get("name", env.get("model"))
    missing = [c for c in needs if isinstance(caps, list) and c not in caps]
    return f"{name} lacks the {' and '.join(missing)} capability" if missing else ""


def evaluation_section(rep: Report, figures: list[Path]) -> str:
    ev = rep.run.results.get("evaluation")
    if not isinstance(ev, dict):
        out = rep.lack("No evaluation yet", "evaluate RUN --data SOURCE")
        return rep.section("evaluation", "Evaluation", out + rep.figures(figures))
    out = "".join(_absent_notes(ev))
    if stale := stale_evaluation(rep.run.run_dir, ev):
        out = note(esc(f"This evaluation is out of date: {stale}. Rerun it: {rep.cmd('evaluate RUN')}")) + out
    if ev.get("collapse", True) is not None:  # older blocks may keep collapse numbers elsewhere
        out += "<h3>Posterior collapse: KL per latent dimension and active units</h3>" + _collapse(ev)
    out += _sample_quality_headline(rep, _dict(ev.get("sample_quality")))
    out += "<h3>All evaluation results</h3>" + blocks(_present(ev)) + rep.figures(figures)
    return rep.section("evaluation", "Evaluation", out)


def _sample_quality_headline(rep: Report, q: dict) -> str:
    """FD beside its real-vs-real floor and the samples' high-frequency power (how sharp they are)."""
    model, floor = _dict(q.get("model")), _dict(q.get("floor"))
    if not isinstance(model.get("fd"), (int, float)):
        return ""
    text = f"{esc(q.get('fd_name', 'FD'))} {fmt(model['fd'])} (two real sets: {fmt(floor.get('fd'))})"
    if isinstance(model.get("hf_power_ratio"), (int, float)):
        text += (f"; high-frequency power {fmt(model['hf_power_ratio'])} of the real images' "
                 f"(two real sets: {fmt(floor.get('hf_power_ratio'))})")
    old = "" if q.get("extractor_version", 1) >= 2 else note(
        "Scored by an older reference extractor without fine-detail features: blind to blur, and not comparable "
        "with runs evaluated now; rerun " + command(rep.cmd("evaluate RUN")) + ".", "muted")
    return f"<h3>Sample quality</h3><p><b>{text}</b></p>" + old


def _absent_notes(ev: dict):
    """For each section the family lacks: ``Likelihood: not measured — vq_vae defines no image likelihood``."""
    absent = _dict(ev.get("absent"))
    for key, title in EVALUATION_SECTIONS:
        if ev.get(key) is None and (key in ev or key in absent):
            why = f" — {absent[key]}" if absent.get(key) else ""
            yield note(esc(f"{title}: not measured{why}"), "muted")


def _present(ev: dict) -> dict:
    """The evaluation block without its absent sections (already explained) and the ``absent`` notes."""
    skip = {k for k, _ in EVALUATION_SECTIONS if k in ev and ev[k] is None}
    if isinstance(ev.get("absent"), dict):
        skip.add("absent")
    return {k: v for k, v in ev.items() if k not in skip}


def _collapse(ev: dict) -> str:
    active = find_key(ev, lambda k, v: k.startswith("active") and "threshold" not in k and type(v) is int)
    kl = find_key(ev, lambda k, v: "kl" in k and ("dim" in k or "per" in k) and is_numbers(v))
    out = ""
    if active is not None:
        dims = f" of {len(kl[1])}" if kl else ""
        out += f"<p><b>Active units: {fmt(active[1])}{dims}</b> latent dimensions (Burda et al. 2015).</p>"
    if kl is not None:
        prior = _dict(ev.get("collapse")).get("kl_prior", "N(0, I), closed form")
        out += f"<p>KL to the model's prior: {esc(prior)}.</p>"
        out += image(plots.kl_per_dimension(kl[1], prior=prior.split(",")[0]), "KL per latent dimension")
    return out or note("The evaluation has no KL per dimension or active-unit count.", "muted")


def application_sections(rep: Report, groups: dict[str, list[Path]]):
    for key, title in (("anomaly", "Anomaly detection"), ("privacy", "Privacy"), ("utility", "Utility")):
        res = rep.run.results.get(key)
        if res is None and key == "utility":
            res = _utility_beside_synthetic(rep)
        figs = list(dict.fromkeys(groups.get(key, []) + _linked_figures(rep, res)))
        if res is None and not figs:
            continue
        if key == "anomaly":
            yield rep.section(key, title, anomaly.section_body(rep, res, figs, _roc(res)))
            continue
        out = rep.figures(figs)
        if res is not None:
            out += blocks(res) if isinstance(res, dict) else f"<p>{fmt(res)}</p>"
        yield rep.section(key, title, out)
    bench = {k: v for k in ("benchmark", "benchmarks") if (v := rep.run.results.get(k)) is not None}
    figs = groups.get("benchmark", [])
    if bench or figs:
        yield rep.section("benchmark", "Benchmarks", rep.figures(figs) + (blocks(bench) if bench else ""))


def _linked_figures(rep: Report, res) -> list[Path]:
    """Figures a results entry names by path (e.g. privacy's nearest-neighbour pairs)."""
    out = []
    root = rep.run.run_dir.resolve()
    for v in _strings(res):
        p = Path(v)
        if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
            # relative: to the run folder, or to where the command ran (``--out`` as typed)
            found = next((c.resolve() for c in ([p] if p.is_absolute() else [rep.run.run_dir / p, p])
                          if c.is_file()), None)  # fmt: skip
            if found is not None:  # resolved, so a figure found by folder too is shown once
                out.append(found.relative_to(root) if found.is_relative_to(root) else found)
    return out


def _strings(value, depth: int = 0):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and depth < 4:
        for v in value.values():
            yield from _strings(v, depth + 1)


def _utility_beside_synthetic(rep: Report):
    """``medivae utility`` writes utility.json into the folder ``synthesize`` filled from this run."""
    for fig in _linked_figures(rep, rep.run.results.get("privacy")):
        path = (rep.run.run_dir / fig).parent / "utility.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                rep.run.problems.append(f"{path} could not be read")
    return None


def _roc(res) -> str:
    """A ROC plot from fpr/tpr arrays in the anomaly results (when no ROC figure was saved)."""
    fpr = find_key(res, lambda k, v: k == "fpr" and is_numbers(v))
    tpr = find_key(res, lambda k, v: k == "tpr" and is_numbers(v))
    if not fpr or not tpr or len(fpr[1]) != len(tpr[1]):
        return ""
    auroc = find_key(res, lambda k, v: k in ("auroc", "auc", "roc_auc") and isinstance(v, (int, float)))
    return image(plots.roc_curve(fpr[1], tpr[1], auroc[1] if auroc else None), "ROC curve")


def other_results_sections(rep: Report):
    for key, value in rep.run.results.items():
        if key in KNOWN_RESULTS:
            continue
        body = blocks(value) if isinstance(value, dict) else f"<p>{fmt(value)}</p>"
        yield rep.section(f"results-{key}", str(key).replace("_", " ").capitalize(), body)


def data_section(rep: Report) -> str:
    data = rep.run.data
    if not data:
        missing = rep.lack("No data summary (data.json)", "train --data SOURCE --out RUN")
        return rep.section("data", "Data", missing)
    splits = {k: v for k, v in data.items() if isinstance(v, dict)}
    counts = {k: {"images": v.get("n"), **(v.get("labels") or {})} for k, v in splits.items()}
    out = "<p>Images per split and label (no patient identifiers are stored or shown).</p>" + blocks(counts)
    meta = next((v["meta"] for v in splits.values() if v.get("meta")), None)
    if meta:
        out += "<h3>Source details</h3>" + blocks(meta)
    return rep.section("data", "Data", out)


def config_section(rep: Report) -> str:
    cfg = rep.run.config
    if cfg is None:
        return rep.section("config", "Configuration", note("No config.json in this run folder."))
    raw = esc(json.dumps(cfg, indent=2))
    out = blocks(cfg) + f"<details><summary>config.json</summary><pre>{raw}</pre></details>"
    return rep.section("config", "Configuration (resolved)", out)


def environment_section(rep: Report) -> str:
    env = rep.run.env
    if env is None:
        msg = "Environment not recorded: this run predates env.json, which <code>medivae train</code> writes."
        return rep.section("environment", "Environment", note(msg))
    return rep.section("environment", "Environment (at training time)", blocks(env))
