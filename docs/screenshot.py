"""Regenerate docs/audit.png from a real digits demo audit, and print the page's geometry.

    .venv/bin/python docs/screenshot.py            # trains runs/demo if missing, audits it, screenshots the page

The PNG carries a digest of the page templates (a tEXt chunk), so the test suite can tell
when the templates changed after the screenshot was taken and the README shows a stale page.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xdl.render.layout import measure, templates_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="the run to audit (trained if missing)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "audit.png"))
    args = parser.parse_args()
    run = Path(args.run)
    xdl = [sys.executable, "-m", "xdl"]
    if not (run / "run.json").is_file():
        subprocess.run([*xdl, "train", "--out", str(run), "--quiet"], check=True)
    subprocess.run([*xdl, "audit", str(run)], check=True)
    geometry = measure(run / "audit.html", screenshot=args.out)
    _stamp(Path(args.out), templates_digest())
    print(json.dumps(geometry, indent=1))
    print(f"screenshot: {args.out}")


def _stamp(png: Path, digest: str) -> None:
    """Write the templates' digest into the PNG as a tEXt chunk (Pillow keeps the pixels as they are)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("xdl-templates-sha256", digest)
    with Image.open(png) as image:
        image.load()
        image.save(png, pnginfo=info)


if __name__ == "__main__":
    main()
