"""Load: dozens of connections, hundreds of requests in flight, for a minute or ten.

32 fio jobs (32 NBD connections, 16 requests in flight each: 512 in all)
write random 4 KiB blocks of their own 3 MiB region over a random base, every
block carrying a crc32c header that fio reads back and checks as it goes
(``verify_backlog``).  Beside them, four libnbd clients keep 32 requests in
flight each (writes, reads, WRITE_ZEROES, TRIM, block status) on their own
regions and check every read against a model; each ends with a FLUSH and a
full check.  The server's resident memory is sampled every second.

FLUSH is not part of the running mix on purpose: after a sync, the next
rewrite of each block appends instead of going in place, and at this rate
the change file would grow by gigabytes a minute.  FLUSH under concurrency
is tried by tests/test_crash_fio.py and tests/test_interop_fio.py.

Memory bound, stated: the server's RSS never exceeds its idle RSS plus
256 MiB (receive buffers of up to 4 MiB per connection, queued replies, page
cache of the extent maps: ~150 MiB measured), and between the first third of
the run and its end it grows by less than 32 MiB (no leak proportional to
the requests served).

``LBD_LONG_TESTS=1`` runs 10 minutes instead of 1 (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

from support import TOOL_PATH, random_file, require

MiB = 1 << 20
KiB = 1 << 10
LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
RUNTIME = 600 if LONG else 60
JOBS = 32
REGION = 3 * MiB
CLIENTS = 4
CLIENT_REGION = 8 * MiB
SIZE = JOBS * REGION + CLIENTS * CLIENT_REGION  # 128 MiB


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def model_client(uri: str, base: int, seed: int, deadline: float, errors: list[str],
                 counts: list[int]) -> None:
    """32 requests in flight on [base, base + CLIENT_REGION), every read checked."""
    import nbd

    rng = random.Random(seed)
    model = bytearray(CLIENT_REGION)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    try:
        # start from known contents: the region is zeroed first
        h.zero(CLIENT_REGION, base)
        done = 0
        inflight: dict[int, tuple[str, int, int, object, bytes | None]] = {}
        busy: set[int] = set()  # 4 KiB blocks with a request in flight: no overlaps

        def blocks(off: int, n: int) -> range:
            return range(off // 4096, (off + n + 4095) // 4096)

        while time.monotonic() < deadline or inflight:
            while time.monotonic() < deadline and len(inflight) < 32:
                n = rng.choice([512, 1536, 4096, 4096, 8192])
                off = rng.randrange(0, CLIENT_REGION - n) // 512 * 512
                if busy.intersection(blocks(off, n)):
                    continue
                kind = rng.choice(["write"] * 4 + ["read"] * 4 + ["zero", "trim", "status"])
                buf = None
                if kind == "write":
                    data = rng.randbytes(n)
                    cookie = h.aio_pwrite(data, base + off)
                    model[off:off + n] = data
                elif kind in ("zero", "trim"):
                    cookie = (h.aio_zero if kind == "zero" else h.aio_trim)(n, base + off)
                    if kind == "zero":
                        model[off:off + n] = bytes(n)
                    else:  # whole sectors read as zero after TRIM in LBD
                        a0, a1 = (off + 511) // 512 * 512, (off + n) // 512 * 512
                        model[a0:a1] = bytes(max(0, a1 - a0))
                elif kind == "read":
                    buf = nbd.Buffer(n)
                    cookie = h.aio_pread(buf, base + off)
                else:
                    cookie = h.aio_block_status(n, base + off, lambda *a: 0)
                if kind in ("write", "zero", "trim", "read"):
                    busy.update(blocks(off, n))
                inflight[cookie] = (kind, off, n, buf,
                                    bytes(model[off:off + n]) if kind == "read" else None)
            h.poll(-1)
            for cookie in [c for c in inflight if h.aio_command_completed(c)]:
                kind, off, n, buf, want = inflight.pop(cookie)
                done += 1
                if kind == "read" and buf.to_bytearray() != want:  # type: ignore[attr-defined]
                    errors.append(f"client {seed}: read at {base + off} returned wrong data")
                if kind in ("write", "zero", "trim", "read"):
                    busy.difference_update(blocks(off, n))
        # a final flush and full check of the region
        h.flush()
        got = h.pread(CLIENT_REGION, base)
        if got != model:
            first = next(i for i in range(CLIENT_REGION) if got[i] != model[i])
            errors.append(f"client {seed}: region differs from the model at {base + first}")
        counts.append(done)
    except Exception as exc:  # reported by the test
        errors.append(f"client {seed}: {exc!r}")
    finally:
        h.shutdown()


def test_many_clients_for_minutes_with_verification(lbd_server, tmp_path: Path) -> None:
    require("fio")
    base = random_file(tmp_path / "base.img", SIZE, seed=70)
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    pid = srv.proc.pid
    time.sleep(0.5)
    idle = rss_kib(pid)
    deadline = time.monotonic() + RUNTIME
    fio_cmd = ["fio", "--ioengine=nbd", f"--uri={srv.uri}", "--name=load", "--rw=randwrite",
               "--bs=4k", "--iodepth=16", f"--numjobs={JOBS}",
               f"--size={REGION}", f"--offset_increment={REGION}", "--verify=crc32c",
               "--verify_backlog=32", "--verify_fatal=1", "--time_based",
               f"--runtime={RUNTIME}", "--verify_state_save=0", "--group_reporting",
               "--output-format=normal"]
    fio = subprocess.Popen(fio_cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PATH": TOOL_PATH})
    errors: list[str] = []
    counts: list[int] = []
    clients = [threading.Thread(target=model_client,
                                args=(srv.uri, JOBS * REGION + i * CLIENT_REGION, i,
                                      deadline, errors, counts)) for i in range(CLIENTS)]
    for t in clients:
        t.start()
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    while fio.poll() is None or any(t.is_alive() for t in clients):
        samples.append((time.monotonic() - start, rss_kib(pid)))
        assert srv.proc.poll() is None, srv.log()[-3000:]
        time.sleep(1)
        assert time.monotonic() < deadline + 300, "the load did not finish"
    out, err = fio.communicate()
    for t in clients:
        t.join()
    assert fio.returncode == 0, f"fio exited {fio.returncode}\n{err}\n{out[-3000:]}"
    assert "READ:" in out and "WRITE:" in out, out[-3000:]  # it did verify as it went
    assert "verify:" not in err and "err=" not in out.replace("err= 0", ""), out[-3000:]
    assert not errors, errors
    assert len(counts) == CLIENTS and min(counts) > 1000, counts
    peak = max(r for _, r in samples)
    third = [r for t, r in samples if t >= RUNTIME / 3]
    at_third, at_end = third[0], samples[-1][1]
    summary = out[out.find("WRITE:"):].splitlines()[0] if "WRITE:" in out else "?"
    print(f"\nload: {JOBS} fio connections x 16 + {CLIENTS} clients x 32 in flight, "
          f"{RUNTIME} s; fio: {summary}"
          f"; model clients: {sum(counts)} requests; RSS idle {idle // 1024} MiB, peak "
          f"{peak // 1024} MiB, at 1/3 {at_third // 1024} MiB, end {at_end // 1024} MiB")
    assert peak < idle + 256 * 1024, f"RSS peaked at {peak} kB (idle {idle} kB)"
    assert at_end < at_third + 32 * 1024, \
        f"RSS grew from {at_third} kB to {at_end} kB during the run: a leak?"
    log = srv.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
