"""The book (Jupyter Book 1.x) builds offline with warnings as errors, and its pages render.

The browser half needs Debian's chromium (`.ci/run` installs it); outside CI those tests are
skipped without it, in CI its absence is a failure. Pages are opened with name resolution
switched off, so a page that needs the network (MathJax from a CDN) fails here as it would
for a reader offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--single-process",  # without it Debian's chromium hangs at the zygote here
    "--host-resolver-rules=MAP * ~NOTFOUND",  # offline, even on a machine with a network
]
# Virtual milliseconds the page's scripts may run before the DOM is dumped. Virtual time
# advances only while the page waits on timers alone, so a slow machine does not use it up.
SCRIPT_BUDGET_MS = "10000"
RAW_MATHS = ("\\(", "\\[", "$$")  # TeX delimiters a reader must never see
STATIC_MATHS = 'class="math notranslate nohighlight"'  # what Sphinx writes for each formula
REMOTE = re.compile(r'<(?:script|link|img|iframe)[^>]*(?:src|href)="(?:https?:)?//[^"]+')

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", str(ROOT / "book"), "--path-output", str(out), "-W", "-n"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"book build failed:\n{done.stdout[-3000:]}\n{done.stderr}"
    return out / "_build" / "html"


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI must install Debian's chromium (.ci/run does: apt-get install chromium)"
            )
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


def browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{page.parent.name}-{page.stem}"  # one call per page and dir
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def doms(html, tmp_path_factory) -> dict[str, str]:
    """The DOM of the intro and of every page with maths, after their scripts ran."""
    pages = ["intro.html"] + [
        str(p.relative_to(html))
        for part in ("notebooks", "exercises")
        for p in sorted((html / part).glob("*.html"))
        if STATIC_MATHS in p.read_text()
    ]
    profiles = tmp_path_factory.mktemp("profiles")
    budget = f"--virtual-time-budget={SCRIPT_BUDGET_MS}"

    def dump(page: str) -> str:
        done = browse(html / page, profiles, budget, "--dump-dom")
        assert done.returncode == 0, f"{page}: chromium failed\n{done.stderr[-2000:]}"
        return done.stdout

    with ThreadPoolExecutor(max_workers=3) as pool:  # chromium idles half the time it runs
        return dict(zip(pages, pool.map(dump, pages), strict=True))


class ReaderText(HTMLParser):
    """The text a reader sees outside code, and how many formulas MathJax typeset."""

    SKIPPED = {"script", "style", "pre", "code", "textarea", "mjx-container"}

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.depth = 0  # how deep inside skipped elements the parser is
        self.typeset = 0  # <mjx-container> elements: one per formula MathJax rendered
        self.chunks: list[str] = []
        self.feed(dom)
        self.text = "".join(self.chunks)

    def handle_starttag(self, tag: str, attrs) -> None:
        self.typeset += tag == "mjx-container"
        self.depth += tag in self.SKIPPED

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.depth:
            self.chunks.append(data)


def test_every_chapter_in_the_toc_is_rendered_with_its_figures(html):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = html / "notebooks" / f"{notebook.stem}.html"
        assert page.is_file(), f"{notebook.name} is missing from book/_toc.yml"
        text = page.read_text()
        figures = notebook.read_text().count('"image/png"')
        assert text.count("<img") >= figures > 0, f"{page.name}: figures not rendered"


def test_folded_plotting_cells_still_show_their_figures(html):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(notebook.read_text())
        folded = [
            c
            for c in nb["cells"]
            if c["cell_type"] == "code" and "hide-input" in c["metadata"].get("tags", [])
        ]
        page = (html / "notebooks" / f"{notebook.stem}.html").read_text()
        cells = re.findall(
            r'<div class="cell [^"]*tag_hide-input.*?(?=<div class="cell |$)', page, re.S
        )
        assert len(cells) == len(folded), f"{notebook.stem}: hide-input cells not all in the book"
        for cell, rendered in zip(folded, cells, strict=True):
            assert '<details class="admonition hide above-input">' in rendered, (
                f"{notebook.stem}: a hide-input cell is not folded: is sphinx-togglebutton on?"
            )
            figures = sum("image/png" in out.get("data", {}) for out in cell["outputs"])
            shown = rendered.split("</details>", 1)[-1].count("<img")
            assert shown >= figures, f"{notebook.stem}: a folded cell lost its figure"


def test_navigation_links_the_intro_and_chapter_0(html):
    intro = (html / "intro.html").read_text()
    chapter = (html / "notebooks" / "00_why_parallel.html").read_text()
    assert 'href="notebooks/00_why_parallel.html"' in intro
    assert re.search(r'href="\.\./intro\.html"', chapter), "chapter 0 has no link back"


@pytest.mark.parametrize(
    "page, title",
    [
        ("intro.html", "Parallel training of language models"),
        ("notebooks/00_why_parallel.html", "Why one device is not enough"),
        ("notebooks/01_collectives.html", "Collectives from scratch"),
    ],
)
def test_page_renders_in_a_headless_browser(html, doms, tmp_path, page, title):
    h1 = re.search(r"<h1[^>]*>(.*?)<", doms[page], re.S)
    assert h1 and title in h1.group(1), f"{page}: first heading is {h1 and h1.group(1)!r}"
    shot = tmp_path / "shot.png"
    done = browse(html / page, tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    assert np.std(pixels) > 0.05, f"{page}: the screenshot is blank"


def test_no_page_fetches_anything_from_the_network(html):
    for page in sorted(html.rglob("*.html")):
        remote = REMOTE.findall(page.read_text())
        assert not remote, (
            f"{page.relative_to(html)} loads {remote[0]!r}: the book must render offline; "
            "bundle the file with the build (as sphinx-mathjax-offline does for MathJax)"
        )


def test_maths_is_typeset_offline_on_every_page_that_has_it(html, doms):
    pages = [page for page in doms if page != "intro.html"]
    assert "notebooks/00_why_parallel.html" in pages, "chapter 0 has no maths any more?"
    for page in pages:
        formulas = (html / page).read_text().count(STATIC_MATHS)
        seen = ReaderText(doms[page])
        raw = [m for m in RAW_MATHS if m in seen.text]
        assert not raw and seen.typeset >= formulas, (
            f"{page}: MathJax typeset {seen.typeset} of {formulas} formulas and the reader "
            f"sees raw {raw}: is MathJax served from the build (book/_config.yml, "
            "extra_extensions: sphinx-mathjax-offline)?"
        )
