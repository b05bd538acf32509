"""The NBD layer when the remote goes away: fio through the stack while the
remote is killed (SIGKILL, by PID) and restarted; EIO (never a hang) when it
stays away; the read cache and the -X write-back cache.

"No acknowledged write is lost" is checked by the remote itself: after LBD
stops, fio's ``--verify_only`` runs directly against the remote and must find
every block fio wrote through LBD.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from remotes import Remote, Remotes
from support import LBD, TOOL_PATH, nbdsh, random_file, require, run

MiB = 1 << 20
SIZE = 32 * MiB

FIO_WRITE = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M", "--numjobs=2",
             "--offset_increment=16M", "--verify=crc32c", "--randrepeat=1",
             "--rate_iops=1500"]


def fio_cmd(uri: str, *args: str) -> list[str]:
    require("fio")
    return ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", "--name=nbdl",
            "--verify_state_save=0", *args]


def fio_check(p: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> list[dict[str, Any]]:
    code, out, err = (p.returncode, p.stdout, p.stderr) if not isinstance(p, tuple) else p
    body = out[out.find("{"):]
    assert code == 0, f"fio exited {code}\n{err}\n{out[-3000:]}"
    assert "verify:" not in err and "bad magic" not in err, err
    jobs = json.loads(body)["jobs"]
    for j in jobs:
        assert j["error"] == 0, j
    return list(jobs)


def start_fio(uri: str, *args: str) -> subprocess.Popen[str]:
    import os

    return subprocess.Popen(fio_cmd(uri, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": TOOL_PATH})


def outage_during(proc: subprocess.Popen[str], remote: Remote, srv: LBD,
                  after: float = 1.0, down: float = 1.5) -> tuple[int, str, str]:
    """Kill the remote ``after`` seconds into the fio run, bring it back ``down`` later."""
    time.sleep(after)
    assert proc.poll() is None, "fio finished before the outage: make it longer"
    remote.kill()
    time.sleep(down)
    remote.start()
    out, err = proc.communicate(timeout=300)
    log = srv.log()
    assert "connection lost" in log and "reconnected" in log, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    return proc.returncode, out, err


def no_lost_writes(remote_uri: str) -> None:
    """fio reads back every block it wrote, directly from the remote."""
    fio_check(run(fio_cmd(remote_uri, *FIO_WRITE, "--verify_only"), check=False,
                  timeout=300))


def test_kill_remote_mid_fio_writable(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    img = random_file(tmp_path / "r.img", SIZE, seed=41)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-N", kit.uri, "--nbd-timeout", "60"])
    proc = start_fio(srv.uri, *FIO_WRITE)
    jobs = fio_check(outage_during(proc, kit, srv))
    assert all(j["write"]["io_bytes"] == 8 * MiB for j in jobs)
    assert srv.stop() == 0
    no_lost_writes(kit.uri)


def test_kill_remote_mid_fio_writeback_cache(remotes: Remotes, lbd_server,
                                             tmp_path: Path) -> None:
    """-X with a cache smaller than what fio writes: write-backs under pressure and
    on fio's periodic FLUSH, across the outage; shutdown writes back the rest."""
    img = random_file(tmp_path / "x.img", SIZE, seed=42)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-X", kit.uri, "--nbd-cache", "4m",
                      "--nbd-timeout", "60"])
    proc = start_fio(srv.uri, *FIO_WRITE, "--fsync=256")
    fio_check(outage_during(proc, kit, srv))
    assert srv.stop() == 0
    no_lost_writes(kit.uri)


def test_kill_remote_mid_fio_base_with_change_file(remotes: Remotes, lbd_server,
                                                   tmp_path: Path) -> None:
    """-n under a change file: reads of the base wait for the remote and resume."""
    img = random_file(tmp_path / "b.img", SIZE, seed=43)
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd"),
                      "--nbd-timeout", "60"])
    proc = start_fio(srv.uri, "--rw=randrw", "--bs=16k", "--iodepth=16", "--size=8M",
                     "--numjobs=2", "--offset_increment=16M", "--verify=crc32c",
                     "--rate_iops=600", "--time_based", "--runtime=4")
    fio_check(outage_during(proc, kit, srv))


def test_remote_away_longer_than_the_timeout(remotes: Remotes, lbd_server,
                                             tmp_path: Path) -> None:
    """EIO after --nbd-timeout, never a hang; local data still served; I/O resumes."""
    img = random_file(tmp_path / "t.img", SIZE, seed=44)
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd"),
                      "--nbd-timeout", "2"])
    nbdsh(srv.uri, "h.pwrite(b'L' * 65536, 0); h.flush()")
    kit.kill()
    t0 = time.monotonic()
    out = run(["nbdsh", "--base-allocation", "-u", srv.uri, "-c", """
import nbd
assert h.pread(65536, 0) == b'L' * 65536   # local: still served
for off in (8 << 20, 20 << 20):
    try:
        h.pread(65536, off)
    except nbd.Error as e:
        print(e.errno)
try:
    h.block_status(4 << 20, 1 << 20, lambda *a: 0)
except nbd.Error as e:
    print(e.errno)
"""]).stdout
    assert out.split() == ["EIO", "EIO", "EIO"], out
    assert time.monotonic() - t0 < 60
    kit.start()
    assert read_through(srv.uri, 8 * MiB, 65536) == img.read_bytes()[8 * MiB:8 * MiB + 65536]
    assert srv.stop() == 0


def test_read_cache_answers_while_the_remote_is_away(remotes: Remotes, lbd_server,
                                                     tmp_path: Path) -> None:
    img = random_file(tmp_path / "c.img", SIZE, seed=45)
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "--nbd-cache", "8m", "--nbd-timeout", "2"],
                     manage=True)
    data = img.read_bytes()
    nbdsh(srv.uri, "h.pread(4 << 20, 1 << 20)")
    kit.kill()
    script = """
import hashlib, nbd
print(hashlib.sha256(h.pread(4 << 20, 1 << 20)).hexdigest())
print(hashlib.sha256(h.pread(1 << 20, 2 << 20)).hexdigest())
try:
    h.pread(65536, 16 << 20)
except nbd.Error as e:
    print(e.errno)
"""
    import hashlib

    out = nbdsh(srv.uri, script).split()
    assert out == [hashlib.sha256(data[MiB:5 * MiB]).hexdigest(),
                   hashlib.sha256(data[2 * MiB:3 * MiB]).hexdigest(), "EIO"]


def test_writeback_cache_holds_dirty_data_until_the_remote_flushed(
        remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    img = random_file(tmp_path / "w.img", SIZE, seed=46)
    orig = img.read_bytes()
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-X", kit.uri, "--nbd-timeout", "60"])
    nbdsh(srv.uri, "h.pwrite(b'1' * (1 << 20), 0)")  # no flush
    assert img.read_bytes()[:MiB] == orig[:MiB]  # still only in LBD's cache
    nbdsh(srv.uri, "assert h.pread(1 << 20, 0) == b'1' * (1 << 20); h.flush()")
    assert img.read_bytes()[:MiB] == b"1" * MiB
    # dirty data written while the remote is away, flushed after it is back
    kit.kill()
    nbdsh(srv.uri, "h.pwrite(b'2' * (1 << 20), 4 << 20)")  # acknowledged from the cache
    flusher = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", "h.flush(); print('flushed')"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PATH": TOOL_PATH})
    time.sleep(1)
    assert flusher.poll() is None, "FLUSH returned while the remote was away"
    kit.start()
    out, err = flusher.communicate(timeout=120)
    assert out.strip() == "flushed", err
    assert img.read_bytes()[4 * MiB:5 * MiB] == b"2" * MiB
    # the rest goes out at shutdown
    nbdsh(srv.uri, "h.pwrite(b'3' * 8192, 8 << 20); h.zero(65536, 12 << 20)")
    assert srv.stop(signal.SIGTERM) == 0
    data = img.read_bytes()
    assert data[8 * MiB:8 * MiB + 8192] == b"3" * 8192
    assert data[12 * MiB:12 * MiB + 65536] == bytes(65536)
    assert data[16 * MiB:] == orig[16 * MiB:]


def test_add_layer_over_a_writeback_remote(remotes: Remotes, lbd_server,
                                           tmp_path: Path) -> None:
    """``lbd ctl add-layer`` over -X: the dirty data is written back first, so the new
    change file records the remote as it really is, and the restart line reopens it."""
    import shlex

    from support import lbd_exe, mgmt

    img = random_file(tmp_path / "a.img", SIZE, seed=47)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-X", kit.uri], manage=True)
    nbdsh(srv.uri, "h.pwrite(b'D' * (1 << 20), 2 << 20)")  # dirty, in the cache
    new = tmp_path / "top.lbd"
    reply = mgmt(srv, "LIVE_ADD_LAYER", str(new))
    assert reply.kind == "OK", reply
    assert img.read_bytes()[2 * MiB:3 * MiB] == b"D" * MiB
    nbdsh(srv.uri, "h.pwrite(b'T' * 512, 0); h.flush()")
    argv = shlex.split(reply.value["command_line"])
    assert argv[argv.index("-n") + 1] == kit.uri and argv[argv.index("-E") + 1] == str(new)
    assert srv.stop() == 0
    assert img.read_bytes()[:512] != b"T" * 512  # the top layer took that write
    sock = tmp_path / "again.sock"
    again = [lbd_exe(), *argv[1:]]
    again[again.index("--unix") + 1] = str(sock)
    again[again.index("-a") + 1] = "none"
    p = subprocess.Popen(again, stderr=subprocess.PIPE, text=True,
                         env={"PATH": TOOL_PATH})
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert p.poll() is None, p.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = nbdsh(f"nbd+unix:///?socket={sock}",
                    "print(bytes(h.pread(1, 0)), bytes(h.pread(1, 2 << 20)))")
        assert out.split() == ["b'T'", "b'D'"]
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0


def test_a_hung_remote_gives_eio_then_recovers(remotes: Remotes, lbd_server,
                                               tmp_path: Path) -> None:
    """A remote that stops answering (SIGSTOP) but keeps its connections open."""
    import os

    img = random_file(tmp_path / "h.img", SIZE, seed=48)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-N", kit.uri, "--nbd-timeout", "2"])
    nbdsh(srv.uri, "h.pread(4096, 0)")
    os.kill(kit.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = nbdsh(srv.uri, """
import nbd
for op in (lambda: h.pread(65536, 1 << 20), lambda: h.pwrite(b'x' * 4096, 0),
           lambda: h.flush()):
    try:
        op()
        print('ok')
    except nbd.Error as e:
        print(e.errno)
""")
        assert out.split() == ["EIO", "EIO", "EIO"], out
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(kit.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    want = img.read_bytes()[MiB:MiB + 65536]
    while True:
        got = run(["nbdsh", "-u", srv.uri, "-c",
                   "import sys; sys.stdout.buffer.write(h.pread(65536, 1 << 20))"],
                  check=False, input=b"")
        if got.returncode == 0:
            assert got.stdout == want
            break
        assert time.monotonic() < deadline, got.stderr
        time.sleep(0.5)
    nbdsh(srv.uri, "h.pwrite(b'y' * 4096, 0); h.flush()")
    assert img.read_bytes()[:4096] == b"y" * 4096
    assert "Traceback" not in srv.log()


def test_remote_errors_reach_the_client(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    """EIO from the remote is EIO to the client, the connection and server go on."""
    trigger = tmp_path / "fail-now"
    kit = remotes.nbdkit("--filter=error", "memory", f"size={SIZE}", "error-pread=EIO",
                         "error-pread-rate=100%", "error-pwrite=ENOSPC",
                         "error-pwrite-rate=100%", f"error-file={trigger}")
    srv = lbd_server(["-s", "32M", "-N", kit.uri])
    trigger.touch()
    out = nbdsh(srv.uri, """
import nbd
for op in (lambda: h.pread(4096, 0), lambda: h.pwrite(b'x' * 4096, 0)):
    try:
        op()
        print('ok')
    except nbd.Error as e:
        print(e.errno)
""")
    assert out.split() == ["EIO", "ENOSPC"], out
    trigger.unlink()
    assert nbdsh(srv.uri, "h.pwrite(b'z' * 4096, 0); print(bytes(h.pread(2, 0)))").strip() \
        == "b'zz'"


def test_requests_are_split_to_the_remotes_maximum(remotes: Remotes, lbd_server,
                                                   tmp_path: Path) -> None:
    """A remote that refuses requests over 64 KiB still serves 4 MiB reads and writes."""
    log = tmp_path / "kit.log"
    kit = remotes.nbdkit("--filter=log", "--filter=blocksize-policy", "memory", f"size={SIZE}",
                         f"logfile={log}", "blocksize-minimum=512",
                         "blocksize-preferred=4096", "blocksize-maximum=65536",
                         "blocksize-error-policy=error")
    srv = lbd_server(["-s", "32M", "-N", kit.uri])
    out = nbdsh(srv.uri, """
data = bytes(range(256)) * (16 << 10)
h.pwrite(data, 1 << 20)
print(h.pread(4 << 20, 1 << 20) == data)
""")
    assert out.strip() == "True"
    import re

    text = log.read_text()
    counts = [int(c, 16) for c in re.findall(r"(?:Read|Write) id=\d+ offset=0x[0-9a-f]+ "
                                             r"count=0x([0-9a-f]+)", text)]
    assert len(counts) >= 128, text[:2000]  # 4 MiB each way, in 64 KiB pieces
    assert max(counts) == 65536, text[:2000]


def read_through(uri: str, offset: int, length: int, *, within: float = 30) -> bytes:
    """Read through LBD, retrying while it reconnects (its backoff is at most 2 s)."""
    deadline = time.monotonic() + within
    while True:
        got = run(["nbdsh", "-u", uri, "-c",
                   f"import sys; sys.stdout.buffer.write(h.pread({length}, {offset}))"],
                  check=False, input=b"")
        if got.returncode == 0:
            return bytes(got.stdout)
        assert time.monotonic() < deadline, got.stderr
        time.sleep(0.5)


def test_remote_stopped_gracefully_while_idle_is_let_go(remotes: Remotes, lbd_server,
                                                        tmp_path: Path) -> None:
    """nbdkit stopped with SIGTERM answers ESHUTDOWN and waits for its clients to
    leave.  An idle LBD notices through its keepalive (--nbd-keepalive), closes
    every connection to it so it can exit, and reconnects to its successor."""
    img = random_file(tmp_path / "g.img", SIZE, seed=46)
    data = img.read_bytes()
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd"),
                      "--nbd-keepalive", "1"])
    # a few reads at once, so the event loop's connections are in use too
    assert read_through(srv.uri, 3 * MiB, 4 * MiB) == data[3 * MiB:7 * MiB]
    took = kit.terminate(within=15)
    assert took < 10, took
    kit.start()
    assert read_through(srv.uri, 9 * MiB, 4 * MiB) == data[9 * MiB:13 * MiB]
    log = srv.log()
    assert "shutting down" in log and "reconnected" in log, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    assert srv.stop() == 0


def test_remote_stopped_gracefully_mid_fio_loses_nothing(remotes: Remotes, lbd_server,
                                                         tmp_path: Path) -> None:
    """A graceful restart of the remote (SIGTERM, then a new nbdkit) in the middle of
    fio's writes through -N: the remote gets to exit at once, fio's writes wait
    for its successor, and every acknowledged write reaches it."""
    img = random_file(tmp_path / "w.img", SIZE, seed=47)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-N", kit.uri, "--nbd-timeout", "60"])
    proc = start_fio(srv.uri, *FIO_WRITE)
    time.sleep(1.0)
    assert proc.poll() is None, "fio finished before the restart: make it longer"
    took = kit.terminate(within=15)
    assert took < 5, took
    time.sleep(0.5)
    kit.start()
    out, err = proc.communicate(timeout=300)
    jobs = fio_check((proc.returncode, out, err))
    assert all(j["write"]["io_bytes"] == 8 * MiB for j in jobs)
    log = srv.log()
    assert "shutting down" in log and "reconnected" in log, log[-3000:]
    assert "Traceback" not in log, log[-5000:]
    assert srv.stop() == 0
    no_lost_writes(kit.uri)
