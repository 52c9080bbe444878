"""A progress bar for reads: one line on a terminal's stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from treegraft._tree.leaves import format_bytes

__all__ = ["ProgressBar"]


class ProgressBar:
    """A one-line progress bar on a terminal's stderr, as a read callback.

    Call it with `(done_bytes, total_bytes)`; it redraws at most ten times a
    second and ends the line when done. Prints nothing when stderr is not a
    terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, label: str = "reading"):
        self.stream = stream or sys.stderr
        self.label = label
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        width = 30
        filled = int(frac * width)
        bar = "█" * filled + "·" * (width - filled)
        self.stream.write(
            f"\r{self.label} {bar} {frac:6.1%} {format_bytes(done)} / {format_bytes(total)}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
