"""The book (Jupyter Book 1.x) builds offline with warnings as errors, and its pages render.

The screenshot half needs Debian's chromium (`.ci/run` installs it); outside CI the test
is skipped without it, in CI its absence is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
]

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
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_every_chapter_in_the_toc_is_rendered_with_its_figures(html):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = html / "notebooks" / f"{notebook.stem}.html"
        assert page.is_file(), f"{notebook.name} is missing from book/_toc.yml"
        text = page.read_text()
        figures = notebook.read_text().count('"image/png"')
        assert text.count("<img") >= figures > 0, f"{page.name}: figures not rendered"


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
def test_page_renders_in_a_headless_browser(html, tmp_path, page, title):
    dom = browse(html / page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    h1 = re.search(r"<h1[^>]*>(.*?)<", dom.stdout, re.S)
    assert h1 and title in h1.group(1), f"{page}: first heading is {h1 and h1.group(1)!r}"
    shot = tmp_path / "shot.png"
    done = browse(html / page, tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    assert np.std(pixels) > 0.05, f"{page}: the screenshot is blank"
