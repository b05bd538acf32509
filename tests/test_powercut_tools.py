"""Power cuts during ``lbd-merge`` and ``lbd-compact``.

``tests/test_tools_crash.py`` kills the tools at every I/O operation (a
process crash: everything written stays).  This is the power cut: the tools
do all their file I/O through the FileIO seam, which is recorded here per
file (writes, size changes, hole punching, syncs) together with creations,
renames and deletions (which the seam makes durable at once, with a
directory sync).  A crash state keeps, for each file, everything up to *its
own* last completed sync and any subset of its later writes, each whole,
missing, torn or sector by sector.  Each state must hold the tool's
promise:

* compaction: the change file reads exactly as before, old or new;
* merge into the base or into a change file: without the intent record the
  target is untouched or completely merged; with it, the layers refuse the
  target and a re-run of the same merge finishes the job.

``LBD_LONG_TESTS=1`` checks ten times as many crash states.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from lbd.layers.fileio import Buffer, FileIO
from lbd.tools.compact import CompactOptions, compact
from lbd.tools.merge import MergeOptions, merge
from toolsupport import MiB, Stack

from lbd.config import LayerSpec, build_device
from lbd.errors import ConfigError

SIZE = 8 * MiB
SECTOR = 512
LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
STATES = 400 if LONG else 40  # crash points drawn at random (all, when fewer ops)
REPS = 20 if LONG else 2  # crash states per crash point


class Disk:
    """The model: files (inodes) with their operations, and the names."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.initial: dict[int, bytes] = {}
        self.names: dict[str, int] = {}  # live names, as the tool sees them
        self.initial_names: dict[str, int] = {}
        self.ops: list[tuple] = []
        for p in sorted(root.iterdir()):
            self._inode_for(str(p))
        self.initial_names = dict(self.names)

    def _inode_for(self, path: str) -> int:
        if path not in self.names:
            ino = len(self.initial) + 1000 * len(self.ops) + 1
            self.initial[ino] = Path(path).read_bytes() if os.path.exists(path) else b""
            self.names[path] = ino
            self.initial_names.setdefault(path, ino)
        return self.names[path]

    def created(self, path: str) -> int:
        ino = 10**9 + len(self.ops)
        self.initial[ino] = b""
        self.names[path] = ino
        self.ops.append(("c", path, ino))
        return ino

    def renamed(self, src: str, dst: str) -> None:
        self.names[dst] = self.names.pop(src)
        self.ops.append(("r", src, dst))

    def removed(self, path: str) -> None:
        if path in self.names:
            del self.names[path]
            self.ops.append(("d", path))


DISK: Disk | None = None


class PowerIO(FileIO):
    """FileIO recording every operation in ``DISK``."""

    kernel_copy = False  # copies go through pwritev, so they are recorded

    def __init__(self, path: str, *, writable: bool, create: bool = False) -> None:
        super().__init__(path, writable=writable, create=create)
        assert DISK is not None
        self.ino = DISK.created(path) if create else DISK._inode_for(path)

    def _op(self, *op: object) -> None:
        assert DISK is not None
        DISK.ops.append(op)

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        self._op("w", self.ino, offset, b"".join(bytes(b) for b in buffers))
        super().pwritev(buffers, offset)

    def truncate(self, length: int) -> None:
        self._op("t", self.ino, length)
        super().truncate(length)

    def punch_hole(self, offset: int, length: int) -> bool:
        done = super().punch_hole(offset, length)
        if done:
            self._op("z", self.ino, offset, length)
        return done

    def zero_range(self, offset: int, length: int) -> bool:
        done = super().zero_range(offset, length)
        if done:
            self._op("z", self.ino, offset, length)
        return done

    def fdatasync(self) -> None:
        self._op("s", self.ino)
        super().fdatasync()

    def fsync(self) -> None:
        self._op("s", self.ino)
        super().fsync()

    @classmethod
    def replace(cls, src: str, dst: str) -> None:
        assert DISK is not None
        super().replace(src, dst)
        DISK.renamed(src, dst)

    @classmethod
    def remove(cls, path: str) -> None:
        assert DISK is not None
        existed = os.path.exists(path)
        super().remove(path)
        if existed:
            DISK._inode_for(path)
            DISK.removed(path)


def crash_state(disk: Disk, k: int, rng: random.Random, dest: Path) -> None:
    """Write into ``dest`` the files as a power cut after ``disk.ops[:k]`` leaves them."""
    names = dict(disk.initial_names)
    per_file: dict[int, list[tuple]] = {}
    for op in disk.ops[:k]:
        if op[0] == "c":
            names[op[1]] = op[2]
        elif op[0] == "r":
            names[op[2]] = names.pop(op[1])
        elif op[0] == "d":
            names.pop(op[1], None)
        else:
            per_file.setdefault(op[1], []).append(op)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    chaos = rng.random()
    for name, ino in names.items():
        data = bytearray(disk.initial[ino])
        ops = per_file.get(ino, [])
        last_sync = max((i for i, op in enumerate(ops) if op[0] == "s"), default=-1)

        def apply(op: tuple, data: bytearray = data, part: str = "all") -> None:
            kind = op[0]
            if kind in ("t", "a"):
                if op[2] > len(data):
                    data.extend(bytes(op[2] - len(data)))
                elif kind == "t":
                    del data[op[2]:]
                return
            if kind == "s":
                return
            off = op[2]
            payload = op[3] if kind == "w" else bytes(op[3])
            pieces = [(off, payload)]
            if part == "prefix":
                pieces = [(off, payload[:rng.randrange(len(payload) + 1)])]
            elif part == "sectors":
                pieces = []
                for pos in range(0, len(payload), SECTOR):
                    r = rng.random()
                    if r < 0.5:
                        pieces.append((off + pos, payload[pos:pos + SECTOR]))
                    elif r < 0.6:
                        pieces.append((off + pos, payload[pos:pos + rng.randrange(SECTOR)]))
            for o, b in pieces:
                if o + len(b) > len(data):
                    data.extend(bytes(o + len(b) - len(data)))
                data[o:o + len(b)] = b

        for op in ops[:last_sync + 1]:
            apply(op)
        for op in ops[last_sync + 1:]:
            r = rng.random()
            if op[0] in ("t", "a"):
                if r < 0.7:
                    apply(op)
            elif r < 0.35 + 0.3 * chaos:
                apply(op)
            elif r < 0.6:
                pass
            elif r < 0.8:
                apply(op, part="prefix")
            else:
                apply(op, part="sectors")
        target = dest / Path(name).name
        target.write_bytes(bytes(data))


def device_bytes(specs: list[tuple[str, Path]]) -> bytes:
    dev = build_device(SIZE, [LayerSpec(kind, str(p), False) for kind, p in specs], force=True)
    try:
        return bytes(dev.read(0, SIZE))
    finally:
        dev.close()


@pytest.fixture
def stack(tmp_path: Path, lbd_server) -> Stack:  # type: ignore[no-untyped-def]
    st = Stack(tmp_path, SIZE, seed=23)
    st.add_layer(lbd_server, "c1.lbd", n_writes=10)
    st.add_layer(lbd_server, "c2.lbd", n_writes=10)
    return st


def recorded_run(stack: Stack, work: Path, fn) -> Disk:  # type: ignore[no-untyped-def]
    """Copy the stack into ``work``, run ``fn(base, c1, c2)`` with PowerIO, return the record."""
    global DISK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    assert stack.base is not None
    for p in (stack.base, *stack.changes):
        shutil.copyfile(p, work / p.name)
    DISK = Disk(work)
    try:
        fn(work / "base.img", work / "c1.lbd", work / "c2.lbd")
    finally:
        disk, DISK = DISK, None
    return disk


def crash_points(disk: Disk, rng: random.Random, n: int) -> list[int]:
    """Every operation once if few, else ``n`` drawn at random, the syncs and names always."""
    total = len(disk.ops)
    special = {i + d for i, op in enumerate(disk.ops) if op[0] in ("s", "r", "d", "c")
               for d in (0, 1)}
    points = sorted(special | {rng.randrange(total + 1) for _ in range(n)})
    return [k for k in points if 0 <= k <= total]


def test_power_cut_during_compaction(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(31)
    disk = recorded_run(stack, tmp_path / "w",
                        lambda b, c1, c2: compact(CompactOptions(path=str(c1)), PowerIO))
    want = device_bytes([("flat", stack.base), ("expandable", stack.changes[0])])
    assert any(op[0] == "r" for op in disk.ops), "compaction renamed nothing"
    checked = 0
    for k in crash_points(disk, rng, STATES):
        for _ in range(REPS):
            d = tmp_path / "crash"
            crash_state(disk, k, rng, d)
            got = device_bytes([("flat", d / "base.img"), ("expandable", d / "c1.lbd")])
            assert got == want, f"power cut after operation {k} of {len(disk.ops)}"
            # the file above still fits (the same id), and a re-run completes
            device_bytes([("flat", d / "base.img"), ("expandable", d / "c1.lbd"),
                          ("expandable", d / "c2.lbd")])
            compact(CompactOptions(path=str(d / "c1.lbd")), FileIO)
            assert device_bytes([("flat", d / "base.img"), ("expandable", d / "c1.lbd")]) \
                == want
            checked += 1
    print(f"\ncompaction: {checked} power-cut states over {len(disk.ops)} operations")


@pytest.mark.parametrize("into", ["base", "change file"])
def test_power_cut_during_merge(stack: Stack, tmp_path: Path, into: str) -> None:
    rng = random.Random(32 if into == "base" else 33)
    expected = bytes(stack.expected)

    def do(b: Path, c1: Path, c2: Path, io: type[FileIO] = PowerIO) -> None:
        if into == "base":
            merge(MergeOptions(base=str(b), changes=[str(c1), str(c2)], command="x"), io)
        else:
            merge(MergeOptions(base=None, changes=[str(c1), str(c2)], command="x"), io)

    work = tmp_path / "w"
    disk = recorded_run(stack, work, do)
    target_name = "base.img" if into == "base" else "c1.lbd"

    def view(d: Path) -> list[tuple[str, Path]]:
        """The merge target as the device sees it: the base, or the base and c1."""
        return [("flat", d / "base.img")] + ([] if into == "base" else
                                             [("expandable", d / "c1.lbd")])

    assert device_bytes(view(work)) == expected
    assert stack.base is not None
    before = device_bytes(view(stack.base.parent))
    seen: dict[str, int] = {}
    for k in crash_points(disk, rng, STATES):
        for _ in range(REPS):
            d = work  # the same paths: the intent record names them
            crash_state(disk, k, rng, d)
            base, c1, c2 = d / "base.img", d / "c1.lbd", d / "c2.lbd"
            target = d / target_name
            if Path(str(target) + ".lbd-merge").exists():
                seen["half"] = seen.get("half", 0) + 1
                with pytest.raises(ConfigError, match="interrupted"):
                    device_bytes(view(d))
                do(base, c1, c2, FileIO)
                assert device_bytes(view(d)) == expected, \
                    f"power cut after {k}: the re-run did not finish"
            else:
                now = device_bytes(view(d))
                if now == before:
                    # untouched: the whole stack still reads as expected
                    whole = device_bytes([("flat", base), ("expandable", c1),
                                          ("expandable", c2)])
                    assert whole == expected, f"power cut after {k}: the stack was damaged"
                    seen["untouched"] = seen.get("untouched", 0) + 1
                else:
                    assert now == expected, \
                        f"power cut after {k} of {len(disk.ops)}: {target_name} changed " \
                        "but no intent record says so"
                    seen["done"] = seen.get("done", 0) + 1
    print(f"\nmerge into the {into}: {sum(seen.values())} power-cut states over "
          f"{len(disk.ops)} operations: {seen}")
    assert seen.get("half") and seen.get("untouched")
