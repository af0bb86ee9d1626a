"""Shared CLI plumbing: user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable, Sequence

from tuner.errors import TunerError


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a :class:`TunerError` prints ``error: <message>`` and returns 2."""
    try:
        return main(argv)
    except TunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_now(code: int) -> None:
    """End a command-line process with ``code`` without the interpreter's final teardown.

    Runs what a normal exit runs that can matter (every ``atexit`` handler: Ray's shutdown,
    logging, ``weakref.finalize`` hooks; then the standard streams are flushed), but skips
    freeing every module and the C++ destructors of torch and Ray, about a second after a
    search. Falls back to a normal exit while a non-daemon thread other than this one is
    alive (it might still be writing). Only for ``if __name__ == "__main__"``: never call it
    from code that others import and run in their own process.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.current_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit, in the same order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
            pass
    os._exit(code)
