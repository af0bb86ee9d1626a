"""Shared CLI plumbing: user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import sys
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
