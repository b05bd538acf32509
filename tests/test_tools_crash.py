"""Crash points of lbd-merge and lbd-compact, through the FileIO seam.

The tools do every write, sync, rename and delete through
:class:`~lbd.layers.fileio.FileIO`.  ``CrashingIO`` lets a run get N of
those operations done and then fails every later one, as if the process had
been killed there (what was written stays, nothing more happens; cleanup
handlers cannot write either).  After each crash point the files must be in
one of three states: untouched, completely merged, or half-merged *with the
intent record present* (the layers then refuse the target and a re-run
finishes the job).  Never half-applied without the tool knowing it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from lbd.layers.fileio import Buffer, FileIO
from lbd.layers.flat import FlatLayer
from lbd.tools.compact import CompactOptions, compact
from lbd.tools.merge import MergeOptions, merge
from toolsupport import MiB, Stack

from lbd.config import LayerSpec, build_device
from lbd.errors import ConfigError

SIZE = 16 * MiB


class Crash(Exception):
    pass


class CrashingIO(FileIO):
    budget: int | None = None  # operations allowed before the "kill"
    count = 0
    kernel_copy = False  # copies go through pwritev, so crashes land inside them

    @classmethod
    def _tick(cls) -> None:
        cls.count += 1
        if cls.budget is not None and cls.count > cls.budget:
            raise Crash(f"killed at operation {cls.budget}")

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        self._tick()
        super().pwritev(buffers, offset)

    def fdatasync(self) -> None:
        self._tick()
        super().fdatasync()

    def truncate(self, length: int) -> None:
        self._tick()
        super().truncate(length)

    def punch_hole(self, offset: int, length: int) -> bool:
        self._tick()
        return super().punch_hole(offset, length)

    def zero_range(self, offset: int, length: int) -> bool:
        self._tick()
        return super().zero_range(offset, length)

    @classmethod
    def replace(cls, src: str, dst: str) -> None:
        cls._tick()
        super().replace(src, dst)

    @classmethod
    def remove(cls, path: str) -> None:
        cls._tick()
        super().remove(path)


def device_bytes(specs: list[tuple[str, str]]) -> bytes:
    """What a stack reads as, through the engine (read-only layers)."""
    dev = build_device(SIZE, [LayerSpec(kind, path, False) for kind, path in specs],
                       force=True)
    try:
        return bytes(dev.read(0, SIZE))
    finally:
        dev.close()


def run_counted(fn, budget: int | None):  # type: ignore[no-untyped-def]
    CrashingIO.count = 0
    CrashingIO.budget = budget
    try:
        return fn()
    finally:
        CrashingIO.budget = None


def crash_points(total: int) -> list[int]:
    return list(range(total)) if total <= 80 else sorted(
        set(range(0, total, max(1, total // 60))) | {total - 1, total - 2})


@pytest.fixture
def stack(tmp_path: Path, lbd_server) -> Stack:  # type: ignore[no-untyped-def]
    st = Stack(tmp_path, SIZE, seed=21)
    st.add_layer(lbd_server, "c1.lbd", n_writes=10)
    st.add_layer(lbd_server, "c2.lbd", n_writes=10)
    return st


def _fresh(st: Stack, work: Path) -> tuple[Path, Path, Path]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    assert st.base is not None
    files = []
    for p in (st.base, *st.changes):
        shutil.copyfile(p, work / p.name)
        files.append(work / p.name)
    return files[0], files[1], files[2]


def test_merge_into_the_base_at_every_crash_point(stack: Stack, tmp_path: Path) -> None:
    work = tmp_path / "w"
    expected = bytes(stack.expected)
    base, c1, c2 = _fresh(stack, work)
    pristine = base.read_bytes()

    def do(io: type[FileIO] = CrashingIO) -> list[str]:
        return merge(MergeOptions(base=str(base), changes=[str(c1), str(c2)], command="x"), io)

    run_counted(do, None)
    total = CrashingIO.count
    assert base.read_bytes() == expected
    seen = set()
    for n in crash_points(total):
        base, c1, c2 = _fresh(stack, work)
        with pytest.raises(Crash):
            run_counted(do, n)
        intent = Path(str(base) + ".lbd-merge")
        now = base.read_bytes()
        if intent.exists():
            seen.add("half")
            with pytest.raises(ConfigError, match="interrupted"):
                FlatLayer(str(base), SIZE, False)
            report = do(FileIO)
            assert any("resuming" in line for line in report)
            assert base.read_bytes() == expected, f"crash at {n}: re-run did not finish"
        elif now == pristine:
            seen.add("untouched")
        else:
            assert now == expected, f"crash at {n}: base changed but no intent record"
            seen.add("done")
    assert {"half", "untouched"} <= seen


def test_merge_into_a_change_file_at_every_crash_point(stack: Stack, tmp_path: Path) -> None:
    work = tmp_path / "w"
    assert stack.base is not None
    expected = bytes(stack.expected)
    base, c1, c2 = _fresh(stack, work)
    before = device_bytes([("flat", str(base)), ("expandable", str(c1))])

    def do(io: type[FileIO] = CrashingIO) -> list[str]:
        return merge(MergeOptions(base=None, changes=[str(c1), str(c2)], command="x"), io)

    run_counted(do, None)
    total = CrashingIO.count
    assert device_bytes([("flat", str(base)), ("expandable", str(c1))]) == expected
    seen = set()
    for n in crash_points(total):
        base, c1, c2 = _fresh(stack, work)
        with pytest.raises(Crash):
            run_counted(do, n)
        if Path(str(c1) + ".lbd-merge").exists():
            seen.add("half")
            with pytest.raises(ConfigError, match="interrupted"):
                device_bytes([("flat", str(base)), ("expandable", str(c1))])
            do(FileIO)
            now = device_bytes([("flat", str(base)), ("expandable", str(c1))])
            assert now == expected, f"crash at {n}: the re-run did not finish the merge"
        else:
            now = device_bytes([("flat", str(base)), ("expandable", str(c1))])
            assert now in (before, expected), f"crash at {n}: changed without a record"
            seen.add("untouched" if now == before else "done")
    assert "half" in seen


def test_compaction_at_every_crash_point(stack: Stack, tmp_path: Path) -> None:
    work = tmp_path / "w"
    base, c1, c2 = _fresh(stack, work)
    want = device_bytes([("flat", str(base)), ("expandable", str(c1))])

    def do(io: type[FileIO] = CrashingIO) -> list[str]:
        return compact(CompactOptions(path=str(c1)), io)

    run_counted(do, None)
    total = CrashingIO.count
    for n in crash_points(total):
        base, c1, c2 = _fresh(stack, work)
        with pytest.raises(Crash):
            run_counted(do, n)
        # the file is the old one or the new one, whole; c2 still fits on it (same id)
        now = device_bytes([("flat", str(base)), ("expandable", str(c1))])
        assert now == want, f"crash at {n}"
        device_bytes([("flat", str(base)), ("expandable", str(c1)), ("expandable", str(c2))])
        do(FileIO)  # a re-run (leftover temporary file and all) completes
        assert device_bytes([("flat", str(base)), ("expandable", str(c1))]) == want
        assert not os.path.exists(str(c1) + ".lbd-tmp")
