"""mkdocs hooks: render every page through the results generator, give each tutorial a notebook page, and
keep notebook pages free of CDN scripts.

- ``on_config``: every ``docs/tutorials/NAME.py`` (jupytext, percent format) gets ``docs/tutorials/NAME.ipynb``:
  the executed notebook ``docs/run_tutorials.py`` wrote, if it was made from the current source, otherwise the
  source converted without outputs. The ``.ipynb`` files are build products (git-ignored).
- ``on_page_markdown``: a Markdown page is a Jinja template over ``benchmarks/results/*.json``
  (:mod:`gen_results`) with the reference tables made from the code (:mod:`gen_reference`).
- ``on_post_page``: nbconvert's page template links MathJax and mermaid from a CDN; the tutorials use
  neither, and the site must load nothing from the network.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

import gen_reference  # noqa: E402  (docs/ is on sys.path only for the build)
import gen_results  # noqa: E402

TUTORIALS = DOCS / "tutorials"
CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", re.I)
MERMAID_LOADER = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?cdnjs\.cloudflare\.com.*?</script>", re.S)


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def notebook_for(source: Path) -> Path:
    """``source``'s .ipynb beside it: kept when it was executed from this very source, else rewritten unexecuted."""
    import jupytext
    import nbformat

    target = source.with_suffix(".ipynb")
    digest = source_digest(source)
    if target.exists():
        meta = nbformat.read(target, as_version=4).metadata.get("medivae", {})
        if meta.get("source_sha256") == digest:
            return target
    nb = jupytext.read(source)
    nb.metadata["medivae"] = {"source_sha256": digest, "executed": False}
    nbformat.write(nb, target)
    return target


def on_config(config, **kwargs):
    for source in sorted(TUTORIALS.glob("*.py")):
        notebook_for(source)
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    if not page.file.src_uri.endswith(".md"):
        return markdown
    extra = {"cli_reference": gen_reference.cli_markdown, "family_options": gen_reference.family_options,
             "capability_table": gen_reference.capability_table}
    try:
        return gen_results.render(markdown, extra=extra)
    except Exception as e:  # name the page: a Jinja error alone says "line 56 of <template>"
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_uri}: {type(e).__name__}: {e}") from e


def on_post_page(output, page, config, **kwargs):
    if page.file.src_uri.endswith(".ipynb"):
        output = MERMAID_LOADER.sub("", CDN_SCRIPT.sub("", output))
    return output
