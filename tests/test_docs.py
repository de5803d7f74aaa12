"""The documentation: results pages follow their JSON, the README is current and its example runs, and the
built site (when ``mkdocs build`` has made ``site/``) loads nothing external and renders in Chromium."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest

from chromium import CHROMIUM, IMAGE_CHECK, DevTools, errors

ROOT = Path(__file__).resolve().parents[1]
DOCS, SITE, RESULTS = ROOT / "docs", ROOT / "site", ROOT / "benchmarks" / "results"

jinja2 = pytest.importorskip("jinja2")
sys.path.insert(0, str(DOCS))
import gen_reference  # noqa: E402  (docs/ holds the generators)
import gen_results  # noqa: E402

EXTRA = {"cli_reference": gen_reference.cli_markdown, "family_options": gen_reference.family_options,
         "capability_table": gen_reference.capability_table}


def _render(page: str, results: Path = RESULTS) -> str:
    return gen_results.render((DOCS / page).read_text(), results, EXTRA)


@pytest.fixture
def results_copy(tmp_path) -> Path:
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    return folder


def _edit(folder: Path, name: str, change) -> None:
    path = folder / f"{name}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- the generator -----------------------------------------------------------------------------------
def test_a_changed_result_changes_the_results_page(results_copy):
    before = _render("results/families.md", results_copy)
    assert "30.23 ± 0.10" in before  # vq_vae_30.json's summary, as the page shows it

    def change(d):
        d["summary"]["vq_vae"]["psnr_db"] = [12.3456, 0.5]

    _edit(results_copy, "vq_vae_30", change)
    after = _render("results/families.md", results_copy)
    assert "12.35 ± 0.50" in after and "30.23 ± 0.10" not in after
    assert after.count("12.35") >= 2  # the seeds table and the prose both follow the file


def test_a_changed_result_changes_a_table_rendered_by_its_benchmark_script(results_copy):
    def change(d):
        d["runs"][0]["kl_nats"] = 987.6

    assert "987.6" not in _render("results/kl_ablation.md", results_copy)
    _edit(results_copy, "kl_ablation", change)
    rows = [line for line in _render("results/kl_ablation.md", results_copy).splitlines() if "987.6" in line]
    assert len(rows) == 1 and rows[0].startswith("| 0.5 | none | none |")


def test_a_missing_key_fails_the_page(results_copy):
    _edit(results_copy, "vae_gan", lambda d: d["summary"].pop("vae_gan"))
    with pytest.raises(jinja2.UndefinedError):
        _render("families/vae_gan.md", results_copy)


def test_every_page_renders_and_the_readme_is_current(results_copy):
    for page in DOCS.rglob("*.md"):
        text = re.sub(r"```.*?```|`[^`\n]*`", " ", _render(str(page.relative_to(DOCS))), flags=re.S)  # code may show {{
        assert "{{" not in text and "{%" not in text, page
    readme = (ROOT / "README.md").read_text()
    assert gen_results.update_readme(readme) == readme, "README is stale: python docs/gen_results.py --readme"
    _edit(results_copy, "vq_vae_30", lambda d: d["summary"]["vq_vae"].update(psnr_db=[11.111, 0.2]))
    assert "PSNR 11.11 ± 0.20 dB" in gen_results.update_readme(readme, results_copy)


# Settings and definitions, not results: SSIM's σ, the active-unit threshold, the sharpness band, "AUROC 0.5 =
# alike", free bits, a sampling temperature, AdamW's β₂, percentiles, augmentation ranges. Any other decimal
# in a page is a typed result.
DEFINITIONS = {"0.01", "0.05", "0.1", "0.25", "0.5", "0.7", "0.9", "1.1", "1.5", "99.5"}
DECIMAL = re.compile(r"(?<![\w.])[−-]?\d+\.\d+")


def _prose(text: str) -> str:
    """``text`` without Jinja, code, links' targets, heading ids and the README's generated table: what a
    reader sees typed."""
    generated = re.escape(gen_results.README_START) + ".*?" + re.escape(gen_results.README_END)
    for pattern in (generated, r"\{\{.*?\}\}", r"\{%.*?%\}", r"```.*?```", r"`[^`\n]*`", r"\]\([^)]*\)",
                    r"\{#[^}]*\}"):
        text = re.sub(pattern, " ", text, flags=re.S)
    return text


def test_no_decimal_result_is_typed_into_the_docs_or_the_readme():
    pages = [*DOCS.rglob("*.md"), ROOT / "README.md"]
    typed = {str(p.relative_to(ROOT)): sorted(set(DECIMAL.findall(_prose(p.read_text()))) - DEFINITIONS)
             for p in pages}
    assert {p: n for p, n in typed.items() if n} == {}


def test_prose_scan_sees_a_typed_number():
    assert DECIMAL.findall(_prose("PSNR 21.97 dB, {{ R.x | f(2) }} and `0.93`")) == ["21.97"]


# --- the README's Python example ---------------------------------------------------------------------
def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDIVAE_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102  (the README's own example)
    n = len(scope["test"])
    assert tuple(scope["codes"].shape) == (n, 32)
    assert tuple(scope["images"].shape) == (n, 1, 64, 64)
    assert tuple(scope["new"].shape) == (16, 1, 64, 64)
    assert 0 <= float(scope["new"].min()) and float(scope["new"].max()) <= 1


# --- the built site ----------------------------------------------------------------------------------
def _nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml")

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [re.sub(r"\.(md|ipynb)$", ".html", page) for page in walk(nav)]


needs_site = pytest.mark.skipif(not (SITE / "index.html").is_file(), reason="site/ is not built (mkdocs build)")
EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|source|video|audio)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//"""
                      r"""|url\(\s*["']?(?:https?:)?//|import\(\s*["'](?:https?:)?//""", re.I)


@needs_site
def test_built_site_references_nothing_external():
    html = {p: p.read_text(errors="replace") for p in SITE.rglob("*.html")}
    css = {p: p.read_text(errors="replace") for p in SITE.rglob("*.css")}
    found = {str(p.relative_to(SITE)): EXTERNAL.findall(t)[:3] for p, t in {**html, **css}.items()}
    assert {p: f for p, f in found.items() if f} == {}
    assert EXTERNAL.search('<script src="https://cdn.example/x.js"></script>')  # the check can fail


def _serve(folder: Path):
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on stderr
        pass


ARTICLE_TEXT = "document.querySelector('article') ? document.querySelector('article').innerText.length : 0"


@needs_site
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_nav_page_renders_in_chromium_without_errors(tmp_path):
    pages = _nav_pages()
    missing = [p for p in pages if not (SITE / p).is_file()]
    assert missing == [], f"nav pages not built: {missing}"
    server = _serve(SITE)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    tools = DevTools(tmp_path / "profile")
    problems = {}
    try:
        session = tools.open_tab()
        for page in pages:
            events = tools.load(session, base + page)
            images = json.loads(tools.evaluate(session, IMAGE_CHECK))
            bad = errors(events, allowed_prefixes=(base, "data:", "blob:"))
            broken = [alt for alt, ok in images if not ok]
            if bad or broken or tools.evaluate(session, ARTICLE_TEXT) < 200:
                problems[page] = {"errors": bad[:3], "broken_images": broken, "text": "short"}
    finally:
        tools.close()
        server.shutdown()
    assert problems == {}
