"""The change-file format on real files: replay, index snapshots, torn tails."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lbd.layers import changefile as cfmod
from lbd.layers.changefile import AREA_SLOTS, ENTRY_SIZE, ChangeFile
from lbd.layers.fileio import FileIO

from lbd import extentmap
from lbd.errors import ConfigError, CorruptionError
from lbd.layer import Identity

SECTOR = 512
MiB = 1 << 20


def read(cf: ChangeFile, sector: int, count: int) -> bytes | None:
    """Bytes of a fully present range, or None where absent (zeros for zero)."""
    out = bytearray()
    for _s, n, loc in cf.lookup(sector, count):
        if loc is None:
            return None
        out += bytes(n * SECTOR) if loc == cfmod.ZERO else cf.io.pread(n * SECTOR, loc)
    return bytes(out)


def pattern(i: int, n: int = 4096) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4))[:n]


def test_write_reopen_replays_the_journal(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    for i in range(50):
        cf.write(i * 16, [pattern(i)], 4096)
    cf.zero(8, 4)
    cf.close(clean=False)  # like kill -9: no index snapshot
    cf = ChangeFile.open(p, writable=False)
    assert cf.header.index_area == 0
    for i in range(50):
        got = read(cf, i * 16, 8)
        assert got == pattern(i), i
    assert read(cf, 8, 4) == bytes(4 * SECTOR)
    assert read(cf, 12, 4) is None  # never written: falls through
    cf.close()


def test_clean_close_writes_an_index_snapshot(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    for i in range(10):
        cf.write(i * 8, [pattern(i)], 4096)
    cf.close()
    cf = ChangeFile.open(p, writable=True)
    assert cf.header.index_area != 0
    cf.write(200, [pattern(99)], 4096)  # after the snapshot: replayed from the journal
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False)
    assert [read(cf, i * 8, 8) for i in range(10)] == [pattern(i) for i in range(10)]
    assert read(cf, 200, 8) == pattern(99)
    st = cf.stats()
    assert st.live_bytes == 11 * 4096 and st.dead_bytes == 0
    cf.close()


def test_many_entries_span_journal_areas(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    n = AREA_SLOTS * 2 + 10
    rng = random.Random(3)
    expect: dict[int, bytes] = {}
    for i in range(n):
        sector = rng.randrange(0, 64 * MiB // SECTOR - 1)
        data = pattern(i, SECTOR)
        cf.write(sector, [data], SECTOR)
        expect[sector] = data
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False)
    for sector, data in expect.items():
        assert read(cf, sector, 1) == data
    st = cf.stats()
    assert st.live_bytes == len(expect) * SECTOR
    # no sync happened: rewrites of a sector went in place, nothing is dead
    assert st.dead_bytes == 0
    cf.close()


@pytest.fixture(params=["block-dict", "no-block-dict"])
def block_dict(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole 4 KiB blocks held in the map's block dict, or (when it is full) not."""
    if request.param == "no-block-dict":
        monkeypatch.setattr(extentmap, "BLOCKS_MAX", 0)


def test_rewrites_go_in_place_until_a_sync(tmp_path: Path, block_dict: None) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    for i in range(10):
        cf.write(0, [pattern(i)], 4096)  # same extent: rewritten in place
    assert cf.stats().data_bytes == 4096
    cf.sync()
    cf.write(0, [pattern(10)], 4096)  # synced data is never overwritten: append
    cf.write(0, [pattern(11)], 4096)  # ...but that new copy is unsynced again
    cf.write(8, [pattern(12)], 4096)
    st = cf.stats()
    assert (st.data_bytes, st.live_bytes, st.dead_bytes) == (3 * 4096, 2 * 4096, 4096)
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False)
    assert read(cf, 0, 8) == pattern(11) and read(cf, 8, 8) == pattern(12)
    assert cf.stats().dead_bytes == 4096
    cf.close()


def test_in_place_needs_a_whole_unsynced_payload(tmp_path: Path, block_dict: None) -> None:
    """Only a payload of exactly the same size, written since the last sync
    started (or the file was opened), is rewritten in place."""
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    cf.write(0, [pattern(1, 65536)], 65536)
    cf.write(0, [pattern(2)], 4096)  # part of a larger payload: appended
    assert cf.stats().data_bytes == 65536 + 4096
    cf.write(0, [pattern(3)], 4096)  # the whole 4 KiB payload just appended: in place
    cf.write(16, [pattern(4, 8192)], 8192)  # 8 KiB over 8 KiB of the first payload
    cf.write(16, [pattern(5, 8192)], 8192)  # the same 8 KiB again: in place
    assert cf.stats().data_bytes == 65536 + 4096 + 8192
    cf.close()  # clean: the next open loads the index snapshot
    cf = ChangeFile.open(p, writable=True)
    cf.write(0, [pattern(6)], 4096)  # held since before the open: appended
    cf.write(16, [pattern(7, 8192)], 8192)
    assert cf.stats().data_bytes == 65536 + 4096 + 8192 + 4096 + 8192
    cf.write(0, [pattern(8)], 4096)  # written since the open: in place
    assert cf.stats().data_bytes == 65536 + 4096 + 8192 + 4096 + 8192
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False)
    assert read(cf, 0, 8) == pattern(8)
    assert read(cf, 8, 8) == pattern(1, 65536)[4096:8192]
    assert read(cf, 16, 16) == pattern(7, 8192)
    assert read(cf, 32, 96) == pattern(1, 65536)[16384:]
    cf.close()


@pytest.mark.parametrize("fast", [True, False], ids=["os.pwrite", "pwritev-seam"])
def test_failed_rewrite_in_a_batch_loses_nothing_else(tmp_path: Path, fast: bool) -> None:
    """The second of three in-place rewrites of a batch fails (EIO): the
    first landed, the second and third are vouched for as what is on disk,
    and writes after them survive a replay (the journal is not cut)."""
    p = str(tmp_path / "c.lbd")
    fail_at: list[int] = []

    class FailingIO(FileIO):
        if not fast:  # the general path: pwrite_each goes through pwritev
            def pwritev(self, buffers, offset):  # type: ignore[no-untyped-def]
                if offset in fail_at:
                    raise OSError(errno.EIO, "injected")
                super().pwritev(buffers, offset)

    cf = ChangeFile.create(p, 64 * MiB, Identity(), io_factory=FailingIO)
    for i in range(3):
        cf.write(i * 8, [pattern(i)], 4096)
    loc1 = cf.lookup(8, 8)[0][2]
    if fast:  # the fast path calls os.pwrite itself: fail it there
        real = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if offset == loc1:
                raise OSError(errno.EIO, "injected")
            return real(fd, data, offset)
        patch = pytest.MonkeyPatch()
        patch.setattr(os, "pwrite", pwrite)
    else:
        fail_at.append(loc1)
    try:
        with pytest.raises(OSError):
            cf.write_blocks([(i * 4096, memoryview(pattern(10 + i))) for i in range(3)])
    finally:
        if fast:
            patch.undo()
        fail_at.clear()
    cf.write(64, [pattern(20)], 4096)  # a later write
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False, verify=True)
    assert cf.dropped_tail == 0
    assert read(cf, 0, 8) == pattern(10)  # landed before the failure
    assert read(cf, 8, 8) == pattern(1)  # the failed rewrite: the old bytes are still there
    assert read(cf, 16, 8) == pattern(2)  # after it in the batch: never written
    assert read(cf, 64, 8) == pattern(20)
    cf.close()


def test_in_place_rewrite_interrupted_before_its_data(tmp_path: Path) -> None:
    """Killed between a rewrite's entry and its data: the older write survives."""
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    cf.write(0, [pattern(1)], 4096)
    cf.write(64, [pattern(2)], 4096)
    loc = cf.lookup(0, 8)[0][2]
    cf.write(0, [pattern(3)], 4096)  # in place
    cf.close(clean=False)
    with open(p, "r+b") as f:  # put the old data back: as if the process died before it
        f.seek(loc)
        f.write(pattern(1))
    cf = ChangeFile.open(p, writable=False)
    assert cf.dropped_tail == 1
    assert read(cf, 0, 8) == pattern(1) and read(cf, 64, 8) == pattern(2)
    cf.close()


def _slot_offset(cf: ChangeFile, seq: int) -> int:
    """File offset of the entry with a given seq in the first journal area."""
    return cf.header.journal_start + (seq - 1) * ENTRY_SIZE


def test_torn_payload_after_last_sync_is_dropped(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    for i in range(5):
        cf.write(i * 8, [pattern(i)], 4096)
    cf.sync()
    for i in range(5, 8):
        cf.write(i * 8, [pattern(i)], 4096)
    loc6 = cf.lookup(6 * 8, 8)[0][2]
    cf.close(clean=False)
    with open(p, "r+b") as f:  # the payload of entry 7 never fully reached the disk
        f.seek(loc6 + 1000)
        f.write(b"\xee" * 100)
    cf = ChangeFile.open(p, writable=True)
    assert cf.dropped_tail == 2  # entry 7 and everything after it
    assert [read(cf, i * 8, 8) for i in range(6)] == [pattern(i) for i in range(6)]
    assert read(cf, 6 * 8, 8) is None and read(cf, 7 * 8, 8) is None
    # the freed slots are reused; the stale entry 8 must never come back
    cf.write(100, [pattern(42)], 4096)
    cf.close(clean=False)
    cf = ChangeFile.open(p, writable=False)
    assert read(cf, 7 * 8, 8) is None
    assert read(cf, 100, 8) == pattern(42)
    cf.close()


def test_corrupt_synced_payload_is_an_error_not_data(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    cf.write(0, [pattern(1)], 4096)
    cf.sync()
    cf.write(8, [pattern(2)], 4096)  # carries "entry 1 is durable"
    loc = cf.lookup(0, 8)[0][2]
    cf.close(clean=False)
    with open(p, "r+b") as f:
        f.seek(loc)
        f.write(b"\x00" * 16)
    with pytest.raises(CorruptionError, match="fails its checksum"):
        ChangeFile.open(p, writable=False, verify=True)


def test_garbage_entry_ends_the_journal(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    for i in range(4):
        cf.write(i * 8, [pattern(i)], 4096)
    off = _slot_offset(cf, 3)
    cf.close(clean=False)
    with open(p, "r+b") as f:
        f.seek(off + 20)
        f.write(b"\x01")
    cf = ChangeFile.open(p, writable=False)
    assert read(cf, 0, 8) == pattern(0) and read(cf, 8, 8) == pattern(1)
    assert read(cf, 16, 8) is None and read(cf, 24, 8) is None
    cf.close()


def test_header_copies(tmp_path: Path) -> None:
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    cf.write(0, [pattern(1)], 4096)
    cf.close()  # writes header generation 1 into slot B
    with open(p, "r+b") as f:  # damage slot B: slot A (generation 0) still opens
        f.seek(512 + 100)
        f.write(b"\xff\xff")
    cf = ChangeFile.open(p, writable=False)
    assert cf.header.index_area == 0 and read(cf, 0, 8) == pattern(1)
    cf.close()
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(CorruptionError, match="both header copies"):
        ChangeFile.open(p, writable=False)


def test_not_a_change_file(tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"hello" * 200)
    with pytest.raises(ConfigError, match="not an LBD change file"):
        ChangeFile.open(str(p), writable=False)
    v1 = tmp_path / "v1"
    v1.write_bytes(bytes(504) + bytes.fromhex("4c42445801010101"))
    assert cfmod.detect(str(v1)) == "v1"


class CountingIO(FileIO):
    bytes_read = 0

    def pread(self, length: int, offset: int) -> bytes:
        data = super().pread(length, offset)
        CountingIO.bytes_read += len(data)
        return data


def test_open_cost_is_proportional_to_what_was_written(tmp_path: Path) -> None:
    """A 1 TiB device with 4 MiB written reads a few MiB to open, not the device."""
    p = str(tmp_path / "big.lbd")
    tib = 1 << 40
    cf = ChangeFile.create(p, tib, Identity())
    rng = random.Random(7)
    for i in range(1024):
        cf.write(rng.randrange(0, tib // SECTOR - 8) & ~7, [pattern(i)], 4096)
    cf.close(clean=False)
    CountingIO.bytes_read = 0
    cf = ChangeFile.open(p, writable=False, io_factory=CountingIO)
    assert cf.stats().live_bytes <= 4 * MiB
    assert CountingIO.bytes_read < 8 * MiB, CountingIO.bytes_read
    assert len(cf.map._chunks) <= 1024
    cf.close()
    assert os.stat(p).st_blocks * 512 < 16 * MiB  # allocated space, not the sparse size


# Batches of writes as the NBD frontend hands them over (write_blocks), with
# repeats inside a batch, mixed sizes, zeroing and syncs between batches.
batch_ops = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.lists(
            st.tuples(st.integers(0, 47), st.sampled_from([1, 8, 8, 8, 16, 24])),
            min_size=1, max_size=12)),
        st.tuples(st.just("sync"), st.just([])),
        st.tuples(st.just("zero"), st.lists(
            st.tuples(st.integers(0, 47), st.sampled_from([1, 8, 16])), min_size=1, max_size=1)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(batch_ops, st.sampled_from([0, 2, 1 << 19]))
def test_write_batches_match_a_model(tmp_path: Path, ops: list, limit: int) -> None:
    """Every batch reads back as a per-sector model says: live, after a
    replay of the journal, and from the index snapshot."""
    saved = extentmap.BLOCKS_MAX
    extentmap.BLOCKS_MAX = limit
    p = str(tmp_path / f"m{limit}-{os.urandom(4).hex()}.lbd")
    try:
        cf = ChangeFile.create(p, MiB, Identity())
        model: dict[int, bytes] = {}
        n = 0
        for kind, items in ops:
            if kind == "sync":
                cf.sync()
                continue
            if kind == "zero":
                for b, count in items:
                    cf.zero(b * 8, count)
                    model.update(dict.fromkeys(range(b * 8, b * 8 + count), bytes(SECTOR)))
                continue
            batch = []
            for b, count in items:
                n += 1
                data = pattern(n, count * SECTOR)
                batch.append((b * 8 * SECTOR, memoryview(data)))
                for i in range(count):
                    model[b * 8 + i] = data[i * SECTOR:(i + 1) * SECTOR]
            cf.write_blocks(batch)
            for sector, data in model.items():
                assert read(cf, sector, 1) == data, (sector, kind)
        live = cf.stats().live_bytes
        cf.close(clean=False)
        for step in ("replay", "snapshot", "replay-ignoring-snapshot"):
            cf = ChangeFile.open(p, writable=False, use_index=step == "snapshot")
            for sector, data in model.items():
                assert read(cf, sector, 1) == data, step
            assert cf.stats().live_bytes == live, step
            cf.close()
            if step == "replay":  # a clean close of a writable open writes a snapshot
                ChangeFile.open(p, writable=True).close()
    finally:
        extentmap.BLOCKS_MAX = saved
        if os.path.exists(p):
            os.unlink(p)


class _Recording(FileIO):
    """Records the size of every write that reaches pwritev."""

    def __init__(self, path: str, **kw: bool) -> None:
        super().__init__(path, **kw)
        self.sizes: list[int] = []

    def pwritev(self, buffers, offset: int) -> None:  # type: ignore[no-untyped-def]
        self.sizes.append(sum(map(len, buffers)))
        super().pwritev(buffers, offset)


def test_appended_payloads_go_to_the_kernel_in_small_pieces(tmp_path: Path) -> None:
    """pwritev_pieces: the same bytes as one pwritev, in calls that keep folios small.

    The page cache sizes a folio by the write that creates it, and on ext4
    with large folios a later 4 KiB rewrite costs time in proportion to its
    folio; so small payloads go out at most SMALL_PIECE bytes a call and a
    large one in LARGE_PIECE pieces.
    """
    from lbd.layers import fileio

    io = _Recording(str(tmp_path / "f"), writable=True, create=True)
    rng = random.Random(7)
    bufs = [rng.randbytes(n) for n in (4096, 4096, 512, 4096, 8192, 4096, 200_000, 4096,
                                       fileio.SMALL_PIECE, 1536, fileio.SMALL_PIECE + 512)]
    io.pwritev_pieces(bufs, 8192)
    assert io.pread(sum(map(len, bufs)), 8192) == b"".join(bufs)
    assert sum(io.sizes) == sum(map(len, bufs))
    # the calls, in order: small payloads grouped up to SMALL_PIECE, large ones cut
    assert io.sizes == [12800, 12288, 65536, 65536, 65536, 3392, 4096, 16384, 1536,
                        16896]
    io.close()


def test_a_batch_of_new_blocks_reaches_the_file_in_small_pieces(tmp_path: Path) -> None:
    from lbd.layers import fileio

    p = str(tmp_path / "c.lbd")
    ChangeFile.create(p, 64 * MiB, Identity()).close()
    cf = ChangeFile.open(p, writable=True, io_factory=_Recording)
    io = cf.io
    assert isinstance(io, _Recording)
    io.sizes.clear()
    batch = [(i * 4096, pattern(i)) for i in range(0, 64, 2)]  # 32 new blocks, 128 KiB
    cf.write_blocks(batch)
    data = [n for n in io.sizes if n >= 4096]  # the payloads (entries are smaller)
    assert sum(data) == 32 * 4096 and max(data) <= fileio.SMALL_PIECE
    cf.close()
    cf = ChangeFile.open(p, writable=False)
    for off, d in batch:
        assert read(cf, off // SECTOR, 8) == d
    cf.close()


def test_rewrites_across_syncs_recycle_dead_payloads(tmp_path: Path) -> None:
    """A database's pattern: the same blocks rewritten, fsync, rewritten again.
    Without recycling every round appends; with it the file stops growing,
    and it reopens (and verifies) with the last round's data."""
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 64 * MiB, Identity())
    blocks = range(0, 256, 4)  # 64 blocks of 4 KiB, 16 KiB apart
    for rnd in range(40):
        cf.write_blocks([(b * 4096, pattern(rnd * 1000 + b)) for b in blocks])
        cf.sync()
    used = cf.end
    assert cf.recycled_bytes >= 30 * 64 * 4096, cf.recycled_bytes
    # 40 rounds would append 10 MiB; a few rounds' worth of payloads is all it holds
    assert used < 5 * 64 * 4096 + 2 * cfmod.AREA_SIZE, used
    cf.close()
    cf = ChangeFile.open(p, writable=False, verify=True, use_index=False)
    for b in blocks:
        assert read(cf, b * 8, 8) == pattern(39 * 1000 + b)
    st = cf.stats()
    assert st.live_bytes == 64 * 4096
    cf.close(clean=False)


def test_recycling_waits_until_the_kill_is_vouched_for(tmp_path: Path) -> None:
    """A dead payload is reused only once an entry saying that the write that
    made it dead is durable is itself durable.  Here that write lands while a
    sync is in its fdatasync: its entry vouches only for what came before, so
    after the next sync a crash could still leave the journal unvouched up to
    the old payload's entry, which is then checked: it must still be intact."""
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 16 * MiB, Identity())
    cf.write_blocks([(0, pattern(1)), (4096, pattern(2))])
    l0 = cf.lookup(0, 8)[0][2]
    real = cf.io.fdatasync

    def with_a_rewrite() -> None:
        cf.io.fdatasync = real  # type: ignore[method-assign]
        cf.write_blocks([(0, pattern(3))])  # block 0 leaves l0, during the sync
        real()

    cf.io.fdatasync = with_a_rewrite  # type: ignore[method-assign]
    cf.sync()
    cf.sync()  # the rewrite is durable now, but no durable entry says so
    cf.write_blocks([(4096, pattern(4))])  # block 1: synced, so it moves
    assert cf.lookup(8, 8)[0][2] != l0 and cf.recycled_bytes == 0
    cf.sync()  # now an entry saying so (block 1's) is durable
    cf.write_blocks([(4096, pattern(5))])
    assert cf.lookup(8, 8)[0][2] == l0 and cf.recycled_bytes == 4096
    cf.close()
    cf = ChangeFile.open(p, writable=False, verify=True, use_index=False)
    assert read(cf, 0, 16) == pattern(3) + pattern(5)
    cf.close(clean=False)


def test_trimmed_blocks_are_recycled(tmp_path: Path) -> None:
    """TRIM frees whole-block payloads for recycling, under the same rule as a
    rewrite: once an entry saying the TRIM was durable is itself durable."""
    p = str(tmp_path / "c.lbd")
    cf = ChangeFile.create(p, 16 * MiB, Identity())
    cf.write_blocks([(b * 4096, pattern(b)) for b in range(16)])
    cf.sync()
    trimmed = {cf.lookup(b * 8, 8)[0][2] for b in range(8)}
    cf.zero(0, 64)  # blocks 0..7
    cf.sync()
    cf.write_blocks([(15 * 4096, pattern(99))])  # says the TRIM is durable
    assert cf.recycled_bytes == 0
    cf.sync()
    cf.write_blocks([(b * 4096, pattern(100 + b)) for b in range(8, 14)])
    assert {cf.lookup(b * 8, 8)[0][2] for b in range(8, 14)} <= trimmed
    assert cf.recycled_bytes == 6 * 4096
    cf.close()
    cf = ChangeFile.open(p, writable=False, verify=True, use_index=False)
    assert read(cf, 0, 64) == bytes(8 * 4096)
    assert [read(cf, b * 8, 8) for b in range(8, 16)] == [
        *(pattern(100 + b) for b in range(8, 14)), pattern(14), pattern(99)]
    cf.close(clean=False)
