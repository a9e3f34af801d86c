"""How the commands report errors: one line on stderr naming the field, file or value, and an exit status.

2 for a bad input or config, 1 for a fault while running (disk full, a non-finite loss, ...), an error's own int
``exit_code`` when it has one (143 when ``gatekv train`` stopped on SIGTERM), 130 on Ctrl-C. ``--debug`` anywhere on
the command line (or ``GATEKV_DEBUG=1``) shows the traceback instead. Shared by ``gatekv.cli`` and
``gatekv.training.cli``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["DEBUG_FLAG", "CommandError", "debug_requested", "one_line", "run_reporting_errors"]

DEBUG_FLAG = "--debug"


class CommandError(Exception):
    """A fault with a ready one-line message and the exit status to use. Library errors may carry an ``exit_code``
    attribute too (``gatekv.training.runner.TrainingStopped``): it is honoured the same way."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``(debug?, argv without --debug)``."""
    debug = DEBUG_FLAG in argv or os.environ.get("GATEKV_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != DEBUG_FLAG]


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) if str(error).strip() else ""
    return text or type(error).__name__


def run_reporting_errors(prog: str, call, debug: bool) -> int:
    """Run ``call()`` (returns an exit status); turn any exception into one line on stderr and a non-zero status.

    Bad input (``ValueError``, ``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``) exits 2, an error
    with an int ``exit_code`` attribute that status, anything else 1 with the exception type named. ``debug``: re-raise
    instead.
    """
    try:
        return call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        if isinstance(getattr(error, "exit_code", None), int):
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
            return error.exit_code
        if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)):
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {type(error).__name__}: {one_line(error)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
