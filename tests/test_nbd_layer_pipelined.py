"""Remote reads at high queue depth through the NBD layer's fast paths.

Reads of a stack with a remote layer start from the frontend's parse loop
with no task each (Device.read_start); large reads wholly on the remote are
spliced socket -> pipe -> socket (PipeData).  These tests check, with real
remotes and real clients, that the bytes are right when reads are partly in
the change file and partly on the remote, when the remote answers in chunks
(qemu-nbd's holes) or the pipe fills up, and that many reads in flight when
the remote dies are answered (again, or EIO), never left hanging.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from remotes import Remotes
from support import TOOL_PATH, make_file, nbdsh, random_file, require, run

MiB = 1 << 20
SIZE = 32 * MiB

# Many reads in flight at once (up to QD), of mixed sizes, some unaligned;
# each compared with the expected image.  Prints "ok N" or raises.
AIO_READS = """
import random, nbd
want = open({expected!r}, 'rb').read()
rng = random.Random({seed})
sizes = [512, 4096, 4096, 65536, 262144, 300000, 1 << 20, 3 << 20]
todo = []
for i in range({count}):
    n = rng.choice(sizes)
    off = rng.randrange(0, len(want) - n)
    if rng.random() < 0.7:
        off &= ~511
    todo.append((off, n))
inflight = []
done = 0
while todo or inflight:
    while todo and len(inflight) < {qd}:
        off, n = todo.pop()
        buf = nbd.Buffer(n)
        inflight.append((h.aio_pread(buf, off), buf, off, n))
    h.poll(-1)
    still = []
    for cookie, buf, off, n in inflight:
        if h.aio_command_completed(cookie):
            got = buf.to_bytearray()
            assert got == want[off:off + n], (off, n)
            done += 1
        else:
            still.append((cookie, buf, off, n))
    inflight = still
print('ok', done)
"""


def patch_change_file(uri: str, expected: bytearray, seed: int) -> None:
    """Write scattered pieces through LBD (into its change file) and into ``expected``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(300):
        n = rng.choice([512, 4096, 8192, 65536])
        off = rng.randrange(0, len(expected) - n) & ~511
        data = bytes([rng.randrange(256)]) * n
        expected[off:off + n] = data
        lines.append(f"h.pwrite(bytes([{data[0]}]) * {n}, {off})")
    lines.append("h.flush()")
    nbdsh(uri, "\n".join(lines))


def copy_and_compare(uri: str, expected: bytes, out: Path) -> None:
    require("nbdcopy")
    if out.exists():
        out.unlink()
    run(["nbdcopy", uri, str(out)], timeout=300)
    got = out.read_bytes()
    assert len(got) == len(expected)
    if got != expected:
        bad = next(i for i in range(len(got)) if got[i] != expected[i])
        raise AssertionError(f"nbdcopy through LBD differs from the expected image at {bad}")


def test_reads_partly_in_the_change_file_at_high_queue_depth(
        remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    """-n under a change file: every read, whole or partly overlaid, has the right bytes."""
    img = random_file(tmp_path / "b.img", SIZE, seed=61)
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd")])
    expected = bytearray(img.read_bytes())
    patch_change_file(srv.uri, expected, seed=62)
    exp = tmp_path / "expected.img"
    exp.write_bytes(expected)
    # nbdcopy: 4 connections x 64 requests of 256 KiB, spliced where wholly remote
    copy_and_compare(srv.uri, bytes(expected), tmp_path / "out.img")
    out = nbdsh(srv.uri, AIO_READS.format(expected=str(exp), seed=63, count=1500, qd=128))
    assert out.split() == ["ok", "1500"], out
    assert "Traceback" not in srv.log()


def test_spliced_reads_fall_back_when_the_pipe_fills(remotes: Remotes, lbd_server,
                                                     tmp_path: Path) -> None:
    """Pipes of one page (LBD_NBD_PIPE_BYTES): large reads move to a buffer midway."""
    img = random_file(tmp_path / "p.img", SIZE, seed=64)
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri],
                     extra_env={"LBD_NBD_PIPE_BYTES": "4096"})
    copy_and_compare(srv.uri, img.read_bytes(), tmp_path / "out.img")
    exp = tmp_path / "p.img"
    out = nbdsh(srv.uri, AIO_READS.format(expected=str(exp), seed=65, count=400, qd=64))
    assert out.split() == ["ok", "400"], out


def test_chunked_replies_into_spliced_reads(remotes: Remotes, lbd_server,
                                            tmp_path: Path) -> None:
    """qemu-nbd answers reads of a sparse image in data and hole chunks."""
    img = tmp_path / "s.img"
    make_file(img, SIZE)
    rng = random.Random(66)
    expected = bytearray(SIZE)
    with open(img, "r+b") as f:
        for _ in range(60):
            n = rng.choice([4096, 65536, 200000])
            off = rng.randrange(0, SIZE - n) & ~4095
            data = rng.randbytes(n)
            f.seek(off)
            f.write(data)
            expected[off:off + n] = data
    q = remotes.qemu_nbd(img, readonly=True)
    srv = lbd_server(["-s", "32M", "-n", q.uri])
    copy_and_compare(srv.uri, bytes(expected), tmp_path / "out.img")
    exp = tmp_path / "expected.img"
    exp.write_bytes(expected)
    out = nbdsh(srv.uri, AIO_READS.format(expected=str(exp), seed=67, count=300, qd=64))
    assert out.split() == ["ok", "300"], out


# Submit many reads, then report each one's outcome: "ok", "bad" or the errno
AIO_OUTCOMES = """
import random, sys, time, nbd
want = open({expected!r}, 'rb').read()
rng = random.Random({seed})
reqs = []
for i in range({count}):
    n = rng.choice([4096, 262144])
    off = rng.randrange(0, len(want) - n) & ~4095
    buf = nbd.Buffer(n)
    reqs.append([h.aio_pread(buf, off), buf, off, n, None])
print('submitted', flush=True)
sys.stdin.readline()   # the test kills the remote meanwhile
left = len(reqs)
while left:
    h.poll(-1)
    for r in reqs:
        if r[4] is None:
            try:
                if not h.aio_command_completed(r[0]):
                    continue
                r[4] = 'ok' if r[1].to_bytearray() == want[r[2]:r[2] + r[3]] else 'bad'
            except nbd.Error as e:
                r[4] = e.errno or 'error'
            left -= 1
print(' '.join(sorted(set(r[4] for r in reqs))))
"""


@pytest.mark.parametrize("comes_back", [True, False])
def test_remote_killed_with_many_reads_in_flight(remotes: Remotes, lbd_server,
                                                 tmp_path: Path, comes_back: bool) -> None:
    """Reads in flight when the remote dies are sent again once it is back (right
    bytes), or fail with EIO after --nbd-timeout when it stays away; none hangs."""
    require("nbdsh")
    img = random_file(tmp_path / "k.img", SIZE, seed=68)
    kit = remotes.nbdkit("--filter=delay", "file", str(img), "rdelay=200ms", readonly=True)
    # a timeout long enough for every read to be answered once the remote is back
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd"),
                      "--nbd-timeout", "30" if comes_back else "4"])
    nbdsh(srv.uri, "h.pread(4096, 0)")  # the connections are up
    p = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c",
                          AIO_OUTCOMES.format(expected=str(img), seed=69, count=300)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={"PATH": TOOL_PATH})
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "submitted"
        time.sleep(0.2)
        kit.kill()
        if comes_back:
            time.sleep(1.0)
            kit.start()
        t0 = time.monotonic()
        out, err = p.communicate("go\n", timeout=120)
        assert p.returncode == 0, err
        assert time.monotonic() - t0 < 60
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
    if comes_back:
        assert out.split() == ["ok"], (out, err)
    else:  # those answered before the kill are fine; every other one is EIO
        assert "EIO" in out.split() and set(out.split()) <= {"ok", "EIO"}, (out, err)
    log = srv.log()
    assert "Traceback" not in log, log[-5000:]
    if not comes_back:
        kit.start()
    out = nbdsh(srv.uri, AIO_READS.format(expected=str(img), seed=70, count=200, qd=64)) \
        if comes_back else None
    assert out is None or out.split() == ["ok", "200"], out



# Writes in flight at once (up to QD), one per 64 KiB slot so none overlap,
# of mixed sizes, some unaligned, some FUA; prints what was written.
AIO_WRITES = """
import random, nbd
rng = random.Random({seed})
slot = 65536
inflight = []
writes = []
for i in range(h.get_size() // slot):
    n = rng.choice([512, 4096, 4096, 16384, 65536, 30000])
    off = i * slot + rng.randrange(0, slot - n + 1)
    if rng.random() < 0.8:
        off &= ~511
    data = bytes([rng.randrange(256)]) * n
    flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
    inflight.append(h.aio_pwrite(data, off, flags=flags))
    writes.append((off, data[0], n))
    while len(inflight) >= {qd}:
        h.poll(-1)
        inflight = [c for c in inflight if not h.aio_command_completed(c)]
while inflight:
    h.poll(-1)
    inflight = [c for c in inflight if not h.aio_command_completed(c)]
h.flush()
print(repr(writes))
"""


def test_writes_at_high_queue_depth_reach_the_remote(remotes: Remotes, lbd_server,
                                                     tmp_path: Path) -> None:
    """-N: many writes in flight (plain aligned ones started with no task; FUA and
    unaligned ones the other way); after FLUSH the remote holds exactly them."""
    import ast

    img = random_file(tmp_path / "w.img", SIZE, seed=71)
    expected = bytearray(img.read_bytes())
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-N", kit.uri])
    writes = ast.literal_eval(nbdsh(srv.uri, AIO_WRITES.format(seed=72, qd=64)).strip())
    assert len(writes) == SIZE // 65536
    for off, b, n in writes:
        expected[off:off + n] = bytes([b]) * n
    assert srv.stop() == 0
    assert img.read_bytes() == expected
    assert "Traceback" not in srv.log()
