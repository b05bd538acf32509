"""A progress bar for long offline work: on a terminal only, quiet when piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .common import human

_WIDTH = 24


class Progress:
    """``label [#####-----]  42.0%  1.2 GiB / 2.9 GiB  850.1 MiB/s  ETA 2s``.

    Drawn on stderr when it is a terminal (``enabled`` overrides), at most
    ten times a second; :meth:`close` draws the final state and a newline.
    """

    def __init__(self, label: str, total: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def add(self, n: int) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._drawn >= 0.1:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-6)
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        fill = int(frac * _WIDTH)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 and not final else 0.0
        tail = f"in {elapsed:.1f}s" if final else f"ETA {left:.0f}s"
        line = (f"\r{self.label} [{'#' * fill}{'-' * (_WIDTH - fill)}] {frac * 100:5.1f}%  "
                f"{human(self.done)} / {human(self.total)}  {human(int(rate))}/s  {tail}")
        self.stream.write(line.ljust(96))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), final=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
