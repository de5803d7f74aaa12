"""The report's Anomaly section, from ``results.json["anomaly"]`` and the figures of ``medivae anomaly score``.

Tables and the map figures: detection (every model score beside the trivial baselines, the default chosen on
validation data marked, 95 % bootstrap intervals, and a plain sentence when a trivial baseline beats the
default), the leave-one-kind-out check of that choice, the anomaly maps (maps.png: input, reconstruction and
every map of a few of the most and least anomalous images), and pixel-level localisation of each map (AUROC,
AUPRC, best Dice; Baur et al. 2021) on the synthetic anomalies and the lesion phantoms, beside the model-free
blurred-residual baselines. Results of older versions (one kind of synthetic anomaly, baseline directions
picked on the scored labels) render with what they hold. No torch: this reads JSON and PNG bytes only.
"""

from __future__ import annotations

from pathlib import Path

from medivae.report.html import blocks, esc, fmt, image, note

MAP_GRID = "maps.png"  # the name ``medivae anomaly score`` gives the figure
LOCALISATION_SETS = (  # results key -> (title, where its maps and its baseline are)
    ("synthetic", "synthetic anomalies (foreign patches in validation normals)"),
    ("phantoms", "lesion phantoms (known masks)"),
)
BASELINES = {
    "self_blur": "baseline: |x − blur(x)| (an autoencoder that only blurs)",
    "mean_normal": "baseline: blur(|x − mean normal image|)",
}
PIXEL_COLUMNS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("best_dice", "best Dice"))


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _ci(interval) -> str:
    if isinstance(interval, list) and len(interval) == 2:
        return f"[{fmt(interval[0])}, {fmt(interval[1])}]"
    return "—"


def detection_table(res: dict) -> str:
    """Model scores, then the trivial baselines, on the scored split: AUROC and AUPRC with their 95 % bootstrap
    intervals, and the validation AUROC (normals vs synthetic anomalies) the default was chosen by."""
    metrics, ci = _dict(res.get("metrics")), _dict(res.get("ci95"))
    if not metrics:
        return ""
    protocol = _dict(res.get("protocol"))
    default, val_auroc = protocol.get("default"), _dict(protocol.get("val_auroc"))
    head = (
        "<tr><th>score</th><th>kind</th><th>AUROC</th><th>AUROC 95 % CI</th><th>AUPRC</th>"
        "<th>AUPRC 95 % CI</th><th>validation AUROC (selection)</th></tr>"
    )
    if protocol.get("val_auroc_by_kind"):
        head = head.replace("validation AUROC (selection)", "validation AUROC (selection: mean over kinds)")
    rows = []
    for name, m in metrics.items():
        m, c = _dict(m), _dict(ci.get(name))
        kind = "<b>★ default</b>" if name == default else "model"
        cells = [
            fmt(m.get("auroc")),
            _ci(c.get("auroc")),
            fmt(m.get("auprc")),
            _ci(c.get("auprc")),
            fmt(val_auroc.get(name)),
        ]
        score = f"<b>{esc(name)}</b>" if name == default else esc(name)
        rows.append(f"<tr><th>{score}</th><td>{kind}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    trivial = {n: _dict(b) for n, b in _dict(res.get("trivial_baselines")).items()}
    for name, b in trivial.items():
        c = _dict(b.get("ci95"))
        kind = f"trivial baseline ({esc(b.get('direction', '?'))} = anomalous)"
        cells = [fmt(b.get("auroc")), _ci(c.get("auroc")), fmt(b.get("auprc")), _ci(c.get("auprc")), "—"]
        rows.append(f"<tr><th>{esc(name)}</th><td>{kind}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    out = f"<table class='grid detection'>{head}{''.join(rows)}</table>"
    return out + _beaten(res, default) + _verdict(metrics, trivial, default, res.get("prevalence"))


def _beaten(res: dict, default) -> str:
    """A plain warning when a trivial baseline's AUROC is above the default score's on the scored split."""
    beaten = _dict(res.get("default_beaten_by"))
    chosen = _dict(_dict(res.get("metrics")).get(default)).get("auroc")
    if not beaten:
        return ""
    names = ", ".join(f"{esc(n)} (AUROC {fmt(a)})" for n, a in beaten.items())
    return note(f"<b>A trivial baseline with no model beats the default score on this split:</b> {names} against "
                f"{esc(default)} (AUROC {fmt(chosen)}). The default score tells less about these images than their "
                "PNG size or intensity does.", "problem")


def _verdict(metrics: dict, trivial: dict, default, prevalence) -> str:
    """One line: how far the default's AUROC is above the best trivial baseline's."""
    parts = []
    if prevalence is not None:
        parts.append(f"Prevalence {fmt(prevalence)} (the AUPRC of a random score).")
    aurocs = [b["auroc"] for b in trivial.values() if isinstance(b.get("auroc"), (int, float))]
    chosen = _dict(metrics.get(default)).get("auroc")
    if aurocs and isinstance(chosen, (int, float)):
        parts.append(
            f"Default score {esc(default)}: AUROC {fmt(chosen)}, {chosen - max(aurocs):+.3f} against the "
            f"best trivial baseline ({fmt(max(aurocs))})."
        )
    fixed = next((b.get("direction_fixed_on") for b in trivial.values() if b.get("direction_fixed_on")), None)
    parts.append("The default was chosen on validation normals and synthetic anomalies only; " + (
        f"each baseline's direction was fixed on {esc(fixed)}, not on these labels." if fixed else
        "the baselines' direction is the better one on these very labels, which favours them."))
    return f"<p class='muted'>{' '.join(parts)}</p>"


def kind_table(res: dict) -> str:
    """Leave-one-kind-out: for each kind of synthetic anomaly, the default the rule chooses without it, that
    score's validation AUROC on the kind left out, and the best trivial baseline's there."""
    loko = {k: _dict(v) for k, v in _dict(_dict(res.get("protocol")).get("leave_one_kind_out")).items()}
    if not loko:
        return ""
    head = ("<tr><th>kind left out</th><th>default chosen without it</th><th>its AUROC on the kind</th>"
            "<th>best trivial baseline</th><th>its AUROC</th><th>margin</th></tr>")
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(e.get('default', '?'))}</td><td>{fmt(e.get('auroc'))}</td>"
            f"<td>{esc(e.get('best_baseline', '?'))} ({esc(e.get('baseline_direction', '?'))} = anomalous)</td>"
            f"<td>{fmt(e.get('baseline_auroc'))}</td><td>{fmt(e.get('margin'))}</td></tr>" for k, e in loko.items()]
    return (f"<table class='grid kinds'>{head}{''.join(rows)}</table>"
            + note("Validation normals against synthetic anomalies of each kind, on the half of the validation "
                   "normals no hyperparameter was tuned on; each baseline's direction fixed on the other kinds. A "
                   "rule that holds on a kind it never saw is likelier to hold on real anomalies.", "muted"))


def shift_table(res: dict) -> str:
    """The classifier two-sample test of the validation, calibration and scored normals against the training
    normals, and of the scored normals against the calibration normals (its last row, when there is one)."""
    ns = _dict(res.get("normal_shift"))
    scored = f"{ns.get('scored_split', 'scored')} normals"
    names = {"val": "validation normals", "calibration": "calibration normals (the threshold's)", "scored": scored,
             "scored_vs_calibration": f"{scored} against the calibration normals"}
    rows, n_reference = [], None
    for key, title in names.items():
        r = _dict(ns.get(key))
        if r:
            if key != "scored_vs_calibration":
                n_reference = r.get("n_reference")
            verdict = "<b>differ</b>" if r.get("differ") else "alike (no evidence of a difference)"
            rows.append(f"<tr><th>{esc(title)}</th><td>{fmt(r.get('n_other'))}</td><td>{fmt(r.get('auroc'))}</td>"
                        f"<td>{_ci(r.get('ci95'))}</td><td>{fmt(r.get('p_value'))}</td><td>{verdict}</td></tr>")
    if not rows:
        return ""
    head = "<tr><th>normals</th><th>images</th><th>AUROC</th><th>95 % CI</th><th>p-value</th><th>verdict</th></tr>"
    last = " (the last row: against the calibration normals)" if ns.get("scored_vs_calibration") else ""
    text = (f"Against {fmt(n_reference)} training normals{last}; {esc(ns.get('method', ''))}. "
            "A model fitted on the training normals calls anything unlike them anomalous: where the scored "
            "normals differ, the detection AUROCs above also measure that difference, and the conformal "
            "threshold's false-positive bound holds only for new normals like those it was set on "
            "(<code>--calibration</code> sets it on normals from where the scored images come; "
            "<code>medivae anomaly adapt</code> trains the model on some of them and sets it on the rest).")
    return f"<table class='grid shift'>{head}{''.join(rows)}</table>" + note(text, "muted")


def adaptation_note(res: dict) -> str:
    """One paragraph for a run written by ``medivae anomaly adapt``: what it was adapted on, and where its
    threshold was set; "" for any other run."""
    a = _dict(res.get("adaptation"))
    if not a:
        return ""
    on = _dict(_dict(res.get("threshold")).get("calibrated_on"))
    where = (f"on {fmt(on.get('normals'))} site normals held out of the adaptation" if on.get("held_out_at_adaptation")
             else f"on {fmt(on.get('normals'))} normals of {esc(on.get('source', ''))}" if on
             else "on the validation normals of the run it came from")
    return note(f"This run was adapted to the scored site (<code>medivae anomaly adapt</code>): "
                f"{fmt(a.get('epochs'))} more epochs of {esc(a.get('from_run', '?'))} on its training normals plus "
                f"{fmt(a.get('n_adapt'))} normals of {esc(a.get('normals', '?'))}. The conformal threshold was set "
                f"{where}; no site normal is scored.", "muted")


def _pixel_rows(loc: dict) -> dict[str, tuple[dict, dict]]:
    """{set: (map name -> metrics, baseline name -> metrics)} for the sets the results have."""
    out = {}
    for key, _ in LOCALISATION_SETS:
        block = _dict(loc.get(key))
        if key == "synthetic":
            maps, base = block, _dict(loc.get("synthetic_baseline"))
        else:
            maps, base = _dict(block.get("maps")), _dict(block.get("baseline"))
        if maps:
            out[key] = (maps, base)
    return out


def localisation_table(res: dict) -> str:
    """Pixel AUROC / AUPRC / best Dice per map, one column group per set, the blurred-residual baselines
    (their sigma chosen on the same masks) as the last rows."""
    sets = _pixel_rows(_dict(res.get("localisation")))
    if not sets:
        return ""
    titles = dict(LOCALISATION_SETS)
    kinds = _dict(_dict(res.get("protocol")).get("synthetic")).get("kinds")
    if isinstance(kinds, list) and kinds:
        titles["synthetic"] = f"synthetic anomalies in validation normals ({', '.join(map(str, kinds))})"
    span = len(PIXEL_COLUMNS)
    head = (
        "<tr><th rowspan='2'>map</th>" + "".join(f"<th colspan='{span}'>{esc(titles[k])}</th>" for k in sets) + "</tr>"
    )
    head += "<tr>" + "".join(f"<th>{t}</th>" for _ in sets for _, t in PIXEL_COLUMNS) + "</tr>"
    names = list(dict.fromkeys(n for maps, _ in sets.values() for n in maps))
    rows = [_pixel_row(esc(n), [_dict(maps.get(n)) for maps, _ in sets.values()]) for n in names]
    for key, text in BASELINES.items():
        found = [_dict(base.get(key)) for _, base in sets.values()]
        if any(found):
            sigma = ", ".join(f"{k} {fmt(f['sigma'])}" for k, f in zip(sets, found, strict=True) if "sigma" in f)
            rows.append(_pixel_row(f"<i>{esc(text)}</i>" + (f" <i>(σ: {esc(sigma)})</i>" if sigma else ""), found))
    return f"<table class='grid localisation'>{head}{''.join(rows)}</table>"


def _pixel_row(name: str, per_set: list[dict]) -> str:
    cells = "".join(f"<td>{fmt(m.get(k))}</td>" for m in per_set for k, _ in PIXEL_COLUMNS)
    return f"<tr><th>{name}</th>{cells}</tr>"


def map_figures(rep, res: dict, figs: list[Path]) -> tuple[str, list[Path]]:
    """(HTML of the anomaly-map grid, the figures left for the rest of the section)."""
    name = Path(str(_dict(res.get("files")).get("map_grid", MAP_GRID))).name
    grid = [p for p in figs if p.name == name]
    if not grid:
        return "", figs
    rep.used.update(grid)
    names = res.get("map_names")
    which = f" ({', '.join(map(str, names))})" if isinstance(names, list) and names else ""
    default = _dict(res.get("protocol")).get("default", "the default score")
    caption = (
        f"Rows: the most anomalous scored images by {esc(default)} (top), then the most normal. Columns: "
        f"input, reconstruction, then each anomaly map{esc(which)} over the input, one colour scale per "
        "column. Every map of every scored image is in maps.npz (one array per map name)."
    )
    html = "".join(image((rep.run.run_dir / p).read_bytes(), "anomaly maps", caption) for p in grid)
    return html, [p for p in figs if p not in grid]


def section_body(rep, res, figs: list[Path], roc: str = "") -> str:
    """The Anomaly section: detection table, map figures, localisation table, other figures, all results."""
    if not isinstance(res, dict):
        return roc + rep.figures(figs) + ("" if res is None else f"<p>{fmt(res)}</p>")
    out = ""
    if table := detection_table(res):
        out += "<h3>Detection: model scores beside trivial baselines</h3>" + table
    if table := kind_table(res):
        out += "<h3>Would the default have been chosen well for a kind of anomaly it never saw?</h3>" + table
    out += adaptation_note(res)
    if table := shift_table(res):
        out += "<h3>Are the scored normals like the training normals?</h3>" + table
    maps, figs = map_figures(rep, res, figs)
    if maps:
        out += "<h3>Anomaly maps</h3>" + maps
    if table := localisation_table(res):
        out += (
            "<h3>Localisation: pixel-level AUROC, AUPRC and best Dice per map</h3>"
            + table
            + note(
                "All pixels of all images pooled (Baur et al. 2021); best Dice over one global threshold. "
                "A map that does not beat the blurred-residual baselines localises nothing a model-free "
                "filter would not.",
                "muted",
            )
        )
    out += roc + rep.figures(figs)
    return out + ("<h3>All anomaly results</h3>" if out else "") + blocks(res)
