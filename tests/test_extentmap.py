"""ExtentMap against a per-sector reference model (pure logic, hypothesis)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lbd import extentmap
from lbd.extentmap import CHUNK_SECTORS, MIXED, SECTOR, ZERO, ExtentMap

SPAN = 3 * CHUNK_SECTORS + 77  # crosses chunk boundaries

ops = st.lists(
    st.tuples(
        st.sampled_from(["data", "zero", "discard"]),
        st.integers(0, SPAN - 1),
        st.integers(1, 2 * CHUNK_SECTORS),
    ),
    max_size=60,
)


def expected_after(operations: list[tuple[str, int, int]]) -> dict[int, int]:
    model: dict[int, int] = {}
    next_loc = 1 << 20
    for kind, start, count in operations:
        count = min(count, SPAN - start)
        if kind == "data":
            for i in range(count):
                model[start + i] = next_loc + i * SECTOR
            next_loc += count * SECTOR + 4096
        elif kind == "zero":
            for i in range(count):
                model[start + i] = ZERO
        else:
            for i in range(count):
                model.pop(start + i, None)
    return model


def apply(operations: list[tuple[str, int, int]]) -> ExtentMap:
    m = ExtentMap()
    next_loc = 1 << 20
    for kind, start, count in operations:
        count = min(count, SPAN - start)
        if kind == "data":
            m.set(start, count, next_loc)
            next_loc += count * SECTOR + 4096
        elif kind == "zero":
            m.set(start, count, ZERO)
        else:
            m.discard(start, count)
    return m


def per_sector(m: ExtentMap, start: int, count: int) -> dict[int, int]:
    out: dict[int, int] = {}
    pos = start
    for s, n, loc in m.lookup(start, count):
        assert s == pos, "lookup runs must be contiguous and in order"
        pos += n
        if loc is None:
            continue
        for i in range(n):
            out[s + i] = loc if loc == ZERO else loc + i * SECTOR
    assert pos == start + count
    return out


@settings(max_examples=300, deadline=None)
@given(ops)
def test_map_matches_model(operations: list[tuple[str, int, int]]) -> None:
    model = expected_after(operations)
    m = apply(operations)
    assert per_sector(m, 0, SPAN) == model
    assert m.data_sectors == sum(1 for v in model.values() if v != ZERO)
    assert m.zero_sectors == sum(1 for v in model.values() if v == ZERO)
    listed = list(m)
    assert m.extent_count == len(listed)
    # iteration gives sorted, non-overlapping extents that agree with lookups
    prev_end = -1
    for s, n, _loc in listed:
        assert s >= prev_end and n > 0
        prev_end = s + n


@settings(max_examples=100, deadline=None)
@given(ops, st.integers(0, SPAN - 1), st.integers(1, SPAN))
def test_lookup_of_subrange(operations: list[tuple[str, int, int]], start: int,
                            count: int) -> None:
    count = min(count, SPAN - start)
    model = expected_after(operations)
    m = apply(operations)
    want = {k: v for k, v in model.items() if start <= k < start + count}
    assert per_sector(m, start, count) == want
    # single() agrees with lookup() wherever it gives an answer (MIXED means
    # "ask lookup()": always right, if slower)
    got = m.single(start, count)
    if got != MIXED:
        assert m.lookup(start, count) == [(start, count, got)]


def test_sequential_writes_coalesce() -> None:
    m = ExtentMap()
    for i in range(100):
        m.set(i * 8, 8, 4096 + i * 8 * SECTOR)
    assert m.lookup(0, 800) == [(0, 800, 4096)]
    assert m.single(0, 800) == 4096
    assert m.maps_to(8, 792, 4096 + 8 * SECTOR)
    assert m.extent_count == 100  # whole blocks are held one by one (up to BLOCKS_MAX)
    assert len(m._blocks) == 100  # and reads moved none of them
    m.set(4, 8, 1 << 30)  # a write across two blocks moves them into the chunk
    assert len(m._blocks) == 98
    assert m.lookup(0, 24) == [(0, 4, 4096), (4, 8, 1 << 30), (12, 12, 4096 + 12 * SECTOR)]
    saved = extentmap.BLOCKS_MAX
    extentmap.BLOCKS_MAX = 0  # with no block dict they merge into one extent
    try:
        m = ExtentMap()
        for i in range(100):
            m.set(i * 8, 8, 4096 + i * 8 * SECTOR)
        assert m.extent_count == 1
        assert m.lookup(0, 800) == [(0, 800, 4096)]
    finally:
        extentmap.BLOCKS_MAX = saved


def test_memory_is_proportional_to_what_was_written() -> None:
    m = ExtentMap()
    tib_sectors = (1 << 40) // SECTOR
    m.set(tib_sectors - 8, 8, 4096)
    m.set(12345, 1, ZERO)
    assert len(m._chunks) + len(m._blocks) == 2
    assert m.lookup(tib_sectors - 16, 16) == [(tib_sectors - 16, 8, None),
                                               (tib_sectors - 8, 8, 4096)]


# Block-sized operations on a grid, as a file system or fio issues them: they
# hit the exact-replacement and fill-a-gap fast paths of ExtentMap.set, and
# "contig" writes land right after the previous payload so they join neighbours.
grid_ops = st.lists(
    st.tuples(
        st.sampled_from(["data", "data", "contig", "zero", "discard", "read"]),
        st.integers(0, 40),  # block index (8 sectors each): chunks 0 and 1
        st.integers(1, 3),  # blocks
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(grid_ops)
def test_block_grid_writes_match_model(operations: list[tuple[str, int, int]]) -> None:
    block = 8
    base = CHUNK_SECTORS - 20 * block  # blocks 20.. are in the second chunk
    model: dict[int, int] = {}
    m = ExtentMap()
    next_loc = 1 << 20
    for kind, b, n in operations:
        start, count = base + b * block, n * block
        if kind == "contig":  # a payload right after the previous one
            next_loc -= 4096
        if kind in ("data", "contig"):
            m.set(start, count, next_loc)
            for i in range(count):
                model[start + i] = next_loc + i * SECTOR
            # maps_to answers within one chunk (extents never cross one)
            one_chunk = start // CHUNK_SECTORS == (start + count - 1) // CHUNK_SECTORS
            assert m.maps_to(start, count, next_loc) == one_chunk
            next_loc += count * SECTOR + 4096
        elif kind == "zero":
            m.set(start, count, ZERO)
            model.update(dict.fromkeys(range(start, start + count), ZERO))
            assert not m.maps_to(start, count, ZERO)
        elif kind == "read":  # queries between updates (they must move nothing)
            want = {k: v for k, v in model.items() if start <= k < start + count}
            got = m.single(start + 1, 3)  # inside the first block
            if got != MIXED:
                assert {start + 1 + i: (got if got == ZERO else got + i * SECTOR)
                        for i in range(3) if got is not None} == {
                    k: v for k, v in want.items() if start + 1 <= k < start + 4}
            assert per_sector(m, start, count) == want
        else:
            m.discard(start, count)
            for i in range(count):
                model.pop(start + i, None)
    span = 45 * block
    assert per_sector(m, base, span) == model
    assert m.data_sectors == sum(1 for v in model.values() if v != ZERO)
    assert m.zero_sectors == sum(1 for v in model.values() if v == ZERO)
    listed = list(m)
    assert m.extent_count == len(listed)
    for (s1, n1, _l1), (s2, _n2, _l2) in itertools.pairwise(listed):
        assert s1 + n1 <= s2
    for s, n, loc in listed:
        if loc != ZERO:
            assert m.maps_to(s, n, loc)
            assert not m.maps_to(s, n, loc + SECTOR)


def test_single_answers() -> None:
    m = ExtentMap()
    m.set(16, 8, 8192)
    m.set(32, 8, ZERO)
    assert m.single(0, 8) is None
    assert m.single(16, 8) == 8192
    assert m.single(18, 4) == 8192 + 2 * SECTOR
    assert m.single(32, 8) == ZERO
    assert m.single(12, 8) == MIXED  # half absent, half data
    assert m.single(20, 16) == MIXED  # data, absent, zero
    assert m.single(CHUNK_SECTORS - 4, 8) == MIXED  # crosses a chunk: use lookup()


@settings(max_examples=200, deadline=None)
@given(grid_ops, st.sampled_from([0, 3, 1 << 19]))
def test_block_dict_limit_and_queries_agree(operations: list[tuple[str, int, int]],
                                            limit: int) -> None:
    """With the block dict full (or off) the map still matches the model.

    Counters and iteration look at both representations without moving
    blocks; only updates and multi-block lookups move them.
    """
    saved = extentmap.BLOCKS_MAX
    extentmap.BLOCKS_MAX = limit
    try:
        model: dict[int, int] = {}
        m = ExtentMap()
        loc = 1 << 20
        base = CHUNK_SECTORS - 20 * 8  # blocks 20.. are in the second chunk
        for kind, b, n in operations:
            start, count = base + b * 8, n * 8
            if kind == "discard":
                m.discard(start, count)
                for i in range(count):
                    model.pop(start + i, None)
                continue
            if kind == "read":
                assert per_sector(m, start, count) == {
                    k: v for k, v in model.items() if start <= k < start + count}
                continue
            # whole blocks one by one, as a file system writes them
            for blk in range(n):
                s = start + blk * 8
                v = ZERO if kind == "zero" else loc
                m.set(s, 8, v)
                model.update({s + i: (v if v == ZERO else v + i * SECTOR) for i in range(8)})
                loc += 8 * SECTOR + (4096 if kind == "data" else 0)
            assert len(m._blocks) <= limit
        kept = dict(m._blocks)
        assert m.data_sectors == sum(1 for v in model.values() if v != ZERO)
        assert m.zero_sectors == sum(1 for v in model.values() if v == ZERO)
        listed = list(m)
        assert m.extent_count == len(listed)
        assert m._blocks == kept  # counters and iteration moved nothing
        for (s1, n1, _l1), (s2, _n2, _l2) in itertools.pairwise(listed):
            assert s1 + n1 <= s2
        per = {}
        for s, n, v in listed:
            per.update({s + i: (v if v == ZERO else v + i * SECTOR) for i in range(n)})
        assert per == model
        assert per_sector(m, base, 45 * 8) == model
    finally:
        extentmap.BLOCKS_MAX = saved
