"""stlm-export entry point."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("stlm-export: not available yet in this version (export lands with the export issue)", file=sys.stderr)
    sys.exit(2)
