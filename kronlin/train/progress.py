"""A dependency-free progress line on stderr: done/total, elapsed time and an estimate of what remains.

Used by ``python -m kronlin.train`` (each run, and each optimizer of
``compare``) and by ``bench/reproduce.py`` (jobs); ``--quiet`` turns it off.
On a terminal the line is redrawn in place (at most ten times a second);
otherwise (a log file, CI) one line is printed about every tenth of the work.
"""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(t: float) -> str:
    """``"8.2s"``, ``"3m07s"``, ``"1h02m"``."""
    if not math.isfinite(t):
        return "?"
    if t < 60:
        return f"{t:.1f}s"
    if t < 3600:
        return f"{int(t // 60)}m{int(t % 60):02d}s"
    return f"{int(t // 3600)}h{int(t % 3600 // 60):02d}m"


class Progress:
    """``label [#####.....] done/total  loss …  elapsed 12.0s  eta 30.1s`` on ``stream`` (stderr)."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None, width: int = 24):
        self.total, self.label, self.enabled, self.width = int(total), label, enabled, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = -math.inf
        self._next_line = 0
        self._drew = False

    def update(self, done: int, loss: float | None, seconds: float, start: int = 0) -> None:
        """``done`` of ``total`` finished after ``seconds`` (of which ``start`` were done before this session)."""
        if not self.enabled:
            return
        now = time.monotonic()
        final = done >= self.total
        if self.tty:
            if not final and now - self._last_draw < 0.1:
                return
        elif not final and done < self._next_line:
            return
        self._last_draw = now
        self._next_line = done + max(1, self.total // 10)
        frac = done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        rate = seconds / max(done - start, 1)  # seconds per unit of this session only
        eta = rate * (self.total - done)
        shown = "" if loss is None else f"  loss {loss:.4e}"
        line = (
            f"{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total}{shown}"
            f"  elapsed {format_seconds(seconds)}  eta {format_seconds(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drew = True

    def close(self) -> None:
        if self.enabled and self.tty and self._drew:
            self.stream.write("\n")
            self.stream.flush()
