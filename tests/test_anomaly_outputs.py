"""Localisation in the user's outputs: every map of the scored split in maps.npz, the map figure, and
the report's Anomaly section (detection beside trivial baselines, the map figure, pixel localisation)."""

from __future__ import annotations

import base64
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from medivae.cli import main
from medivae.report import build_report
from medivae.report.anomaly import detection_table, localisation_table
from medivae.workflows.anomaly.outputs import MAX_GRID_ROWS, panel
from test_anomaly import TINY

N_MAPS = 4


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny run fitted on normal phantoms and scored through the CLI: the plumbing, not the quality."""
    run = tmp_path_factory.mktemp("outputs") / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--seed", "7", *TINY]) == 0
    argv = ["anomaly", "score", str(run), "--iwae-samples", "2", "--n-maps", str(N_MAPS), "--device", "cpu",
            "--fpr", "0.2", "--bootstrap", "20"]  # fmt: skip
    assert main(argv) == 0
    return run


def _expected_maps(run) -> set[str]:
    from medivae.models.family import has
    from medivae.runfolder.run import load_run

    model = load_run(run, device="cpu").model
    return (
        {"residual", "ssim", "ssim_z"}
        | ({"gradient", "restoration"} if has(model, "likelihood") else set())
        | ({"vq_healing"} if has(model, "heal") else set())
    )


def test_maps_npz_holds_every_map_of_the_family_for_every_scored_image(scored):
    r = json.loads((scored / "results.json").read_text())["anomaly"]
    z = np.load(scored / "anomaly" / "maps.npz")
    assert set(r["map_names"]) == _expected_maps(scored) == {"residual", "ssim", "ssim_z", "gradient", "restoration"}
    assert set(z.files) == {"maps", *r["map_names"]}  # "maps": the key readers had before, kept
    for name in z.files:
        m = z[name]
        assert m.shape == (r["n_scored"], 32, 32) and m.dtype == np.float16, name
        assert np.isfinite(m).all() and (m >= 0).all() and m.std() > 0, name
    # the old key is the residual map, as results.json["anomaly"]["map"] says
    assert r["map"] == "residual"
    np.testing.assert_array_equal(z["maps"], z["residual"])  # the same array, stored under both names
    # the restoration map is the one whose mean was reported as the score (reused, not rerun with other settings):
    # maps.npz rounds each value of the non-negative map to float16 (within 2^-11 of it, or 2^-25 below float16's
    # normal range) and scores.csv keeps 6 significant digits (5e-6)
    rows = list(csv.DictReader((scored / "anomaly" / "scores.csv").open()))
    restoration = np.array([float(row["restoration"]) for row in rows])
    rtol = np.finfo(np.float16).eps / 2 + 5e-6
    np.testing.assert_allclose(z["restoration"].astype(np.float64).mean((1, 2)), restoration, rtol=rtol, atol=2**-25)
    # synthetic anomalies: each map against the blurred-residual baselines on the same masks
    loc = r["localisation"]
    assert set(loc["synthetic"]) == set(r["map_names"]) and set(loc["phantoms"]["maps"]) == set(r["map_names"])
    assert set(loc["synthetic_baseline"]) == {"self_blur", "mean_normal"}
    assert all(0 <= b["auprc"] <= 1 and b["sigma"] > 0 for b in loc["synthetic_baseline"].values())


def test_panel_takes_the_most_then_the_least_anomalous():
    s = np.array([0.5, 3.0, -1.0, 2.0, 0.0, 1.0])
    np.testing.assert_array_equal(panel(s, 3), [1, 3, 2])  # two highest, most anomalous first; then the lowest
    np.testing.assert_array_equal(panel(s, 4), [1, 3, 2, 4])
    assert len(panel(s, 0)) == 0


def test_map_figure_has_a_row_per_image_and_a_column_per_map(scored):
    r = json.loads((scored / "results.json").read_text())["anomaly"]
    path = scored / "anomaly" / "maps.png"
    assert r["files"]["map_grid"] == str(path)
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    rows, cols = min(N_MAPS, MAX_GRID_ROWS), 2 + len(r["map_names"])
    # plot_map_grid's figure size at dpi 100: (1.35 cols + 0.9) x (1.4 rows + 0.3) inches
    assert img.shape[:2] == (round(100 * (1.4 * rows + 0.3)), round(100 * (1.35 * cols + 0.9)))
    # not blank: the overlays are coloured (inferno) where the inputs are gray
    saturation = img.max(2) - img.min(2)
    assert (saturation > 60).mean() > 0.05 and img.std() > 20


def _embedded(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"base64,([A-Za-z0-9+/=]+)'", html)]


def test_report_shows_detection_maps_and_localisation(scored):
    r = json.loads((scored / "results.json").read_text())["anomaly"]
    html = build_report(scored)
    section = html[html.index("<section id='anomaly'>") :]
    section = section[: section.index("</section>")]
    # the map figure, embedded once, byte for byte
    grid = (scored / "anomaly" / "maps.png").read_bytes()
    assert _embedded(section).count(grid) == 1 and "anomaly maps" in section
    # localisation: one row per map and the two blurred-residual baselines, for both sets
    loc = section[section.index("<table class='grid localisation'>") :]
    loc = loc[: loc.index("</table>")]
    assert "synthetic anomalies" in loc and "lesion phantoms" in loc
    for name in r["map_names"]:
        m, p = r["localisation"]["synthetic"][name], r["localisation"]["phantoms"]["maps"][name]
        assert f"<tr><th>{name}</th><td>{m['auroc']:.4g}</td><td>{m['auprc']:.4g}</td>" in loc, name
        assert f"<td>{p['auprc']:.4g}</td><td>{p['best_dice']:.4g}</td></tr>" in loc, name
    assert loc.count("baseline:") == 2
    # the normals check: the calibration and the scored normals against the training normals
    shift = section[section.index("<table class='grid shift'>") :]
    shift = shift[: shift.index("</table>")]
    for key, title in (("val", "validation normals"), ("scored", "test normals")):
        assert f"<tr><th>{title}</th><td>{r['normal_shift'][key]['n_other']}</td>" in shift, key
    # detection: the default marked, the trivial baselines beside it, with their bootstrap intervals
    det = section[section.index("<table class='grid detection'>") :]
    det = det[: det.index("</table>")]
    default = r["protocol"]["default"]
    assert det.count("★ default") == 1 and f"<th><b>{default}</b></th><td><b>★ default</b>" in det
    lo, hi = r["ci95"][default]["auroc"]
    assert f"[{lo:.4g}, {hi:.4g}]" in det
    for name, b in r["trivial_baselines"].items():
        lo, hi = b["ci95"]["auroc"]
        assert f"<tr><th>{name}</th><td>trivial baseline ({b['direction']} = anomalous)</td>" in det
        assert f"<td>{b['auroc']:.4g}</td><td>[{lo:.4g}, {hi:.4g}]</td>" in det


def test_report_tables_from_results_alone():
    """No run needed: the tables read results.json values, and say nothing where there is nothing."""
    res = {
        "metrics": {"ssim": {"auroc": 0.61, "auprc": 0.42}, "restoration": {"auroc": 0.93, "auprc": 0.8}},
        "ci95": {"restoration": {"auroc": [0.9, 0.95], "auprc": [0.7, 0.85]}},
        "protocol": {"default": "restoration", "val_auroc": {"ssim": 0.7, "restoration": 0.88}},
        "trivial_baselines": {"png_size": {"direction": "lower", "auroc": 0.8, "auprc": 0.6, "ci95": None}},
        "localisation": {"synthetic": {"residual": {"auroc": 0.77, "auprc": 0.31, "best_dice": 0.29}},
                         "synthetic_baseline": {"self_blur": {"auroc": 0.6, "auprc": 0.12, "best_dice": 0.2,
                                                              "sigma": 2.0}}},
    }  # fmt: skip
    det = detection_table(res)
    assert "<th><b>restoration</b></th><td><b>★ default</b></td><td>0.93</td><td>[0.9, 0.95]</td>" in det
    assert "<td>0.61</td><td>—</td>" in det  # no interval recorded: a dash, not a made-up one
    assert "+0.130 against the best trivial baseline (0.8)" in det
    loc = localisation_table(res)
    assert "<tr><th>residual</th><td>0.77</td><td>0.31</td><td>0.29</td></tr>" in loc
    assert "σ: synthetic 2" in loc and "lesion phantoms" not in loc  # no phantoms in these results
    assert detection_table({}) == "" and localisation_table({"localisation": {}}) == ""
    assert "beats the default score" not in det and "on these very labels" in det  # an older run's results


def test_report_says_when_a_baseline_beats_the_default_and_shows_the_leave_one_kind_out_check():
    from medivae.report.anomaly import kind_table

    res = {
        "metrics": {"ssim": {"auroc": 0.46, "auprc": 0.4}},
        "protocol": {"default": "ssim", "val_auroc": {"ssim": 0.59}, "val_auroc_by_kind": {"blob": {"ssim": 0.59}},
                     "synthetic": {"kinds": ["foreign_patch", "blob"]},
                     "leave_one_kind_out": {"blob": {"default": "ssim", "auroc": 0.59, "best_baseline": "png_size",
                                                     "baseline_direction": "lower", "baseline_auroc": 0.62,
                                                     "margin": -0.03}}},
        "trivial_baselines": {"png_size": {"direction": "lower", "direction_fixed_on": "labelled validation images",
                                           "auroc": 0.65, "auprc": 0.6, "ci95": None}},
        "default_beaten_by": {"png_size": 0.65},
        "localisation": {"synthetic": {"residual": {"auroc": 0.7, "auprc": 0.2, "best_dice": 0.3}}},
    }  # fmt: skip
    det = detection_table(res)
    assert "beats the default score on this split:</b> png_size (AUROC 0.65) against ssim (AUROC 0.46)" in det
    assert "fixed on labelled validation images, not on these labels" in det and "mean over kinds" in det
    kinds = kind_table(res)
    assert ("<tr><th>blob</th><td>ssim</td><td>0.59</td><td>png_size (lower = anomalous)</td><td>0.62</td>"
            "<td>-0.03</td></tr>") in kinds
    assert "foreign_patch, blob" in localisation_table(res) and kind_table({}) == ""


def test_report_shift_table_names_each_set_and_its_verdict():
    from medivae.report.anomaly import shift_table

    ns = {"scored_split": "test", "method": "classifier two-sample test",
          "val": {"auroc": 0.49, "ci95": [0.44, 0.54], "p_value": 0.6, "differ": False, "n_reference": 1214,
                  "n_other": 135},
          "scored": {"auroc": 0.78, "ci95": [0.75, 0.81], "p_value": 1e-40, "differ": True, "n_reference": 1214,
                     "n_other": 234}}  # fmt: skip
    t = shift_table({"normal_shift": ns})
    assert "<tr><th>validation normals</th><td>135</td><td>0.49</td><td>[0.44, 0.54]</td>" in t
    assert "<tr><th>test normals</th><td>234</td><td>0.78</td><td>[0.75, 0.81]</td>" in t
    assert t.count("<b>differ</b>") == 1 and "Against 1214 training normals" in t
    assert shift_table({}) == "" and shift_table({"normal_shift": {"scored_split": "test"}}) == ""
    with_cal = shift_table({"normal_shift": {**ns, "scored_vs_calibration": {
        "auroc": 0.52, "ci95": [0.4, 0.6], "p_value": 0.4, "differ": False, "n_reference": 117, "n_other": 117}}})
    assert "<tr><th>test normals against the calibration normals</th><td>117</td><td>0.52</td>" in with_cal
    assert "Against 1214 training normals (the last row: against the calibration normals)" in with_cal


def test_gradient_maps_are_computed_once_and_are_both_the_main_and_the_named_map(scored, tmp_path, monkeypatch):
    from medivae.evaluation.anomaly import maps
    from medivae.workflows.anomaly import protocol

    real = maps.gradient_maps
    seen: list[int] = []

    def counting(p):
        seen.append(len(p))
        return real(p)

    monkeypatch.setattr(protocol, "gradient_maps", counting)
    images = {}
    for flag in ([], ["--gradient-maps"]):
        seen.clear()
        out = tmp_path / ("grad" if flag else "plain")
        argv = ["anomaly", "score", str(scored), *flag, "--iwae-samples", "2", "--n-maps", "2", "--device", "cpu",
                "--fpr", "0.2", "--bootstrap", "0", "--out", str(out)]
        assert main(argv) == 0
        images[bool(flag)] = sum(seen)
    # the named "gradient" map exists either way; with --gradient-maps it is also the main map, made once
    assert images[True] == images[False] > 0
    z = np.load(tmp_path / "grad" / "maps.npz")
    np.testing.assert_array_equal(z["maps"], z["gradient"])


def test_a_trivial_baseline_that_beats_the_default_is_said_so(tmp_path, capsys):
    """Normal phantoms against blurred phantoms: a VAE reconstructs a blurred image well, so its scores call
    them normal, while every blurred image is a smaller PNG. The summary line, results.json and the report say
    that a trivial baseline beats the default; its direction was fixed on the source's labelled validation
    split."""
    from scipy.ndimage import gaussian_filter

    from medivae.data.phantoms import make_phantoms

    from tiny import png_folder

    run = tmp_path / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--seed", "7", *TINY]) == 0
    normals = make_phantoms(60, 32, seed=31, lesion_fraction=0.0).images
    blurred = np.round(gaussian_filter(normals.astype(np.float64), sigma=(0, 0, 2, 2))).astype(np.uint8)
    source = png_folder(tmp_path / "site", normals, "normal")
    png_folder(source, blurred, "blurred")
    capsys.readouterr()
    argv = ["anomaly", "score", str(run), "--data", str(source), "--out", str(tmp_path / "a"), "--iwae-samples", "2",
            "--n-maps", "0", "--fpr", "0.2", "--bootstrap", "0", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    r = json.loads((run / "results.json").read_text())["anomaly"]
    default = r["protocol"]["default"]
    png = r["trivial_baselines"]["png_size"]
    assert png["direction"] == "lower" and png["direction_fixed_on"] == "labelled validation images"
    assert png["auroc"] == 1.0 > r["metrics"][default]["auroc"]
    assert r["default_beaten_by"] == {n: b["auroc"] for n, b in r["trivial_baselines"].items()
                                      if b["auroc"] > r["metrics"][default]["auroc"]}
    assert f"the default score {default}" in first and "png_size (AUROC 1.000)" in first
    html = build_report(run)
    assert "A trivial baseline with no model beats the default score on this split" in html
    assert "png_size (AUROC 1)" in html and "fixed on labelled validation images" in html


def test_a_score_stopped_while_writing_leaves_the_earlier_files_whole(scored, tmp_path, monkeypatch):
    """Scoring again into RUN/anomaly, stopped (Ctrl-C) after scores.csv and maps.npz are written: the earlier
    files are there byte for byte, results.json["anomaly"] is the earlier one, and no staging folder is left."""
    from medivae.workflows.anomaly import outputs

    out = scored / "anomaly"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    results = (scored / "results.json").read_bytes()

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "plot_overlays", stopped)  # after scores.csv and maps.npz
    argv = ["anomaly", "score", str(scored), "--iwae-samples", "2", "--n-maps", "3", "--device", "cpu",
            "--fpr", "0.1", "--bootstrap", "0"]
    assert main(argv) == 130
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert (scored / "results.json").read_bytes() == results
    assert not [p for p in scored.iterdir() if p.name.startswith(".anomaly")]
