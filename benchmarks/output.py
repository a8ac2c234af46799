"""The one ending of every benchmark script: print the tables, write them as Markdown and the report as JSON.

``--markdown FILE`` gets exactly the printed text, ``--json FILE`` the whole report (indented, values JSON
cannot hold written as strings); both atomically, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stlm_deploy.files import atomic_write_text


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Indented JSON with a final newline, atomically; values JSON cannot hold become strings."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def emit(text: str, report: Any = None, *, json_path: str | os.PathLike | None = None,
         markdown_path: str | os.PathLike | None = None, echo: Callable[[str], Any] | None = print) -> str:
    """Print ``text`` (``echo``; None prints nothing), then write it to ``markdown_path`` and ``report`` to
    ``json_path`` where given. Returns ``text``."""
    if echo is not None:
        echo(text)
    if json_path:
        write_json(json_path, report)
    if markdown_path:
        atomic_write_text(markdown_path, text)
    return text


def emit_beside(text: str, report: Any, json_path: str | os.PathLike) -> None:
    """:func:`emit` to ``json_path`` and the ``.md`` beside it (the results-folder convention), then say so."""
    json_path = Path(json_path)
    emit(text, report, json_path=json_path, markdown_path=json_path.with_suffix(".md"))
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


def run_main(main: Callable[[], int | None]) -> int:
    """Run a benchmark script's ``main`` under the project's one-line-error rule (as ``stlm-bench`` does):
    a bad input (a missing file, a malformed engine or checkpoint, a bad value) prints ``Error: ...`` on one
    line and exits 2 instead of a traceback; anything else still raises."""
    from stlm_deploy.errors import DeployError

    try:
        return main() or 0
    except (DeployError, ValueError, OSError) as e:
        print("Error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
