"""Power-cut simulation of the change file through its I/O seam.

Every write, allocation and fdatasync the change file issues is recorded.  A
crash state is the file as a disk could have left it: everything up to the
last completed sync, plus any subset of the writes after it, each possibly
torn (only a prefix reached the disk).  Each state must open, must return
every write acknowledged before that sync, and must never return data that
was not written to a sector.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from lbd.layers.changefile import ZERO, ChangeFile
from lbd.layers.fileio import Buffer, FileIO

from lbd.layer import Identity

SECTOR = 512
SIZE = 8 << 20
SECTORS = SIZE // SECTOR

Op = tuple[str, int, bytes]  # ("w", offset, data) | ("a", offset, b"" with len) | ("s", 0, b"")


class RecordingIO(FileIO):
    ops: list[Op] = []

    def pwritev(self, buffers: list[Buffer], offset: int) -> None:  # type: ignore[override]
        RecordingIO.ops.append(("w", offset, b"".join(bytes(b) for b in buffers)))
        super().pwritev(buffers, offset)

    def allocate(self, offset: int, length: int) -> None:
        RecordingIO.ops.append(("a", offset + length, b""))
        super().allocate(offset, length)

    def truncate(self, length: int) -> None:
        RecordingIO.ops.append(("a", length, b""))
        super().truncate(length)

    def fdatasync(self) -> None:
        RecordingIO.ops.append(("s", 0, b""))
        super().fdatasync()


def run_workload(path: str, seed: int, n_ops: int) -> list[tuple[int, int, int, bytes | None]]:
    """Random writes/zeroes/syncs; returns (op_index_done, sector, count, data|None=zero)."""
    RecordingIO.ops = []
    rng = random.Random(seed)
    cf = ChangeFile.create(path, SIZE, Identity(), io_factory=RecordingIO)
    log: list[tuple[int, int, int, bytes | None]] = []
    for i in range(n_ops):
        r = rng.random()
        sector = rng.randrange(0, SECTORS - 64)
        count = rng.choice([1, 1, 2, 8, 8, 16, 33])
        if rng.random() < 0.5:  # hot spots: rewrites of the same extents (in place)
            sector, count = rng.randrange(8) * 64, 8
        if r < 0.75:
            data = bytes([i % 251 + 1]) * (count * SECTOR)
            cf.write(sector, [data], len(data))
            log.append((len(RecordingIO.ops), sector, count, data))
        elif r < 0.85:
            cf.zero(sector, count)
            log.append((len(RecordingIO.ops), sector, count, None))
        else:
            cf.sync()
    cf.close(clean=rng.random() < 0.5)
    return log


Image = tuple[int, list[tuple[int, bytes]]]  # file size, writes in order


def build_state(ops: list[Op], crash_at: int, rng: random.Random) -> tuple[Image, int]:
    """File contents after a power cut at op index ``crash_at``; and the sync index."""
    last_sync = max((i for i in range(crash_at) if ops[i][0] == "s"), default=-1)
    size = 0
    writes: list[tuple[int, bytes]] = []

    def apply(op: Op, torn: float = 1.0) -> None:
        nonlocal size
        kind, off, data = op
        if kind == "a":
            size = max(size, off)
        elif kind == "w":
            n = len(data) if torn >= 1 else int(len(data) * torn)
            writes.append((off, data[:n]))
            size = max(size, off + n)

    for op in ops[:last_sync + 1]:
        apply(op)
    for op in ops[last_sync + 1:crash_at]:
        roll = rng.random()
        if roll < 0.4:
            apply(op)
        elif roll < 0.6:
            apply(op, torn=rng.random())  # a torn write: only a prefix landed
    return (size, writes), last_sync


def check_state(img: Image, path: str, log: list[tuple[int, int, int, bytes | None]],
                sync_index: int) -> None:
    with open(path, "wb") as f:
        f.truncate(img[0])
        for off, data in img[1]:
            f.seek(off)
            f.write(data)
    try:
        cf = ChangeFile.open(path, writable=False)
    except Exception as exc:  # a state before the header was durable may be unreadable
        if sync_index < 0:
            return
        raise AssertionError(f"crash state after a completed sync does not open: {exc}") from exc
    try:
        versions: dict[int, list[tuple[int, bytes | None]]] = {}
        for done, sector, count, data in log:
            for i in range(count):
                chunk = None if data is None else data[i * SECTOR:(i + 1) * SECTOR]
                versions.setdefault(sector + i, []).append((done, chunk))
        for sector, vs in versions.items():
            runs = cf.lookup(sector, 1)
            loc = runs[0][2]
            got: bytes | str | None
            if loc is None:
                got = "absent"
            elif loc == ZERO:
                got = None
            else:
                got = cf.io.pread(SECTOR, loc)
            durable = [v for done, v in vs if done <= sync_index]
            later = [v for done, v in vs if done > sync_index]
            allowed: list[bytes | str | None] = later[:]
            allowed.append(durable[-1] if durable else "absent")
            assert got in allowed, (
                f"sector {sector}: read {got!r:.40} but allowed only "
                f"{[a if not isinstance(a, bytes) else a[:1] for a in allowed]}")
    finally:
        cf.close(clean=False)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_power_cut_states(tmp_path: Path, seed: int) -> None:
    src = str(tmp_path / "src.lbd")
    log = run_workload(src, seed, n_ops=250)
    ops = RecordingIO.ops
    rng = random.Random(seed * 1000)
    crash_points = sorted(rng.randrange(1, len(ops) + 1) for _ in range(300))
    target = str(tmp_path / "crash.lbd")
    for k in crash_points:
        img, sync_index = build_state(ops, k, rng)
        check_state(img, target, log, sync_index)
    os.unlink(target)


def test_power_cut_across_a_journal_area_boundary(tmp_path: Path) -> None:
    """1100 one-sector writes cross from the first journal area into the next."""
    src = str(tmp_path / "src.lbd")
    RecordingIO.ops = []
    cf = ChangeFile.create(src, SIZE, Identity(), io_factory=RecordingIO)
    log = []
    for i in range(1100):
        data = bytes([i % 250 + 1]) * SECTOR
        cf.write(i * 3, [data], SECTOR)
        log.append((len(RecordingIO.ops), i * 3, 1, data))
        if i % 97 == 0:
            cf.sync()
    cf.close(clean=False)
    ops = RecordingIO.ops
    next_idx = next(i for i, op in enumerate(ops) if op[0] == "a" and i > 5)
    rng = random.Random(5)
    target = str(tmp_path / "crash.lbd")
    for k in range(next_idx - 20, min(len(ops), next_idx + 60)):
        for _ in range(5):
            img, sync_index = build_state(ops, k, rng)
            check_state(img, target, log, sync_index)
