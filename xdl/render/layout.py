"""Measure an audit page as a browser lays it out: the checks a person's eye makes.

Used by the test suite and by ``docs/screenshot.py``; a plugin author can run it on a page
with their section too. It drives a Chromium executable (Debian's ``chromium`` by default)
through Playwright, so it needs the ``playwright`` package but none of its browser downloads.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from xdl.render.html import TEMPLATES

# The bars of the layout, in CSS pixels at a 1280 px wide viewport.
VIEWPORT = (1280, 900)
NARROW_PX = 60  # a text element narrower than this …
NARROW_CHARS = 20  # … holding more characters than this is wrapped about one character per line

# Everything measured in one pass inside the page. An element's "own text" is what its
# direct text nodes hold, so a container is not blamed for its children's text; elements
# inside a closed <details> have no box and are skipped.
_MEASURE = """
(narrow) => {
  const box = (el) => el.getBoundingClientRect();
  const text = (el) => [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  const squeezed = [];
  for (const el of document.body.querySelectorAll('*')) {
    const t = text(el), r = box(el);
    if (t.length > narrow.chars && r.width > 0 && r.width < narrow.px)
      squeezed.push({tag: el.tagName.toLowerCase(), width: Math.round(r.width), text: t.slice(0, 60)});
  }
  const tallest = (selector) => {
    let best = {height: 0, text: ''};
    for (const el of document.querySelectorAll(selector)) {
      const h = box(el).height;
      if (h > best.height) best = {height: Math.round(h), text: el.textContent.trim().slice(0, 60)};
    }
    return best;
  };
  const run = document.querySelector('#run');
  return {
    page_height: document.documentElement.scrollHeight,
    scroll_width: document.documentElement.scrollWidth,
    inner_width: window.innerWidth,
    run_height: run ? Math.round(box(run).height) : null,
    tallest_card: tallest('.card'),
    tallest_cell: tallest('td, th, dd, dt'),
    tallest_finding: tallest('.finding'),
    squeezed: squeezed,
    images: document.images.length,
    images_decoded: [...document.images].every(i => i.complete && i.naturalWidth > 0),
    sections: document.querySelectorAll('section.analyzer').length,
    toc_sticky: getComputedStyle(document.querySelector('nav.toc')).position === 'sticky',
  };
}
"""


def chromium() -> str | None:
    """The Chromium executable on PATH, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def measure(page: str | Path, screenshot: str | Path | None = None, viewport: tuple[int, int] = VIEWPORT,
            executable: str | None = None) -> dict[str, Any]:
    """Lay ``page`` (an HTML file) out in headless Chromium and return its geometry.

    With ``screenshot``, also write a PNG of the top of the page at ``viewport``.
    """
    from playwright.sync_api import sync_playwright

    executable = executable or chromium()
    if executable is None:
        raise RuntimeError("no chromium on PATH: install Debian's chromium (apt-get install chromium)")
    # The flags keep a sandboxed, offline Chromium from reaching for the network at start.
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--hide-scrollbars"]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, args=args, headless=True,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            tab = browser.new_page()
            tab.goto(Path(page).resolve().as_uri())
            tab.wait_for_load_state("load")
            found = tab.evaluate(_MEASURE, {"px": NARROW_PX, "chars": NARROW_CHARS})
            if screenshot is not None:
                tab.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    return found


def templates_digest() -> str:
    """sha256 over the audit page's templates' names and bytes: changes whenever that page's look can
    (the comparison page, compare.html, is not in docs/audit.png)."""
    digest = hashlib.sha256()
    for path in sorted(TEMPLATES.glob("audit.*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
