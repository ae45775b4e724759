"""The command line every benchmark script shares: ``--quick``, one JSON row per line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def run(main: Callable[[bool], list[dict]], doc: str, quick_help: str = "smaller data, fewer epochs") -> list[dict]:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    rows = main(parser.parse_args().quick)
    for row in rows:
        print(json.dumps(row))
    return rows
