"""Pure logic of the NBD layer, beside the real-remote tests: the block cache
(read cache and -X write-back bookkeeping), NBD addresses, extent rounding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lbd.layers import blockcache
from lbd.layers.blockcache import BLOCK, BlockCache
from lbd.layers.nbdclient import parse_target
from lbd.layers.nbdremote import _align, _overlay

from lbd.errors import ConfigError
from lbd.layer import State


def filled(n: int, byte: int) -> memoryview:
    return memoryview(bytes([byte]) * n)


def test_cache_read_fill_and_partial_hits() -> None:
    c = BlockCache(1 << 20)
    view = memoryview(bytearray(2 * BLOCK))
    assert c.lookup(0, view) == [(0, 2 * BLOCK)]
    f = c.begin_fill(0, BLOCK)
    c.end_fill(f, filled(BLOCK, 7))
    view = memoryview(bytearray(2 * BLOCK))
    assert c.lookup(0, view) == [(BLOCK, BLOCK)]
    assert bytes(view[:BLOCK]) == bytes([7]) * BLOCK
    # a write in the middle of an uncached block: only those sectors are held
    assert c.write(BLOCK + 1024, [b"w" * 1024], 1024)
    view = memoryview(bytearray(2 * BLOCK))
    assert c.lookup(0, view) == [(BLOCK, 1024), (BLOCK + 2048, BLOCK - 2048)]
    assert bytes(view[BLOCK + 1024:BLOCK + 2048]) == b"w" * 1024


def test_a_write_during_a_fill_makes_it_stale() -> None:
    c = BlockCache(1 << 20)
    f = c.begin_fill(0, BLOCK)
    assert c.write(512, [b"n" * 512], 512)  # lands while the remote read is out
    c.end_fill(f, filled(BLOCK, 1))  # old data: must not cover the write
    view = memoryview(bytearray(1024))
    assert c.lookup(0, view) == [(0, 512)]
    assert bytes(view[512:]) == b"n" * 512


def test_writeback_bookkeeping() -> None:
    c = BlockCache(1 << 20)
    assert c.write(0, [b"a" * 512, b"b" * 512], 1024)
    assert c.write(BLOCK - 512, [b"c" * 1024], 1024)  # crosses a block edge
    assert c.dirty_bytes() == 2048
    assert c.held_ranges(0, 4 * BLOCK) == [(0, 1024), (BLOCK - 512, 1024)]
    runs = c.take_dirty()
    assert runs == [(0, b"a" * 512 + b"b" * 512), (BLOCK - 512, b"c" * 1024)]
    assert c.take_dirty() == []  # being written: not dirty twice
    assert c.dirty_bytes() == 2048  # but still held until the remote flushed
    c.written(False)  # the write-back failed: dirty again
    assert [o for o, _ in c.take_dirty()] == [0, BLOCK - 512]
    assert c.write(0, [b"z" * 512], 512)  # rewritten while being written back
    c.written(True)
    assert c.take_dirty() == [(0, b"z" * 512)]  # the new data is still dirty
    c.written(True)
    assert c.dirty_bytes() == 0 and c.held_ranges(0, 4 * BLOCK) == []


def test_dirty_data_is_never_evicted() -> None:
    c = BlockCache(2 * BLOCK)  # room for two blocks
    assert c.write(0, [bytes(BLOCK)], BLOCK)
    assert c.write(BLOCK, [bytes(BLOCK)], BLOCK)
    assert c.full_of_dirt()
    assert not c.write(2 * BLOCK, [bytes(512)], 512)  # no room: the caller writes back
    f = c.begin_fill(4 * BLOCK, BLOCK)
    c.end_fill(f, filled(BLOCK, 3))  # no room either: simply not cached
    assert c.lookup(4 * BLOCK, memoryview(bytearray(BLOCK))) == [(4 * BLOCK, BLOCK)]
    c.take_dirty()
    c.written(True)
    assert c.write(2 * BLOCK, [bytes(512)], 512)  # clean blocks make room


def test_drop_forgets_even_dirty_sectors() -> None:
    c = BlockCache(1 << 20)
    assert c.write(0, [b"d" * 4096], 4096)
    c.drop(1024, 1024)
    assert c.held_ranges(0, 4096) == [(0, 1024), (2048, 2048)]
    assert c.lookup(0, memoryview(bytearray(4096))) == [(1024, 1024)]


@pytest.mark.parametrize("text, host, port, sock, export", [
    ("example.org:10810", "example.org", 10810, None, ""),
    ("[::1]:10809", "::1", 10809, None, ""),
    ("nbd://host", "host", 10809, None, ""),
    ("nbd://[fe80::1]:99/a%20b", "fe80::1", 99, None, "a b"),
    ("nbd+unix:///golden?socket=/run/x.sock", None, 10809, "/run/x.sock", "golden"),
    ("nbd+unix:///?socket=rel.sock", None, 10809, "rel.sock", ""),
])
def test_targets(text: str, host: str | None, port: int, sock: str | None, export: str) -> None:
    t = parse_target(text)
    assert (t.host, t.port, t.socket_path, t.export) == (host, port, sock, export)
    assert str(t) == text
    back = parse_target(t.uri)
    assert (back.host, back.port, back.socket_path, back.export) == (host, port, sock, export)


@pytest.mark.parametrize("text", ["nbds://h/x", "nbd+unix://h/x?socket=s", "nbd://:1/",
                                  "ftp://h", "h", "h:0", "h:x", "1::2:3"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(ConfigError, match="-N"):
        parse_target(text, "-N")


def test_extent_rounding_and_overlay() -> None:
    D, Z = State.DATA, State.ZERO
    # a zero run not covering whole sectors leaves them as data
    assert _align([(0, 1000, D), (1000, 3096, Z)], 0, 4096) == [(0, 1024, D), (1024, 3072, Z)]
    assert _align([(0, 4096, Z)], 0, 4096) == [(0, 4096, Z)]
    assert _align([(0, 2048, Z)], 0, 4096) == [(0, 2048, Z), (2048, 2048, D)]
    assert _overlay([(0, 8192, Z)], [(1024, 512)]) == [(0, 1024, Z), (1024, 512, D),
                                                        (1536, 6656, Z)]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << blockcache.SPB) - 1),
       st.integers(min_value=0, max_value=blockcache.SPB),
       st.integers(min_value=0, max_value=blockcache.SPB), st.booleans())
def test_runs_of_sector_bits_match_a_plain_scan(bits: int, a: int, b: int, want: bool) -> None:
    s0, s1 = min(a, b), max(a, b)
    plain = []
    s = s0
    while s < s1:  # the obvious sector-by-sector scan
        if bool(bits >> s & 1) == want:
            e = s
            while e < s1 and bool(bits >> e & 1) == want:
                e += 1
            plain.append((s, e))
            s = e
        else:
            s += 1
    assert list(blockcache._runs(bits, s0, s1, want)) == plain


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 48), st.booleans(),
                          st.sampled_from(["write", "take", "ok", "fail", "drop"])),
                max_size=60))
def test_one_block_write_fast_path_matches_the_general_path(ops: list) -> None:
    """BlockCache.write takes a shorter road for one bytes buffer inside one
    block; a twin cache fed bytearrays (the general road) must end up the same."""
    fast, slow = BlockCache(6 * BLOCK), BlockCache(6 * BLOCK)  # room for 6 of 16 blocks
    for n, (sector, count, _, op) in enumerate(ops):
        off = sector * 512 * 4
        length = count * 512
        if op == "write":
            data = bytes([n % 251]) * length
            assert fast.write(off, [data], length) == slow.write(off, [bytearray(data)], length)
        elif op == "take":
            assert fast.take_dirty() == slow.take_dirty()
        elif op in ("ok", "fail"):
            fast.written(op == "ok")
            slow.written(op == "ok")
        else:
            fast.drop(off, length)
            slow.drop(off, length)
        assert fast.dirty_blocks == slow.dirty_blocks
        assert fast.dirty_bytes() == slow.dirty_bytes()
    span = 64 * 2048 + 48 * 512
    a, b = memoryview(bytearray(span)), memoryview(bytearray(span))
    assert fast.lookup(0, a) == slow.lookup(0, b)
    assert bytes(a) == bytes(b)
