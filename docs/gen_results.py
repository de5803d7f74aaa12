"""Every benchmark number in the documentation, rendered from ``benchmarks/results/*.json``.

The pages under ``docs/`` are Jinja templates: ``docs/hooks.py`` renders each one through :func:`render`
when ``mkdocs build`` reads it. A page reads a result file as ``R.<name>`` (the parsed JSON of
``benchmarks/results/<name>.json``), formats a number with a filter (``{{ R.vae_gan.summary.vae_gan.fd | pm(1) }}``)
and renders a whole table with ``T.<table>(...)``; a missing file or key fails the build. No number is typed
into a page by hand, so a result file that changes changes the pages at the next build.

README.md is not part of the site; its families table is written between two marker comments by
``python docs/gen_results.py --readme`` (``--check`` exits 1 when it is stale; a test runs the check).

    python docs/gen_results.py docs/results/samplers.md     # print one page rendered
    python docs/gen_results.py --readme                      # refresh README.md's families table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import jinja2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ROOT / "benchmarks"
README_START, README_END = "<!-- families:start (docs/gen_results.py) -->", "<!-- families:end -->"


class Results:
    """``R.name`` / ``R["name"]``: the parsed ``<folder>/name.json``, read once; ``used`` names every file read."""

    def __init__(self, folder: Path = RESULTS):
        self.folder, self._cache, self.used = Path(folder), {}, set()

    def __getitem__(self, name: str) -> dict:
        if name not in self._cache:
            path = self.folder / f"{name}.json"
            if not path.exists():
                known = ", ".join(sorted(p.stem for p in self.folder.glob("*.json")))
                raise KeyError(f"no results file {path} (known: {known})")
            self._cache[name] = json.loads(path.read_text())
        self.used.add(name)
        return self._cache[name]

    def __getattr__(self, name: str) -> dict:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]


# --- number formats (Jinja filters) --------------------------------------------------------------------
def f(x: float, digits: int = 3) -> str:
    """Fixed decimals: ``0.8771 | f(3)`` -> 0.877."""
    return f"{x:,.{digits}f}"


def g(x: float, sig: int = 4) -> str:
    """Significant digits with thousands separators: 2011.43 -> 2,011."""
    return f"{x:,.{sig}g}" if abs(x) < 10 ** sig else f"{x:,.0f}"


def ci(pair, digits: int = 3, scale: float = 1.0) -> str:
    """An interval ``[lo, hi]``."""
    lo, hi = pair
    return f"[{lo * scale:,.{digits}f}, {hi * scale:,.{digits}f}]"


def pm(pair, digits: int = 2) -> str:
    """``[mean, sd]`` -> "mean ± sd"."""
    return f"{pair[0]:,.{digits}f} ± {pair[1]:,.{digits}f}"


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage: 0.181 -> 18.1 %."""
    return f"{100 * x:.{digits}f} %"


def span(values, digits: int = 3, scale: float = 1.0) -> str:
    """"mean (min–max)" of a list."""
    v = [x * scale for x in values]
    return f"{statistics.fmean(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def short(commit: str | None) -> str:
    """A commit as 7 hex digits; one recorded with uncommitted changes (``SHA+dirty.HASH``) says so."""
    if not commit:
        return "not recorded"
    head, _, dirty = commit.partition("+")
    return f"`{head[:7]}`" + (f" with uncommitted changes (`{dirty}`)" if dirty else "")


FILTERS = {"f": f, "g": g, "ci": ci, "pm": pm, "pct": pct, "span": span, "short": short}


# --- tables ------------------------------------------------------------------------------------------
def _bench(name: str):
    """A benchmark script as a module (its ``markdown`` renderers); benchmarks/ holds its ``common``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module = sys.modules.get(f"medivae_bench_{name}")
    if module is None:
        spec = importlib.util.spec_from_file_location(f"medivae_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


PAGES = {  # result file -> (results page, its title), for the index of every result file
    "compare_cxr": ("families.md", "Families side by side"), "vae_gan": ("families.md#vae-gan", "VAE-GAN"),
    "vq_vae": ("families.md#vq-vae", "VQ-VAE"), "vq_vae_30": ("families.md#vq-vae", "VQ-VAE"),
    "hvae_cxr64": ("families.md#hierarchical-vae", "Hierarchical VAE"),
    "hvae_pneumonia32": ("families.md#hierarchical-vae", "Hierarchical VAE"),
    "hvae_pneumonia32cos": ("families.md#hierarchical-vae", "Hierarchical VAE"),
    "samplers": ("samplers.md", "Latent samplers"), "kl_ablation": ("kl_ablation.md", "Posterior collapse"),
    "samplers_diffusion_pneu": ("samplers.md#a-diffusion-sampler", "Latent samplers"),
    "anomaly_protocol_kinds": ("anomaly.md#the-default-across-kinds-of-anomaly", "Anomaly detection"),
    "anomaly_protocol_ssim_z": ("anomaly.md#the-default-chosen-without-test-labels", "Anomaly detection"),
    "anomaly_protocol": ("anomaly.md#the-first-version", "Anomaly detection"),
    "anomaly_protocol_vae_gan": ("anomaly.md#other-families", "Anomaly detection"),
    "anomaly_protocol_vae_gan_ssim_z": ("anomaly.md#other-families", "Anomaly detection"),
    "anomaly_protocol_hvae": ("anomaly.md#other-families", "Anomaly detection"),
    "anomaly_protocol_vq": ("anomaly.md#other-families", "Anomaly detection"),
    "anomaly_ensemble": ("anomaly.md#the-ensemble-over-seeds-and-families", "Anomaly detection"),
    "anomaly_augment": ("anomaly.md#training-time-augmentation", "Anomaly detection"),
    "site_calibration": ("anomaly.md#a-threshold-for-the-scored-site", "Anomaly detection"),
    "site_adaptation": ("anomaly.md#adapting-the-model-to-the-scored-site", "Anomaly detection"),
    "site_adaptation_v1": ("anomaly.md#adapting-the-model-to-the-scored-site", "Anomaly detection"),
    "site_adaptation_vae_gan": ("anomaly.md#adapting-the-model-to-the-scored-site", "Anomaly detection"),
    "anomaly_phantoms": ("localisation.md", "Anomaly maps"), "anomaly_phantoms_vq": ("localisation.md", "Anomaly maps"),
    "anomaly_phantoms_vae_gan": ("localisation.md", "Anomaly maps"),
    "anomaly_phantoms_hvae": ("localisation.md", "Anomaly maps"),
    "applications": ("applications.md", "Applications"), "train": ("speed.md", "Speed"),
    "train_short": ("speed.md#short-runs", "Speed"), "speed_ablation": ("speed.md#what-each-setting-is-worth", "Speed"),
    "data": ("../data/index.md#what-every-source-shares", "Data sources"),
    "defaults": ("defaults.md", "Defaults against conv_vae"),
    "bn_gap": ("defaults.md#why-the-vampprior-does-not-win-at-ten-epochs", "Defaults against conv_vae"),
    "vamp_trials": ("defaults.md#why-the-vampprior-does-not-win-at-ten-epochs", "Defaults against conv_vae"),
    "generation": ("generation.md", "Samplers and generation"),
    "ldm_epochs_val": ("generation.md#what-the-first-runs-say", "Samplers and generation"),
    "ldm_ceiling": ("generation.md#where-ldm-loses-autoencoder-or-prior", "Samplers and generation"),
    "ldm_peer": ("generation.md#against-monais-latent-diffusion", "Samplers and generation"),
    "blur_metric": ("../guide/sample-metrics.md#does-it-see-blur", "Sample metrics"),
}

SEED_METRICS = (  # (key in a vae_gan_compare.py summary, label, digits)
    ("psnr_db", "PSNR (dB) of test reconstructions", 2), ("ssim", "SSIM", 3),
    ("fd", "FD-ae of samples (shared extractor; lower is better)", 1), ("precision", "precision", 2),
    ("recall", "recall", 2), ("hf_power_ratio", "high-frequency power of samples vs real", 2),
    ("sharpness_ratio", "high-frequency share of samples vs real", 2),
)


class Tables:
    """``T.<name>(...)``: whole Markdown tables from the result files, most through the benchmark scripts'
    own renderers (the ones their ``--markdown`` flag prints)."""

    def __init__(self, results: Results):
        self.R = results

    def compare(self, name: str = "compare_cxr") -> str:
        from medivae.report.compare import to_markdown

        return to_markdown(self.R[name]["compare"])

    def samplers(self, name: str = "samplers") -> str:
        return _bench("samplers_compare").markdown(self.R[name])

    def blur(self, name: str = "blur_metric") -> str:
        return _bench("blur_metric").markdown(self.R[name])

    def anomaly(self, name: str) -> str:
        return _bench("anomaly_protocol").markdown(self.R[name])

    def ensemble(self) -> str:
        return _bench("anomaly_protocol").ensemble_markdown(self.R.anomaly_ensemble)

    def applications(self) -> str:
        return _bench("applications").markdown(self.R.applications)

    def kl_ablation(self) -> str:
        return _bench("kl_ablation").table(self.R.kl_ablation["runs"])

    def defaults(self, split: str = "test") -> str:
        """Each family's defaults against conv_vae on its claim (benchmarks/defaults.py)."""
        return _bench("defaults").table(self.R.defaults, split)

    def defaults_runs(self, split: str = "test") -> str:
        """Every record of one split: data, arm, seed, the claim metrics, CPU seconds, load, commit."""
        return _bench("defaults").runs_table(self.R.defaults, split)

    def generation(self) -> str:
        """Every generator and the real rows per data set: mean over seeds [95 % interval] (generation.py)."""
        return _bench("generation").table(self.R.generation)

    def ldm_ceiling(self) -> str:
        """ldm_ceiling.py: the floor, reconstructions and samples of ldm runs against training images."""
        return _bench("ldm_ceiling").table(self.R.ldm_ceiling)

    def ldm_peer(self) -> str:
        """ldm_peer.py: medivae's ldm against MONAI's 2D latent diffusion at equal training seconds."""
        return _bench("ldm_peer").markdown(self.R.ldm_peer)

    def generation_grids(self) -> str:
        """The sample grids the generation records name, beside the real test images'."""
        return _bench("generation").grids(self.R.generation)

    def seeds(self, *columns: str) -> str:
        """Families over seeds (vae_gan_compare.py files): mean ± sd per metric; columns "file:family"."""
        cols = [c.split(":") for c in columns]
        seeds = [len(self.R[n]["runs"][fam]) for n, fam in cols]
        header = ["metric"] + [f"`{fam}`, {self.R[n]['epochs']} epochs ({k} seed{'s' * (k > 1)})"
                               for (n, fam), k in zip(cols, seeds, strict=True)]
        rows = []
        for key, label, digits in SEED_METRICS:
            cells = [self.R[n]["summary"][fam].get(key) for n, fam in cols]
            rows.append([label] + ["–" if not c else pm(c, digits) if k > 1 else f"{c[0]:.{digits}f}"
                                   for c, k in zip(cells, seeds, strict=True)])
        rows.append(["seeds trained without intervention"] + [
            f"{self.R[n]['summary'][fam]['seeds_without_intervention']} of {len(self.R[n]['runs'][fam])}"
            for n, fam in cols])
        return _table(header, rows) + "\n\nMean ± standard deviation over seeds."

    def seed_runs(self, name: str, family: str) -> str:
        """One row per seed of a vae_gan_compare.py file, with the PSNR interval when it was recorded."""
        rows = []
        for r in self.R[name]["runs"][family]:
            psnr = f"{r['psnr_db']:.2f}" + (f" {ci(r['psnr_db_ci95'], 2)}" if r.get("psnr_db_ci95") else "")
            rows.append([r["seed"], psnr, f"{r['ssim']:.3f}", f"{r['fd']:.1f}", f"{r['precision']:.3f}",
                         f"{r['recall']:.3f}", f"{r['images_per_s']:.0f}"])
        return _table(["seed", "PSNR (dB) [95 % CI]", "SSIM", "FD-ae", "precision", "recall",
                       "training images/s"], rows)

    def hvae(self, name: str) -> str:
        """hvae_compare.py: one row per model, then the real-vs-real floor."""
        runs = self.R[name]["runs"]
        rows = []
        for model, r in runs.items():
            units = r["active_units"] if isinstance(r["active_units"], str) else ", ".join(r["active_units"])
            rows.append([f"`{model}`", r["epochs"], f"{r['train_seconds']:,.0f}", f"{r['train_images_per_s']:,.0f}",
                         f"{r['neg_iwae_bpd']:.3f}", f"{r['neg_elbo_bpd']:.3f}", f"{r['psnr_db']:.2f}",
                         f"{r['fd']:.1f}", f"{r['precision']:.3f} / {r['recall']:.3f}", units])
        r = next(iter(runs.values()))
        fl = r["floor"]
        header = ["model", "epochs", "train s", "train img/s", f"−IWAE bits/dim (K={r['iwae_k']})",
                  "−ELBO bits/dim", "PSNR (dB)", r["fd_name"], "precision / recall", "active units"]
        return (_table(header, rows) + f"\n\n{r['n_images']} test images. Real-vs-real floor: {r['fd_name']} "
                f"{fl['fd']:.2f}, precision / recall {fl['precision']:.3f} / {fl['recall']:.3f}. Active units of the "
                "hierarchy are per latent group, top to bottom.")

    def augment(self) -> str:
        """anomaly_augment.json: each --augment setting's validation and test AUROCs of the default score."""
        rows = []
        for spec, v in self.R.anomaly_augment["variants"].items():
            rows.append([f"`{spec}`", f"{v['val_synthetic_auroc_ssim']:.3f}", f"{v['val_labelled_auroc_ssim']:.3f}",
                         f"{v['test_auroc_ssim']:.3f} {ci(v['test_ci95_ssim']['auroc'])}",
                         f"{v['test_trivial_baselines']['png_size']['auroc']:.3f}"])
        return _table(["--augment", "validation AUROC, foreign patches (chooses)", "validation AUROC, labelled "
                       "pneumonia (a check)", "test AUROC [95 % CI] (read afterwards)", "test AUROC of PNG size"], rows)

    def site(self, name: str) -> str:
        """site_calibration.py: per threshold source, the held-out normals flagged (FPR), the anomalies
        flagged (TPR) and the default score's AUROC, mean (min–max) over runs × halvings."""
        res = self.R[name]
        arms = [a for a in ("validation", "calibration", "adapted") if a in res["rows"][0]]
        labels = {"validation": "threshold from the run's validation normals",
                  "calibration": "threshold from `--calibration` on the site half",
                  "adapted": "`anomaly adapt` on the site half (threshold on its held-out part)"}
        rows = []
        for arm in arms:
            col = [r[arm] for r in res["rows"]]
            auroc = [c.get("auroc_default", c["auroc_combined"]) for c in col]
            rows.append([labels[arm], span([c["fpr"] for c in col], 1, 100) + " %",
                         span([c["tpr"] for c in col], 1, 100) + " %", span(auroc), col[0]["n_calibration"]])
        png = [r["validation"]["auroc"]["baseline_png_size"] for r in res["rows"] if "auroc" in r["validation"]]
        note = f" PNG size on the same images: AUROC {span(png)}." if png else ""
        return (_table(["arm", "scored normals flagged (target " + pct(res["target_fpr"], 0) + ")",
                        "anomalies flagged", "AUROC of the default score", "normals setting the threshold"], rows)
                + f"\n\nMean (min–max) over {len(res['rows'])} runs × halvings.{note}")

    def speed(self) -> str:
        """bench_train.py's main runs and roofline: images/s per arm, achieved GFLOP/s and GEMM share."""
        t = self.R.train
        roof = t.get("roofline", {})
        rows = []
        for arm, label in (("baseline", "the article's code (fp32)"), ("medivae", "medivae (default settings)")):
            ips = ", ".join(f"{r['images_per_s']:,.1f}" for r in t["runs"][arm])
            a = roof.get("arms", {}).get(arm, {})
            rows.append([label, ips, f"{t['summary'][arm]['test_neg_elbo_median']:,.2f}",
                         f"{t['summary'][arm]['peak_rss_mb_max']:,.0f} MB",
                         f"{a['achieved_gflops']:.1f}" if a else "–",
                         f"{a['fraction_of_gemm_peak']:.0%} of {a['precision']}" if a else "–"])
        return _table(["", "training images/s (runs)", "test −ELBO (nats/image)", "peak RSS", "achieved GFLOP/s",
                       "share of the GEMM speed"], rows)

    def short_runs(self, name: str = "train") -> str:
        s = self.R[name]["short_run"]
        rows = [[arm, ", ".join(f"{r['wall_s']:.1f}" for r in s["runs"][arm]),
                 ", ".join(f"{r['outside_s']:.2f}" for r in s["runs"][arm])] for arm in s["runs"]]
        return _table(["program", "whole-process seconds (runs)", "seconds outside training (runs)"], rows)

    def speed_ablation(self) -> str:
        a = self.R.speed_ablation
        base = a["median_images_per_s"]["default"]
        rows = [[f"`{v}`", f"{a['median_images_per_s'][v]:,.0f}",
                 ", ".join(f"{r['images_per_s']:,.0f}" for r in a["runs"][v]),
                 f"{a['median_images_per_s'][v] / base:.2f}", ", ".join(a["variants"][v]) or "–"]
                for v in a["variants"]]
        return _table(["variant", "images/s (median)", "rounds", "vs default", "settings turned off"], rows)

    def data(self) -> str:
        d = self.R.data
        rows = [["first load (decoding every file)", f"{d['first_load_s']:.1f} s"],
                ["cached load", f"{d['cached_load_s']:.3f} s"],
                [f"batches of {d['batch_loop']['batch_size']} from the memory-mapped cache, as floats",
                 f"{d['batch_loop']['memmap_images_per_s']:,.0f} images/s"],
                [f"batches of {d['batch_loop']['batch_size']} from RAM, as floats",
                 f"{d['batch_loop']['in_ram_images_per_s']:,.0f} images/s"]]
        return _table(["", f"{d['n_images']:,} MedNIST images"], rows)

    def index(self) -> str:
        """Every result file in the folder: the page that shows it, the commit it ran at, its command."""
        rows = []
        for path in sorted(self.R.folder.glob("*.json")):
            res = self.R[path.stem]
            res = res if isinstance(res, dict) else {}  # a file of another shape still gets its row
            page = PAGES.get(path.stem)
            cmd = res.get("command") or ""
            rows.append([f"`{path.name}`", f"[{page[1]}]({page[0]})" if page else "–", short(res.get("commit")),
                         f"`{cmd}`" if cmd else "per-run commands inside the file"])
        return _table(["file", "shown on", "commit", "command"], rows)

    def provenance(self, name: str, command: str | None = None) -> str:
        """Where a table comes from: its file, the commit it ran at, and the command that reproduces it."""
        res = self.R[name]
        cmd = command or res.get("command")
        if cmd is None and isinstance(res.get("commands"), dict):
            cmd = "\n".join(res["commands"].values())
        elif cmd is None and isinstance(res.get("commands"), list):
            cmd = "\n".join(res["commands"])
        text = f"From `benchmarks/results/{name}.json`, recorded at commit {short(res.get('commit'))}."
        return text + (f" Reproduce with:\n\n```bash\n{cmd}\n```" if cmd else "")


# --- rendering ---------------------------------------------------------------------------------------
def compare_cell(results: Results, name: str, metric: str, model: str) -> dict:
    """One cell (``value``, ``ci95``, ``vs_first``) of a ``medivae compare`` result: row ``metric``, column of
    the run of family ``model``."""
    cmp = results[name]["compare"]
    row = next((r for r in cmp["rows"] if r["metric"] == metric), None)
    if row is None or model not in cmp["models"]:
        raise KeyError(f"{name}: no metric {metric!r} or model {model!r}")
    return row["values"][cmp["models"].index(model)]


def environment() -> jinja2.Environment:
    # "{#" opens a heading id in Markdown ("## Title {#id}"), so Jinja comments are "{##" ... "##}"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
                             comment_start_string="{##", comment_end_string="##}")
    env.filters.update(FILTERS)
    return env


def pick(items: list[dict], **where) -> dict:
    """The first item of a list of result rows whose keys equal ``where`` (a KeyError names the filter)."""
    for item in items:
        if all(item.get(k) == v for k, v in where.items()):
            return item
    raise KeyError(f"no result row with {where}")


def render(text: str, results_dir: Path = RESULTS, extra: dict | None = None) -> str:
    """A page's Markdown with every ``{{ ... }}`` filled in from ``results_dir``."""
    R = Results(results_dir)
    context = {"R": R, "T": Tables(R), "cell": lambda *a: compare_cell(R, *a), "pick": pick,
               "mean": statistics.fmean, "min": min, "max": max, "abs": abs, "len": len, "sorted": sorted,
               **(extra or {})}
    context["families_table"] = lambda base="": environment().from_string(FAMILIES.read_text()).render(
        **context, base=base).lstrip("\n")
    return environment().from_string(text).render(**context)


FAMILIES = Path(__file__).with_name("readme_families.jinja")  # the README table's template


def update_readme(text: str, results_dir: Path = RESULTS) -> str:
    """README text with the families table between the markers rendered afresh."""
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(f"README.md lacks the markers {README_START} ... {README_END}")
    return head + start + "\n" + render('{{ families_table("docs/") }}', results_dir) + end + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", nargs="?", type=Path, help="a docs page to print rendered")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's families table")
    p.add_argument("--check", action="store_true", help="with --readme: exit 1 if README.md is stale")
    p.add_argument("--results", type=Path, default=RESULTS, help="the folder of result files")
    a = p.parse_args(argv)
    if a.readme:
        readme = ROOT / "README.md"
        old = readme.read_text()
        new = update_readme(old, a.results)
        if a.check:
            return int(new != old)
        readme.write_text(new)
    if a.page:
        print(render(a.page.read_text(), a.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
