"""Write keel's OpenAPI document to docs/openapi.json, as the app builds it; ``--check`` only compares.

    .venv/bin/python scripts/openapi.py          # after changing a route, a wire schema or the document's rules
    .venv/bin/python scripts/openapi.py --check  # exit 1 if docs/openapi.json is stale (as the test does)

The document does not depend on settings: the app is built on a throwaway data directory and never started.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "openapi.json"


def document() -> str:
    from keel.app import create_app
    from keel.interaction.openapi import render
    from keel.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        return render(create_app(Settings(data_dir=Path(tmp))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = document()
    current = DOCUMENT.read_text() if DOCUMENT.exists() else ""
    if args.check:
        if current != text:
            print(f"{DOCUMENT.relative_to(ROOT)} is stale: run `python scripts/openapi.py`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        DOCUMENT.write_text(text)
        print(f"wrote {DOCUMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's keel, not whichever one the venv installed
    raise SystemExit(main())
