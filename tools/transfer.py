"""Moving extents between files: the engine under lbd-merge and lbd-compact.

A *plan* is the list of ``(sector, count, loc)`` runs to apply, ``loc`` an
overlay location (:func:`tools.common.decode`) or ``ZERO``.  A target takes
them: a raw image gets data with ``copy_file_range`` (no copy through
Python) and zeros as holes; a change file gets data through its own
``write_batch`` (so the format code writes it) in batches of a few MiB.
All file I/O goes through :class:`~lbd.layers.fileio.FileIO`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lbd.layers.fileio import FileIO

from lbd.extentmap import ZERO, ExtentMap

from .common import SECTOR, AnyChangeFile, Opened, decode
from .progress import Progress

BATCH = 8 << 20  # bytes per change-file write batch and per verify read
PIECE = 64 << 20  # the largest single copy, so progress moves


@dataclass
class Plan:
    runs: list[tuple[int, int, int]]  # (sector, count, overlay loc or ZERO)

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n, loc in self.runs if loc != ZERO) * SECTOR

    @property
    def zero_bytes(self) -> int:
        return sum(n for _, n, loc in self.runs if loc == ZERO) * SECTOR


def make_plan(overlay: ExtentMap, size: int) -> Plan:
    """The overlay's extents, joined across chunk boundaries, cut at the device end."""
    runs: list[tuple[int, int, int]] = []
    end = size // SECTOR
    for s, n, loc in overlay:
        if s >= end:
            break
        n = min(n, end - s)
        if runs:
            ps, pn, pl = runs[-1]
            if ps + pn == s and ((pl == ZERO and loc == ZERO) or
                                 (pl != ZERO and loc != ZERO and pl + pn * SECTOR == loc)):
                runs[-1] = (ps, pn + n, pl)
                continue
        runs.append((s, n, loc))
    return Plan(runs)


def _pieces(runs: Iterable[tuple[int, int, int]], limit: int
            ) -> Iterator[tuple[int, int, int]]:
    step = limit // SECTOR
    for s, n, loc in runs:
        for k in range(0, n, step):
            m = min(step, n - k)
            yield s + k, m, loc if loc == ZERO else loc + k * SECTOR


def zero_raw(io: FileIO, off: int, n: int) -> None:
    """Make a range of a raw image read as zeros: a hole, else zeroed, else written."""
    if io.punch_hole(off, n) or io.zero_range(off, n):
        return
    chunk = memoryview(bytes(min(n, 1 << 20)))
    pos = off
    while pos < off + n:
        m = min(len(chunk), off + n - pos)
        io.pwrite(chunk[:m], pos)
        pos += m


def apply_to_raw(plan: Plan, sources: list[Opened], io: FileIO, progress: Progress) -> None:
    for s, n, loc in _pieces(plan.runs, PIECE):
        off, length = s * SECTOR, n * SECTOR
        if loc == ZERO:
            zero_raw(io, off, length)
        else:
            idx, foff = decode(loc)
            io.copy_from(sources[idx].io, foff, length, off)
        progress.add(length)


def apply_to_change_file(plan: Plan, sources: list[Opened], cf: AnyChangeFile,
                         progress: Progress) -> None:
    batch: list[tuple[int, list[bytearray], int]] = []
    held = 0

    def flush() -> None:
        nonlocal batch, held
        if batch:
            cf.write_batch(batch)
            progress.add(held)
        batch, held = [], 0

    for s, n, loc in _pieces(plan.runs, BATCH):
        length = n * SECTOR
        if loc == ZERO:
            flush()
            cf.zero(s, n)
            progress.add(length)
            continue
        idx, foff = decode(loc)
        buf = bytearray(length)
        sources[idx].io.readinto(memoryview(buf), foff)
        batch.append((s, [buf], length))
        held += length
        if held >= BATCH:
            flush()
    flush()


def read_plan_range(sources: list[Opened], overlay: ExtentMap, base: Opened | None,
                    off: int, view: memoryview) -> None:
    """Fill ``view`` with device bytes at ``off`` as the stack reads them."""
    view[:] = bytes(len(view))
    for s, n, loc in overlay.lookup(off // SECTOR, len(view) // SECTOR):
        piece = view[s * SECTOR - off:(s + n) * SECTOR - off]
        if loc is None:
            if base is not None:
                base.io.readinto(piece, s * SECTOR)
        elif loc != ZERO:
            idx, foff = decode(loc)
            sources[idx].io.readinto(piece, foff)


def read_change_file(cf: AnyChangeFile, off: int, view: memoryview,
                     below: Opened | None = None) -> None:
    """Fill ``view`` from a change file alone (absent reads from ``below`` or zeros)."""
    view[:] = bytes(len(view))
    for s, n, loc in cf.lookup(off // SECTOR, len(view) // SECTOR):
        piece = view[s * SECTOR - off:(s + n) * SECTOR - off]
        if loc is None:
            if below is not None:
                below.io.readinto(piece, s * SECTOR)
        elif loc != ZERO:
            cf.io.readinto(piece, loc)


def ranges_of(plan: Plan) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` the plan touches, in pieces of :data:`BATCH`."""
    return [(s * SECTOR, n * SECTOR) for s, n, _ in _pieces(plan.runs, BATCH)]


def whole_device(size: int) -> list[tuple[int, int]]:
    return [(o, min(BATCH, size - o)) for o in range(0, size, BATCH)]
