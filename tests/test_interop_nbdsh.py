"""LBD against libnbd through ``nbdsh``: every command, its flags and its errors.

Each test starts a real ``lbd serve`` and drives it with nbdsh (Debian's
python3-libnbd); the expected device contents are kept in a Python model
and compared with a full read-back at the end.  Error tests switch libnbd's
strict mode off so that the request really reaches the server and the errno
checked is the server's reply, not libnbd's own check.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

from support import require, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB

# nbdsh snippets run after this (``h`` is the connected handle)
PRELUDE = """
import json
def err_of(fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        return [e.args[1], e.string]
    return None
"""


def sh(uri: str, script: str, *, strict: bool = True) -> str:
    """Run ``script`` in nbdsh connected to ``uri``; its stdout."""
    require("nbdsh")
    pre = [] if strict else ["-c", "h.set_strict_mode(0)"]
    return run(["nbdsh", "-c", PRELUDE, *pre, "-u", uri, "-c", script]).stdout


def sh_json(uri: str, script: str, *, strict: bool = True) -> Any:
    """Run ``script``; it prints one JSON value last."""
    return json.loads(sh(uri, script, strict=strict).strip().splitlines()[-1])


def make_base(path: Path) -> bytearray:
    """A 16 MiB sparse base: random data in [0, 4M) and [12M, 13M)."""
    model = bytearray(SIZE)
    rng = random.Random(7)
    for off, n in ((0, 4 * MiB), (12 * MiB, 1 * MiB)):
        model[off:off + n] = rng.randbytes(n)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in ((0, 4 * MiB), (12 * MiB, 1 * MiB)):
            os.pwrite(f.fileno(), model[off:off + n], off)
    return model


def stack(lbd_server, tmp_path: Path, *extra: str) -> tuple[Any, bytearray]:
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(tmp_path / "base.img"), "-E",
                      str(tmp_path / "c.lbd"), *extra])
    return srv, model


def dump(uri: str, path: Path) -> bytes:
    sh(uri, f"open({str(path)!r}, 'wb').write(h.pread({SIZE}, 0))")
    return path.read_bytes()


def assert_same(got: bytes, want: bytes | bytearray) -> None:
    assert len(got) == len(want)
    if got != want:
        first = next(i for i in range(len(got)) if got[i] != want[i])
        raise AssertionError(f"device differs from the model first at byte {first} "
                             f"(sector {first // 512}): got {got[first:first + 16].hex()} "
                             f"want {bytes(want[first:first + 16]).hex()}")


# -- data round trips ---------------------------------------------------------------------


def test_libnbd_pwrite_pread_aligned(lbd_server, tmp_path: Path) -> None:
    srv, model = stack(lbd_server, tmp_path)
    writes = [(0, 4 * KiB), (1 * MiB, 64 * KiB), (3 * MiB + 512, 1 * KiB),
              (4 * MiB - 2 * KiB, 4 * KiB), (6 * MiB, 1 * MiB), (SIZE - 512, 512),
              (8 * MiB, 32 * MiB // 8)]
    rng = random.Random(1)
    ops = []
    for off, n in writes:
        data = rng.randbytes(n)
        model[off:off + n] = data
        ops.append((off, data.hex()))
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps(ops))
    assert sh_json(srv.uri, f"""
for off, hx in json.load(open({str(ops_file)!r})):
    data = bytes.fromhex(hx)
    h.pwrite(data, off)
    assert h.pread(len(data), off) == data, off
print(json.dumps(h.get_size()))
""") == SIZE
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_unaligned_read_modify_write(lbd_server, tmp_path: Path) -> None:
    """Writes that start or end inside a sector keep the rest of it (from the base)."""
    srv, model = stack(lbd_server, tmp_path)
    rng = random.Random(2)
    spots = [(1, 1), (511, 2), (513, 1000), (1000, 3000), (4095, 2), (10, 20),
             (4 * MiB - 100, 300),  # across the end of the base data into a hole
             (5 * MiB + 7, 9000),  # inside a base hole
             (12 * MiB - 1, 513), (SIZE - 3, 3)]
    spots += [(rng.randrange(0, SIZE - 70000), rng.randrange(1, 70000)) for _ in range(60)]
    ops = []
    for off, n in spots:
        data = rng.randbytes(n)
        model[off:off + n] = data
        ops.append((off, data.hex()))
    ops_file = tmp_path / "ops.json"
    ops_file.write_text(json.dumps(ops))
    reads = [(0, 1), (1, 1), (510, 4), (4090, 12), (4 * MiB - 1, 2), (SIZE - 1, 1),
             (12 * MiB + 333, 77777)]
    got = sh_json(srv.uri, f"""
for off, hx in json.load(open({str(ops_file)!r})):
    h.pwrite(bytes.fromhex(hx), off)
print(json.dumps([h.pread(n, off).hex() for off, n in {reads!r}]))
""")
    for (off, n), hx in zip(reads, got):
        assert bytes.fromhex(hx) == model[off:off + n], (off, n)
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_zero_flags(lbd_server, tmp_path: Path) -> None:
    """WRITE_ZEROES plain, NO_HOLE, FAST_ZERO, both, and unaligned ranges."""
    srv, model = stack(lbd_server, tmp_path)
    zeros = [(0, 64 * KiB, 0), (256 * KiB, 64 * KiB, "nbd.CMD_FLAG_NO_HOLE"),
             (512 * KiB, 128 * KiB, "nbd.CMD_FLAG_FAST_ZERO"),
             (1 * MiB, 1 * MiB, "nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO"),
             (3 * MiB + 100, 5000, 0), (3 * MiB + 10000 + 10, 20, 0),
             (12 * MiB + 1000, 200 * KiB + 3, "nbd.CMD_FLAG_NO_HOLE"),
             (6 * MiB, 1 * MiB, 0)]  # over a base hole
    for off, n, _ in zeros:
        model[off:off + n] = bytes(n)
    calls = "\n".join(f"h.zero({n}, {off}, {flags})" for off, n, flags in zeros)
    checks = "\n".join(f"assert h.pread({n}, {off}) == bytes({n}), {off}" for off, n, _ in zeros)
    sh(srv.uri, f"assert h.can_zero() and h.can_fast_zero()\n{calls}\n{checks}")
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_zero_flags_writable_flat(lbd_server, tmp_path: Path) -> None:
    """The same on a writable flat image (-F): zeros land in the file itself."""
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-F", str(tmp_path / "base.img")])
    zeros = [(0, 64 * KiB, 0), (256 * KiB, 64 * KiB, "nbd.CMD_FLAG_NO_HOLE"),
             (512 * KiB, 128 * KiB, "nbd.CMD_FLAG_FAST_ZERO"),
             (1 * MiB, 1 * MiB, "nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO"),
             (3 * MiB + 100, 5000, 0), (12 * MiB + 1, 2, 0)]
    for off, n, _ in zeros:
        model[off:off + n] = bytes(n)
    sh(srv.uri, "\n".join(f"h.zero({n}, {off}, {flags})" for off, n, flags in zeros))
    assert_same(dump(srv.uri, tmp_path / "dump"), model)
    assert srv.stop() == 0
    assert_same((tmp_path / "base.img").read_bytes(), model)


def test_libnbd_trim(lbd_server, tmp_path: Path) -> None:
    """An aligned TRIM reads back as zeros (it masks the base); an unaligned
    TRIM never touches bytes outside its range."""
    srv, model = stack(lbd_server, tmp_path)
    model[1 * MiB:2 * MiB] = bytes(1 * MiB)
    got = sh_json(srv.uri, f"""
assert h.can_trim()
h.trim({1 * MiB}, {1 * MiB})
h.trim(1000, {3 * MiB + 100})
h.trim(100, {3 * MiB + 4096 + 10})
h.trim(1000, {3 * MiB + 8192}, nbd.CMD_FLAG_FUA)
print(json.dumps([h.pread({1 * MiB}, {1 * MiB}) == bytes({1 * MiB})]))
""")
    assert got == [True]
    data = dump(srv.uri, tmp_path / "dump")
    # the unaligned trims: bytes outside [off, off+len) unchanged; inside: old data or zeros
    for off, n in ((3 * MiB + 100, 1000), (3 * MiB + 4096 + 10, 100), (3 * MiB + 8192, 1000)):
        for i in range(off, off + n):
            assert data[i] in (model[i], 0), i
            model[i] = data[i]
    assert_same(data, model)


def test_libnbd_flush_and_fua(lbd_server, tmp_path: Path) -> None:
    srv, model = stack(lbd_server, tmp_path)
    model[0:4096] = b"F" * 4096
    model[8 * MiB:8 * MiB + 1000] = b"u" * 1000
    model[9 * MiB:10 * MiB] = bytes(1 * MiB)
    sh(srv.uri, f"""
assert h.can_flush() and h.can_fua()
h.pwrite(b'F' * 4096, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b'u' * 1000, {8 * MiB}, nbd.CMD_FLAG_FUA)
h.zero({1 * MiB}, {9 * MiB}, nbd.CMD_FLAG_FUA)
h.flush()
h.flush()
assert h.pread(4096, 0) == b'F' * 4096
""")
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_cache(lbd_server, tmp_path: Path) -> None:
    srv, _ = stack(lbd_server, tmp_path)
    got = sh_json(srv.uri, f"""
assert h.can_cache()
h.pwrite(b'c' * 4096, {12 * MiB})
h.cache({4 * MiB}, 0)
h.cache(100, 1000)
h.cache({1 * MiB}, {12 * MiB})
h.cache(512, {SIZE - 512})
print(json.dumps(h.pread(4096, {12 * MiB}).hex()))
""")
    assert bytes.fromhex(got) == b"c" * 4096


def test_libnbd_block_status_req_one(lbd_server, tmp_path: Path) -> None:
    srv, _ = stack(lbd_server, tmp_path)
    script = f"""
h.pwrite(b'w' * 4096, {1 * MiB})
got = {{}}
def cb(ctx, off, entries, err):
    got.setdefault(ctx, []).extend([list(entries[i:i + 2]) for i in range(0, len(entries), 2)])
    return 0
out = []
for count, off, flags in [({4 * MiB}, 0, nbd.CMD_FLAG_REQ_ONE), ({4 * MiB}, 0, 0),
                          ({64 * KiB}, {1 * MiB + 4096}, nbd.CMD_FLAG_REQ_ONE),
                          (10000, {4 * MiB - 1000}, nbd.CMD_FLAG_REQ_ONE),
                          (1000, 333, nbd.CMD_FLAG_REQ_ONE)]:
    got.clear()
    h.block_status(count, off, cb, flags)
    out.append(dict(got))
print(json.dumps(out))
"""
    require("nbdsh")
    res = json.loads(run(["nbdsh", "--base-allocation", "-c",
                          "h.add_meta_context('lbd:allocation-depth')", "-u", srv.uri,
                          "-c", PRELUDE, "-c", script]).stdout.strip().splitlines()[-1])
    ba, depth = "base:allocation", "lbd:allocation-depth"
    # REQ_ONE: exactly one extent per context, never longer than asked
    assert res[0] == {ba: [[4 * MiB, 0]], depth: [[1 * MiB, 2]]}
    # without REQ_ONE the whole range is described
    assert res[1][ba] == [[4 * MiB, 0]]
    assert res[1][depth] == [[1 * MiB, 2], [4096, 1], [3 * MiB - 4096, 2]]
    assert res[2] == {ba: [[64 * KiB, 0]], depth: [[64 * KiB, 2]]}
    # across the end of the base data: first extent is the last 1000 data bytes
    assert res[3] == {ba: [[1000, 0]], depth: [[10000, 2]]}
    # unaligned offset and length
    assert res[4] == {ba: [[1000, 0]], depth: [[1000, 2]]}


# -- errors ---------------------------------------------------------------------------------


def test_libnbd_read_past_end_einval(lbd_server, tmp_path: Path) -> None:
    srv, model = stack(lbd_server, tmp_path)
    res = sh_json(srv.uri, f"""
r = [err_of(h.pread, 512, {SIZE}), err_of(h.pread, 1024, {SIZE - 512}),
     err_of(h.pread, 1, {SIZE}), err_of(h.cache, 4096, {SIZE - 512})]
# the connection is still good
r.append(h.pread(16, {SIZE - 16}).hex())
print(json.dumps(r))
""", strict=False)
    for r in res[:4]:
        assert r is not None and r[0] == errno.EINVAL, r
        assert "command failed" in r[1], r  # the server's reply, not a libnbd check
    assert bytes.fromhex(res[4]) == model[SIZE - 16:]


def test_libnbd_write_past_end_enospc(lbd_server, tmp_path: Path) -> None:
    srv, model = stack(lbd_server, tmp_path)
    res = sh_json(srv.uri, f"""
r = [err_of(h.pwrite, b'x' * 512, {SIZE}), err_of(h.pwrite, b'x' * 1024, {SIZE - 512}),
     err_of(h.pwrite, b'x', {SIZE}), err_of(h.zero, 4096, {SIZE - 512}),
     err_of(h.trim, 4096, {SIZE - 512})]
print(json.dumps(r))
""", strict=False)
    for r in res[:4]:
        assert r is not None and r[0] == errno.ENOSPC, r
        assert "command failed" in r[1], r
    assert res[4] is not None and res[4][0] in (errno.ENOSPC, errno.EINVAL), res[4]
    # nothing of the refused writes landed
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


WRITE_OPS = """
r = [err_of(h.pwrite, b'x' * 4096, 0), err_of(h.pwrite, b'x', 100),
     err_of(h.pwrite, b'x' * 4096, 0, nbd.CMD_FLAG_FUA),
     err_of(h.zero, 4096, 0), err_of(h.trim, 4096, 0)]
h.flush()  # flush is allowed on a read-only export
print(json.dumps([h.is_read_only(), r]))
"""


def check_eperm(res: list[Any]) -> None:
    read_only, errs = res
    assert read_only is True
    for r in errs:
        assert r is not None and r[0] == errno.EPERM, r
        assert "command failed" in r[1], r


def test_libnbd_write_on_flat_read_only_eperm(lbd_server, tmp_path: Path) -> None:
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(tmp_path / "base.img")])
    check_eperm(sh_json(srv.uri, WRITE_OPS, strict=False))
    # and libnbd's own check (strict mode) agrees
    assert sh_json(srv.uri, "print(json.dumps(err_of(h.pwrite, b'x', 0)))")[0] == errno.EPERM
    assert srv.stop() == 0
    assert_same((tmp_path / "base.img").read_bytes(), model)


def test_libnbd_write_with_readonly_option_eperm(lbd_server, tmp_path: Path) -> None:
    srv, model = stack(lbd_server, tmp_path, "--readonly")
    check_eperm(sh_json(srv.uri, WRITE_OPS, strict=False))
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_unknown_export_refused(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")], export="good")
    require("nbdsh")
    res = json.loads(run(["nbdsh", "-n", "-c", PRELUDE, "-c", f"""
out = []
for name in ['bad', '', 'goo', 'good2']:
    h = nbd.NBD()
    h.set_export_name(name)
    out.append(err_of(h.connect_unix, {srv.sock!r}))
h = nbd.NBD()
h.set_export_name('good')
h.connect_unix({srv.sock!r})
out.append(h.get_size())
print(json.dumps(out))
"""]).stdout.strip().splitlines()[-1])
    for r in res[:4]:
        assert r is not None, res
        assert "opt_go" in r[1] or "export" in r[1], r
    assert res[4] == SIZE


# -- concurrency -------------------------------------------------------------------------------


def test_libnbd_many_in_flight_out_of_order(lbd_server, tmp_path: Path) -> None:
    """Hundreds of aio commands in flight at once, FUA writes and flushes among
    plain reads and writes: replies come back out of order and every one of
    them is right."""
    srv, model = stack(lbd_server, tmp_path)
    n = 512
    rng = random.Random(3)
    blocks = rng.sample(range(SIZE // 4096), n)
    before = bytes(model)
    for i, b in enumerate(blocks):
        if i % 3 != 2:  # writes; every third is a read of the old contents
            model[b * 4096:(b + 1) * 4096] = bytes([i % 251 + 1]) * 4096
    out = sh_json(srv.uri, f"""
blocks = {blocks!r}
order = []
errors = []
bufs = {{}}
def done(i):
    def cb(err):
        order.append(i)
        if err.value:
            errors.append((i, err.value))
        return 1
    return cb
for i, b in enumerate(blocks):
    if i % 3 == 2:
        bufs[i] = nbd.Buffer(4096)
        h.aio_pread(bufs[i], b * 4096, done(i))
    else:
        flags = nbd.CMD_FLAG_FUA if i % 16 == 0 else 0
        h.aio_pwrite(bytes([i % 251 + 1]) * 4096, b * 4096, done(i), flags)
    if i % 64 == 63:
        h.aio_flush(done(-i))
peak = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
reads = {{i: buf.to_bytearray().hex() for i, buf in bufs.items()}}
print(json.dumps([peak, order, errors, reads]))
""")
    peak, order, errors, reads = out
    assert errors == []
    assert len(order) == n + n // 64
    assert peak >= 64, peak  # really many in flight
    swapped = sum(1 for a, b in itertools.pairwise(order) if abs(a) > abs(b))
    assert swapped > 0, "every reply came back in order; expected FUA/flush to be overtaken"
    for i, hx in reads.items():
        b = blocks[int(i)]
        assert bytes.fromhex(hx) == before[b * 4096:(b + 1) * 4096], i
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_multi_conn(lbd_server, tmp_path: Path) -> None:
    """can_multi_conn: a write flushed on one connection is seen by another."""
    srv, model = stack(lbd_server, tmp_path)
    require("nbdsh")
    out = run(["nbdsh", "-n", "-c", f"""
hs = []
for _ in range(4):
    h = nbd.NBD()
    h.connect_uri({srv.uri!r})
    assert h.can_multi_conn()
    hs.append(h)
for i, h in enumerate(hs):
    h.pwrite(bytes([0x40 + i]) * 8192, i * {1 * MiB} + 512)
    h.flush()
    for j, other in enumerate(hs):
        assert other.pread(8192, i * {1 * MiB} + 512) == bytes([0x40 + i]) * 8192, (i, j)
# and a write made through one, flushed through another
hs[0].pwrite(b'Z' * 4096, {10 * MiB})
hs[1].flush()
assert hs[2].pread(4096, {10 * MiB}) == b'Z' * 4096
print('ok')
"""]).stdout
    assert out.strip().endswith("ok")
    for i in range(4):
        model[i * MiB + 512:i * MiB + 512 + 8192] = bytes([0x40 + i]) * 8192
    model[10 * MiB:10 * MiB + 4096] = b"Z" * 4096
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def drop_page_cache(*paths: Path) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_libnbd_reads_outside_page_cache(lbd_server, tmp_path: Path) -> None:
    """Reads that miss the page cache (served from worker threads) mixed with
    writes and cached reads, hundreds in flight: every reply is right."""
    srv, model = stack(lbd_server, tmp_path)
    rng = random.Random(9)
    data = rng.randbytes(2 * MiB)
    (tmp_path / "w.bin").write_bytes(data)
    sh(srv.uri, f"h.pwrite(open({str(tmp_path / 'w.bin')!r}, 'rb').read(), {2 * MiB})\nh.flush()")
    model[2 * MiB:4 * MiB] = data
    drop_page_cache(tmp_path / "base.img", tmp_path / "c.lbd")
    reads = [(rng.randrange(0, 5 * MiB), rng.choice([512, 4096, 65536, 100000, 1 * MiB]))
             for _ in range(300)]
    writes = [(12 * MiB + i * 8192, i) for i in range(64)]  # elsewhere, not read
    got = sh_json(srv.uri, f"""
import hashlib
reads = {reads!r}
bufs = []
errors = []
def check(err):
    if err.value:
        errors.append(err.value)
    return 1
for k, (off, n) in enumerate(reads):
    b = nbd.Buffer(n)
    bufs.append(b)
    h.aio_pread(b, off, check)
    if k < len({writes!r}):
        off_w, i = {writes!r}[k]
        h.aio_pwrite(bytes([i]) * 8192, off_w, check)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(json.dumps([errors, [hashlib.sha256(b.to_bytearray()).hexdigest() for b in bufs]]))
""")
    errors, sums = got
    assert errors == []
    for (off, n), s in zip(reads, sums):
        assert s == hashlib.sha256(model[off:off + n]).hexdigest(), (off, n)
    for off, i in writes:
        model[off:off + 8192] = bytes([i]) * 8192
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_libnbd_simple_replies_only(lbd_server, tmp_path: Path) -> None:
    """A client that does not negotiate structured replies: reads, writes and
    errors (no payload after a failed read's simple reply) keep the stream in step."""
    srv, model = stack(lbd_server, tmp_path)
    require("nbdsh")
    out = run(["nbdsh", "-c", PRELUDE, "-c", "h.set_request_structured_replies(False)",
               "-c", "h.set_strict_mode(0)", "-u", srv.uri, "-c", f"""
assert not h.get_structured_replies_negotiated()
r = [err_of(h.pread, 4096, {SIZE - 512})]
h.pwrite(b's' * 5000, 100)
r.append(err_of(h.pread, 512, {SIZE}))
r.append(h.pread(5000, 100) == b's' * 5000)
r.append(err_of(h.pwrite, b'x' * 512, {SIZE}))
r.append(h.pread(16, 0).hex())
print(json.dumps(r))
"""]).stdout
    res = json.loads(out.strip().splitlines()[-1])
    model[100:5100] = b"s" * 5000
    assert res[0][0] == errno.EINVAL and res[1][0] == errno.EINVAL
    assert res[2] is True
    assert res[3][0] == errno.ENOSPC
    assert bytes.fromhex(res[4]) == model[:16]
    assert_same(dump(srv.uri, tmp_path / "dump"), model)
