"""What every command line of the toolkit shares: one-line errors and the optional-dependency check.

All six commands (``stlm-train``, ``stlm-eval``, ``stlm-export``, ``stlm-bench``, ``stlm-infer``, ``stlm-serve``) run
through :func:`run_command`, so a user error is always exactly one ``Error: ...`` line on stderr and
a non-zero exit, never a traceback (``STLM_DEBUG=1`` shows one). Exit codes: 0 success, 1 an error,
2 a usage error or a missing extra, 130 interrupted; a ``click.ClickException`` may carry its own.

The runtime installs with numpy, OpenCV and click only; training, export and benchmarks need
extras. :func:`require_extra` is called first thing by the commands that need one, so a missing
package is named with the ``pip install`` line that brings it before any work starts.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Iterable, Sequence

import click

__all__ = ["runtime_options", "EXIT_ERROR", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXTRAS", "MissingExtra", "CommandError", "one_line",
           "missing_modules", "require_extra", "run_command", "OneLineCommand"]

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

#: The import names each extra of setup.cfg provides (what the commands check before they start).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "scipy", "tqdm"),
    "export": ("torch", "onnx", "onnxslim", "onnxconverter_common", "polygraphy", "openvino"),
    "bench": ("matplotlib",),
    "cpu": ("onnxruntime",),
    "openvino": ("openvino",),
    "serve": ("pytriton", "tritonclient"),
    "client": ("tritonclient",),
}


class CommandError(click.ClickException):
    """A one-line failure with its own exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


class MissingExtra(CommandError):
    """An optional dependency is not installed: exit 2 and the extra that brings it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def one_line(message: Any) -> str:
    """Collapse a message (or an exception) to one line: library errors often span several."""
    if isinstance(message, BaseException):
        text = str(message).strip() or type(message).__name__
        if isinstance(message, KeyError):
            text = f"missing entry {text}"
    else:
        text = str(message)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in modules if not _importable(m)]


def require_extra(command: str, extra: str, modules: Iterable[str] | None = None, alternatives: str = "") -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` (or ``modules``) is importable.

    ``alternatives`` names other extras that would do too (``"[export,cpu] or [export,gpu]"``).
    """
    missing = missing_modules(EXTRAS[extra] if modules is None else modules)
    if missing:
        hint = alternatives or f"[{extra}]"
        raise MissingExtra(f"{command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                           f"pip install 'stlm-deploy{hint}'")


def run_command(cmd: click.Command, args: Sequence[str] | None = None, prog_name: str | None = None,
                known: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)) -> int:
    """Run a click command; return its exit code, printing any error as one ``Error:`` line.

    Exceptions of ``known`` types are user errors whose message says everything; anything else is
    printed with its type name (still one line) so a bug is recognisable without a traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        rv = cmd.main(args=argv, prog_name=prog_name, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("Error: aborted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as e:  # UsageError (exit 2), CommandError, MissingExtra, ...
        click.echo(f"Error: {one_line(e.format_message())}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the contract: one line, no traceback
        if os.environ.get("STLM_DEBUG"):
            raise
        prefix = "" if isinstance(e, known) else f"{type(e).__name__}: "
        click.echo(f"Error: {prefix}{one_line(e)}", err=True)
        return EXIT_ERROR


class OneLineCommand(click.Command):
    """A click command whose ``main`` goes through :func:`run_command` (click's own prints usage + hint)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a caller that handles exceptions itself (tests, run_command)
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        sys.exit(run_command(self, args, prog_name))


def runtime_options(command: Any) -> Any:
    """``--backend``, ``--precision``, ``--threads``: how a Detector is loaded, the same in every command
    that loads one (stlm-infer, stlm-serve); the choices are the runtime's own lists."""
    from .selection import BACKEND_CHOICES
    from .spec import PRECISIONS

    for option in reversed((
            click.option("--backend", type=click.Choice(list(BACKEND_CHOICES)), default="auto",
                         show_default=True,
                         help="Runtime; auto = the Detector's rule (tensorrt > ort-cuda > openvino > ort-cpu)."),
            click.option("--precision", type=click.Choice([*PRECISIONS, "f32", "f16"]),
                         default=None, help="Precision to run at (default: the backend's default for this engine)."),
            click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (ort/openvino)."))):
        command = option(command)
    return command
