"""Data written by real clients survives the server: clean stops and kill -9.

Clean stop: SIGTERM must end ``lbd serve`` with exit 0, and the same stack
served again shows every write; the base image is never modified (sha256),
served alone it shows the old contents, and the change file alone carries
the writes.

Crash: a client logs each write the server acknowledged; the server is
killed with SIGKILL at a random moment, restarted on the same files, and
every acknowledged write must read back (the write in flight may have landed
or not, but sector by sector it is the old or the new data).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import TOOL_PATH, lbd_exe, mgmt, nbdsh, random_file, require, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
SLOT = 64 * KiB  # crash tests write each slot at most once
SECTOR = 512


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump(uri: str, path: Path) -> bytes:
    nbdsh(uri, f"open({str(path)!r}, 'wb').write(h.pread({SIZE}, 0))")
    return path.read_bytes()


def assert_same(got: bytes, want: bytes | bytearray, what: str = "device") -> None:
    assert len(got) == len(want)
    if got != want:
        first = next(i for i in range(len(got)) if got[i] != want[i])
        raise AssertionError(f"{what} differs from the model first at byte {first} "
                             f"(sector {first // SECTOR})")


def clean_stop(srv: Any) -> None:
    assert srv.stop() == 0, srv.log()
    assert "stopped cleanly" in srv.log(), srv.log()


def client_writes(uri: str, model: bytearray, tmp_path: Path) -> None:
    """Aligned and unaligned writes, a zero and a trim, mirrored in ``model``."""
    rng = random.Random(41)
    ops = []
    for off, n in ((0, 4096), (100, 1000), (1 * MiB, 256 * KiB), (5 * MiB + 3, 70000),
                   (SIZE - 4096, 4096), (12 * MiB + 511, 2)):
        data = rng.randbytes(n)
        model[off:off + n] = data
        ops.append((off, data.hex()))
    f = tmp_path / "writes.json"
    f.write_text(json.dumps(ops))
    model[2 * MiB:3 * MiB] = bytes(1 * MiB)
    model[8 * MiB:8 * MiB + 64 * KiB] = bytes(64 * KiB)
    nbdsh(uri, f"""
import json
for off, hx in json.load(open({str(f)!r})):
    h.pwrite(bytes.fromhex(hx), off)
h.zero({1 * MiB}, {2 * MiB})
h.trim({64 * KiB}, {8 * MiB})
""")


# -- clean stop and restart ------------------------------------------------------------------


def test_restart_keeps_writes(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=40)
    chg = tmp_path / "c.lbd"
    model = bytearray(base.read_bytes())
    before = sha256(base)
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(chg)])
    client_writes(srv.uri, model, tmp_path)
    clean_stop(srv)
    for i in range(2):  # twice: the second open reads what the first close wrote
        srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(chg)])
        assert_same(dump(srv.uri, tmp_path / f"dump{i}"), model)
        clean_stop(srv)
    assert sha256(base) == before


def test_restart_base_alone_then_stack(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=42)
    original = base.read_bytes()
    before = sha256(base)
    chg = tmp_path / "c.lbd"
    model = bytearray(original)
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(chg)])
    client_writes(srv.uri, model, tmp_path)
    clean_stop(srv)
    assert sha256(base) == before
    # the base alone: its old contents, read-only
    srv = lbd_server(["-s", "16M", "-f", str(base)])
    assert_same(dump(srv.uri, tmp_path / "base-dump"), original, "base served alone")
    clean_stop(srv)
    assert sha256(base) == before
    # the change file read-only over the base: the writes are all there
    srv = lbd_server(["-s", "16M", "-f", str(base), "-e", str(chg)])
    assert_same(dump(srv.uri, tmp_path / "ro-dump"), model, "stack with -e")
    clean_stop(srv)
    # and writable again
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(chg)])
    assert_same(dump(srv.uri, tmp_path / "rw-dump"), model, "stack with -E")
    clean_stop(srv)
    assert sha256(base) == before


def test_restart_change_file_without_base(lbd_server, tmp_path: Path) -> None:
    chg = tmp_path / "c.lbd"
    model = bytearray(SIZE)
    srv = lbd_server(["-s", "16M", "-E", str(chg)])
    client_writes(srv.uri, model, tmp_path)
    clean_stop(srv)
    srv = lbd_server(["-s", "16M", "-E", str(chg)])
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


def test_restart_writable_flat(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=43)
    model = bytearray(base.read_bytes())
    srv = lbd_server(["-s", "16M", "-F", str(base)])
    client_writes(srv.uri, model, tmp_path)
    clean_stop(srv)
    assert_same(base.read_bytes(), model, "flat image file")
    srv = lbd_server(["-s", "16M", "-f", str(base)])
    assert_same(dump(srv.uri, tmp_path / "dump"), model)


# -- kill -9 ------------------------------------------------------------------------------------

# The client: writes unique patterns (and some zeroes and trims) into distinct
# slots and prints one line per acknowledged request.  Synchronous (one in
# flight) or aio (many in flight).
CRASH_CLIENT = """
import json, random, sys
rng = random.Random({seed})
slots = {slots!r}
depth = {depth}
def kind(i):
    return 'zero' if i % 7 == 3 else 'trim' if i % 7 == 5 else 'write'
def pattern(i, n):
    if kind(i) != 'write':
        return bytes(n)
    head = ('%08d:' % i).encode()
    return (head * (n // len(head) + 1))[:n]
def plan(i, slot):
    sizes = [512, 4096, 8192, 65536] if kind(i) == 'trim' else \\
        [512, 4096, 4096, 8192, 65536, 1000, 33333]
    n = rng.choice(sizes)
    if n % 512:
        off = slot * {slot} + rng.randrange(0, {slot} - n)
    else:
        off = slot * {slot} + rng.randrange(0, ({slot} - n) // 512 + 1) * 512
    return off, n
todo = [(i + {first}, plan(i + {first}, s)) for i, s in enumerate(slots)]
print('START', flush=True)
if depth == 1:
    for i, (off, n) in todo:
        print('SEND', i, off, n, flush=True)
        if kind(i) == 'write':
            h.pwrite(pattern(i, n), off)
        elif kind(i) == 'zero':
            h.zero(n, off)
        else:
            h.trim(n, off)
        print('ACK', i, off, n, flush=True)
else:
    pending = list(todo)
    def acked(i, off, n):
        def cb(err):
            if not err.value:
                print('ACK', i, off, n, flush=True)
            return 1
        return cb
    while pending or h.aio_in_flight():
        while pending and h.aio_in_flight() < depth:
            i, (off, n) = pending.pop(0)
            print('SEND', i, off, n, flush=True)
            if kind(i) == 'write':
                h.aio_pwrite(pattern(i, n), off, acked(i, off, n))
            elif kind(i) == 'zero':
                h.aio_zero(n, off, acked(i, off, n))
            else:
                h.aio_trim(n, off, acked(i, off, n))
        h.poll(-1)
print('DONE', flush=True)
"""


def pattern(i: int, n: int) -> bytes:
    """What request #i leaves: its pattern (writes) or zeros (every 7th from 3:
    WRITE_ZEROES, from 5: TRIM, which LBD records as zeros)."""
    if i % 7 in (3, 5):
        return bytes(n)
    head = (b"%08d:" % i)
    return (head * (n // len(head) + 1))[:n]


def crash_round(srv: Any, slots: list[int], first: int, depth: int, seed: int,
                kill_after: int, sig: int = signal.SIGKILL
                ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Run the client, signal the server (SIGKILL) after ``kill_after`` acks.

    Returns (acknowledged writes, writes sent but not acknowledged).
    """
    require("nbdsh")
    script = CRASH_CLIENT.format(seed=seed, slots=slots, depth=depth, slot=SLOT, first=first)
    env = {**os.environ, "PATH": TOOL_PATH}
    with open(srv.log_path.with_suffix(".client-err"), "w+") as err_file:
        client = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", script],
                                  stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        assert client.stdout is not None
        lines: list[str] = []
        acks = 0
        deadline = time.monotonic() + 60
        killed = False
        for line in client.stdout:
            lines.append(line)
            if line.startswith("ACK"):
                acks += 1
                if acks >= kill_after:
                    srv.proc.send_signal(sig)
                    killed = True
                    break
            assert time.monotonic() < deadline, "client too slow"
        # everything the client printed up to its end (it fails once the server is gone);
        # read through the same buffered stream, which may hold lines already
        lines += client.stdout.readlines()
        client.wait(60)
        err_file.seek(0)
        err = err_file.read()
    srv.proc.wait(30)
    srv.stop()
    assert killed, f"the client finished before {kill_after} acks:\n{''.join(lines[-5:])}{err}"
    if sig == signal.SIGKILL:
        assert srv.proc.returncode == -signal.SIGKILL
    else:
        assert srv.proc.returncode == 0, srv.log()
    sent, acked = {}, {}
    for line in lines:
        parts = line.split()
        if parts and parts[0] in ("SEND", "ACK"):
            rec = (int(parts[1]), int(parts[2]), int(parts[3]))
            (sent if parts[0] == "SEND" else acked)[rec[0]] = rec
    return list(acked.values()), [v for k, v in sent.items() if k not in acked]


def check_crash_state(data: bytes, base: bytes, acked: list[tuple[int, int, int]],
                      unsure: list[tuple[int, int, int]]) -> None:
    for i, off, n in acked:
        assert data[off:off + n] == pattern(i, n), f"acknowledged write #{i} at {off}+{n} lost"
    for i, off, n in unsure:
        new = bytearray(base[off & ~511:(off + n + 511) & ~511])
        new[off - (off & ~511):off - (off & ~511) + n] = pattern(i, n)
        for s in range(off & ~511, (off + n + 511) & ~511, SECTOR):
            got = data[s:s + SECTOR]
            rel = s - (off & ~511)
            assert got in (base[s:s + SECTOR], bytes(new[rel:rel + SECTOR])), \
                f"write #{i} in flight at the crash left sector {s // SECTOR} neither old nor new"


def crash_test(lbd_server, tmp_path: Path, depth: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    base = random_file(tmp_path / "base.img", SIZE, seed=seed)
    before = sha256(base)
    chg = tmp_path / "c.lbd"
    args = ["-s", "16M", "-f", str(base), "-E", str(chg)]
    # the expected contents: base, then every acknowledged write
    expect = bytearray(base.read_bytes())
    rng = random.Random(seed)
    free = list(range(SIZE // SLOT))
    rng.shuffle(free)
    all_acked: list[tuple[int, int, int]] = []
    unsure: list[tuple[int, int, int]] = []
    first = 0
    for round_ in range(3):
        srv = lbd_server(args)
        slots, free = free[:60], free[60:]
        acked, in_flight = crash_round(srv, slots, first, depth, seed * 10 + round_,
                                       kill_after=rng.randrange(5, 50))
        first += len(slots)
        assert acked, "nothing was acknowledged before the kill"
        all_acked += acked
        unsure += in_flight
        for i, off, n in acked:
            expect[off:off + n] = pattern(i, n)
        srv = lbd_server(args)
        data = dump(srv.uri, tmp_path / f"dump{round_}")
        check_crash_state(data, bytes(expect), all_acked, unsure)
        # the in-flight writes settle one way or the other: take what is there
        for _, off, n in unsure:
            lo, hi = off & ~511, (off + n + 511) & ~511
            expect[lo:hi] = data[lo:hi]
        unsure = []
        assert srv.stop() == 0
    # finally a clean restart: everything still there, base untouched
    srv = lbd_server(args)
    assert_same(dump(srv.uri, tmp_path / "final"), expect)
    assert sha256(base) == before


def test_kill9_acknowledged_writes_survive_sync_client(lbd_server, tmp_path: Path) -> None:
    crash_test(lbd_server, tmp_path, depth=1, seed=50)


def test_kill9_acknowledged_writes_survive_aio_client(lbd_server, tmp_path: Path) -> None:
    crash_test(lbd_server, tmp_path, depth=16, seed=51)


def test_sigterm_under_load_keeps_acknowledged_writes(lbd_server, tmp_path: Path) -> None:
    """SIGTERM while a client has many writes in flight: the server finishes
    them, exits 0, and every acknowledged write is there after a restart."""
    base = random_file(tmp_path / "base.img", SIZE, seed=52)
    args = ["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")]
    srv = lbd_server(args)
    slots = random.Random(52).sample(range(SIZE // SLOT), 200)
    acked, in_flight = crash_round(srv, slots, 0, 32, 520, kill_after=40, sig=signal.SIGTERM)
    assert "stopped cleanly" in srv.log()
    srv = lbd_server(args)
    data = dump(srv.uri, tmp_path / "dump")
    check_crash_state(data, base.read_bytes(), acked, in_flight)


def test_kill9_then_writes_continue(lbd_server, tmp_path: Path) -> None:
    """After a crash and a restart, new writes append after the recovered
    journal and everything survives another kill -9."""
    chg = tmp_path / "c.lbd"
    args = ["-s", "16M", "-E", str(chg)]
    srv = lbd_server(args)
    nbdsh(srv.uri, f"h.pwrite(b'A' * {1 * MiB}, 0)")
    srv.kill9()
    srv = lbd_server(args)
    nbdsh(srv.uri, f"assert h.pread({1 * MiB}, 0) == b'A' * {1 * MiB}\n"
                   f"h.pwrite(b'B' * {1 * MiB}, {512 * KiB})\nh.pwrite(b'C' * 4096, {8 * MiB})")
    srv.kill9()
    srv = lbd_server(args)
    want = bytearray(SIZE)
    want[0:1 * MiB] = b"A" * MiB
    want[512 * KiB:1536 * KiB] = b"B" * MiB
    want[8 * MiB:8 * MiB + 4096] = b"C" * 4096
    assert_same(dump(srv.uri, tmp_path / "dump"), want)
    run(["nbdinfo", srv.uri])  # still a healthy server


def test_sigterm_right_after_start_exits_0(tmp_path: Path) -> None:
    """SIGTERM the moment the server is reachable: still a clean stop, exit 0.

    A signal that arrives before the handler is installed kills the process
    outright: no flush, no close, no index written, a stale socket left.
    """
    import tempfile

    codes = []
    for i in range(10):
        sockdir = tempfile.mkdtemp(prefix="lbdt-")
        sock = os.path.join(sockdir, "s.sock")
        log = open(tmp_path / f"serve{i}.log", "wb")
        proc = subprocess.Popen([lbd_exe(), "serve", "-s", "16M", "-E", str(tmp_path / "c.lbd"),
                                 "--unix", sock, "-a", "127.0.0.1:0"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PATH": TOOL_PATH})
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and proc.poll() is None:
            assert time.monotonic() < deadline, "lbd serve did not start"
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        codes.append(proc.wait(30))
        log.close()
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(sockdir)
    assert codes == [0] * 10, f"exit codes {codes}; -15 = killed by the signal itself"


def test_default_device_in_data_dir(lbd_server, tmp_path: Path) -> None:
    """No layer flags: a writable 1 GiB device in $XDG_DATA_HOME/lbd that keeps its data."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    srv = lbd_server([], extra_env=env)
    require("nbdinfo")
    assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(1 << 30)
    nbdsh(srv.uri, "h.pwrite(b'default!' * 512, (1 << 30) - 4096)")
    clean_stop(srv)
    assert (tmp_path / "data" / "lbd" / "default.lbd").is_file()
    srv = lbd_server([], extra_env=env)
    out = nbdsh(srv.uri, "print(h.pread(4096, (1 << 30) - 4096) == b'default!' * 512)")
    assert out.strip() == "True"


@pytest.mark.parametrize("bs,region,rounds,per_flush,order", [
    (4096, MiB, 40, 8, "random"),  # 4 KiB pages
    (16384, MiB, 40, 2, "random"),  # a database's 16 KiB pages
    (65536, 2 * MiB, 20, 1, "ring"),  # a file system's journal: a ring of 64 KiB writes
])
def test_rewrites_between_flushes_do_not_grow_the_change_file(
        lbd_server, tmp_path: Path, bs: int, region: int, rounds: int, per_flush: int,
        order: str) -> None:
    """A database's pattern through the NBD server: the same data rewritten
    round after round, with a FLUSH every few writes.  Appending each rewrite
    of synced data would take rounds x region of disk; recycling dead payloads
    (docs/format.md) keeps the change file near a few times the region, every
    block reads back its last write after a restart, and lbd-inspect --check
    finds no corruption."""
    change = tmp_path / "db.lbd"
    srv = lbd_server(["-s", str(SIZE), "-E", str(change)], manage=True)
    nbdsh(srv.uri, f"""
import random, struct
offsets = list(range(0, {region}, {bs}))
n = 0
for r in range({rounds}):
    if {order!r} == "random":
        random.Random(r).shuffle(offsets)
    for off in offsets:
        h.pwrite(struct.pack('<II', r, off) * ({bs} // 8), off)
        n += 1
        if n % {per_flush} == 0:
            h.flush()
""")
    reply = mgmt(srv, "DEVICE_INFO")
    assert reply.kind == "OK", reply
    space = reply.value["layers"][0]["space"]
    assert space["recycled_bytes"] > (rounds - 4) * region, space
    assert space["live_bytes"] == region, space
    assert srv.stop() == 0
    used = os.stat(change).st_blocks * 512
    assert used < 4 * region + 2 * MiB, f"the change file uses {used} bytes of disk"
    srv = lbd_server(["-s", str(SIZE), "-E", str(change)])
    out = nbdsh(srv.uri, f"""
import struct
want = {rounds - 1}
bad = [off for off in range(0, {region}, {bs})
       if h.pread({bs}, off) != struct.pack('<II', want, off) * ({bs} // 8)]
print(len(bad))
""")
    assert out.split() == ["0"], out
    assert srv.stop() == 0
    p = run(["lbd-inspect", "--check", str(change)], check=False)
    assert p.returncode in (0, 3), p.stdout + p.stderr  # clean, or dead space to compact


def test_a_flush_syncs_exactly_when_writes_are_pending(lbd_server, tmp_path: Path) -> None:
    """FLUSH makes the change file durable with one fdatasync when writes were
    acknowledged since the last one, and answers at once (no fdatasync) when
    none were; a FUA write takes one fdatasync of its own; alone on the server
    (on the event loop) or beside another client (in a worker thread) alike.
    strace counts the server's fdatasync calls."""
    require("strace")
    change = tmp_path / "f.lbd"
    srv = lbd_server(["-s", str(SIZE), "-E", str(change)])
    out = tmp_path / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fdatasync", "-o", str(out),
                               "-p", str(srv.proc.pid)],
                              stderr=subprocess.PIPE, env={**os.environ, "PATH": TOOL_PATH})
    try:
        # until strace is attached to every thread of the server
        tasks = Path(f"/proc/{srv.proc.pid}/task")
        deadline = time.monotonic() + 30
        while not all("TracerPid:\t0\n" not in (t / "status").read_text()
                      for t in tasks.iterdir()):
            assert time.monotonic() < deadline and tracer.poll() is None, "strace did not attach"
            time.sleep(0.02)
        nbdsh(srv.uri, f"""
import nbd
h.pwrite(b"a" * 4096, 0)
h.flush()             # 1
h.flush()             # nothing new: no fdatasync
h.pwrite(b"b" * 4096, 8192)
h.flush()             # 2
h2 = nbd.NBD()        # a second client: flushes go through a worker thread
h2.connect_uri({srv.uri!r})
h2.flush()            # nothing new
h.pwrite(b"c" * 4096, 0)
h2.flush()            # 3: another connection's acknowledged write
h.flush()             # nothing new
h2.pwrite(b"d" * 4096, 4096, nbd.CMD_FLAG_FUA)  # 4: durable before its reply
h2.flush()            # nothing new
h2.shutdown()
h.pwrite(b"e" * 4096, 4096, nbd.CMD_FLAG_FUA)   # 5: alone again, on the event loop
h.flush()             # nothing new
""")
    finally:
        tracer.terminate()
        tracer.wait(30)
    calls = [line for line in out.read_text().splitlines() if "fdatasync(" in line]
    assert len(calls) == 5, calls
    assert not any("= -1" in line for line in calls), calls
