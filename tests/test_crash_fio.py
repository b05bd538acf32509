"""kill -9 of ``lbd serve`` under a multi-connection ``fio --verify`` workload.

Four fio jobs (four NBD connections, 16 requests in flight each; 4 KiB,
64 KiB and 1 KiB writes, one job flushing every 16 writes) write a random
permutation of their own quarter of the device, every block carrying fio's
crc32c verification header.  fio talks to LBD through ``nbdkit --filter=log
nbd``, whose log says which writes LBD acknowledged.  At a random moment
``lbd serve`` is killed with SIGKILL, restarted on the same files, and:

* fio re-reads every block it issued (``verify_only``, ``verify_state_load``)
  and checks each header and checksum: every block that fails must be one
  whose write LBD never acknowledged (fio's saved state counts the writes in
  flight at the crash as done, so those may fail; nothing else may);
* independently, every acknowledged block is read back here and its fio
  header checked (magic, offset, length, header CRC).

Repeated for several rounds on the same change file over a base full of
random data; each round shifts the blocks by 512 bytes, so a block left over
from an earlier round never passes for a lost one.  A control run proves the
check can fail: the same verification against the base alone must fail.

``LBD_LONG_TESTS=1`` runs 60 rounds instead of 10 (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import time
from pathlib import Path

from crc32c import crc32c
from support import LBD, TOOL_PATH, random_file, require

MiB = 1 << 20
SIZE = 64 * MiB
LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
ROUNDS = 60 if LONG else 10

JOBS = """
[global]
ioengine=nbd
uri={uri}
rw=randwrite
verify=crc32c
randseed={seed}
iodepth=16
size={size}
{mode}

[small]
bs=4k
offset={o0}

[large]
bs=64k
offset={o1}

[tiny]
bs=1k
offset={o2}
size=4M

[flushing]
bs=4k
offset={o3}
fsync=16
"""

WRITE_MODE = "do_verify=0\nverify_state_save=1"
VERIFY_MODE = ("verify_only=1\nverify_state_load=1\nverify_state_save=0\n"
               "continue_on_error=verify")
QUARTER = SIZE // 4
_HDR = struct.Struct("<HHIQQIIHHI")  # fio's struct verify_header


def job_file(d: Path, uri: str, seed: int, shift: int, mode: str) -> Path:
    p = d / ("write.fio" if mode == WRITE_MODE else "verify.fio")
    p.write_text(JOBS.format(uri=uri, seed=seed, mode=mode, size=QUARTER - 64 * 1024,
                             **{f"o{i}": i * QUARTER + shift for i in range(4)}))
    return p


def fio_env() -> dict[str, str]:
    return {**os.environ, "PATH": TOOL_PATH}


def parse_acks(log: str) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(writes sent, writes LBD acknowledged) as (offset, length), from nbdkit's log."""
    sent: dict[tuple[str, str], tuple[int, int]] = {}
    acked: set[tuple[int, int]] = set()
    for line in log.splitlines():
        m = re.search(r"connection=(\d+) Write id=(\d+) offset=(0x[0-9a-f]+) "
                      r"count=(0x[0-9a-f]+)", line)
        if m:
            sent[(m[1], m[2])] = (int(m[3], 16), int(m[4], 16))
            continue
        m = re.search(r"connection=(\d+) \.\.\.Write id=(\d+) return=0", line)
        if m:
            acked.add(sent[(m[1], m[2])])
    return set(sent.values()), acked


def write_round(srv: LBD, d: Path, seed: int, shift: int, kill_after: float
                ) -> tuple[set[tuple[int, int]], set[tuple[int, int]], bool]:
    """fio -> nbdkit log -> LBD, SIGKILL after ``kill_after`` s.

    Returns (sent, acknowledged, whether fio was still writing at the kill).
    """
    require("fio", "nbdkit")
    ksock = str(d / "k.sock")
    klog = d / "nbdkit.log"
    proxy = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "--filter=log", "nbd",
                              f"socket={srv.sock}", f"logfile={klog}"], env=fio_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ksock):
            assert proxy.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        jf = job_file(d, f"nbd+unix:///?socket={ksock}", seed, shift, WRITE_MODE)
        with open(d / "write.out", "w") as out:
            fio = subprocess.Popen(["fio", str(jf)], cwd=d, stdout=out,
                                   stderr=subprocess.STDOUT, env=fio_env())
            # every job must be connected before the kill: one that never
            # connected saves no verify state (and proves nothing)
            deadline = time.monotonic() + 60
            while (d / "write.out").read_text().count("connected to NBD server") < 4:
                assert fio.poll() is None and time.monotonic() < deadline, \
                    f"fio jobs did not connect:\n{(d / 'write.out').read_text()}"
                time.sleep(0.01)
            time.sleep(kill_after)
            mid = fio.poll() is None
            srv.kill9()
            assert srv.proc.returncode == -9
            fio.wait(120)
    finally:
        proxy.terminate()
        proxy.wait(30)
    states = list(d.glob("*-verify.state"))
    assert len(states) == 4, f"fio saved no verify state:\n{(d / 'write.out').read_text()}"
    sent, acked = parse_acks(klog.read_text())
    return sent, acked, mid


def fio_verify(d: Path, uri: str, seed: int, shift: int) -> tuple[list[tuple[int, int]], int]:
    """fio's verification pass; (failed blocks as (offset, length), blocks read)."""
    jf = job_file(d, uri, seed, shift, VERIFY_MODE)
    # the state files are in the round's directory: fio looks for them in its cwd
    p = subprocess.run(["fio", str(jf)], cwd=d, capture_output=True, text=True, timeout=300,
                       env=fio_env())
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    bad = [(int(m[1]), int(m[2])) for m in
           re.finditer(r"requested block: offset=(\d+), length=(\d+)", out)]
    reads = sum(int(m[1]) for m in re.finditer(r"issued rwts: total=(\d+),", out))
    assert reads > 0, out[-3000:]
    return bad, reads


def check_headers(uri: str, blocks: set[tuple[int, int]]) -> None:
    """Every block carries the fio header its write put there."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for off, n in sorted(blocks):
            b = h.pread(n, off)
            magic, _vt, length, _seed, hoff, *_, crc = _HDR.unpack_from(b)
            assert (magic, length, hoff) == (0xACCA, n, off) and \
                crc == crc32c(b[:_HDR.size - 4]) ^ 0xFFFFFFFF, \
                f"acknowledged write {off}+{n} is not there after kill -9 (header " \
                f"magic {magic:#x}, offset {hoff}, length {length})"
    finally:
        h.shutdown()


def test_kill9_under_fio_verify_keeps_every_acknowledged_write(lbd_server,
                                                               tmp_path: Path) -> None:
    require("fio", "nbdkit")
    base = random_file(tmp_path / "base.img", SIZE, seed=80)
    args = ["-s", "64M", "-f", str(base), "-E", str(tmp_path / "c.lbd")]
    rng = random.Random(80)
    mid_workload = 0
    acked_total = 0
    for r in range(ROUNDS):
        d = tmp_path / f"round{r}"
        d.mkdir()
        seed, shift = 1000 + r, (r % 8) * 512
        srv = lbd_server(args)
        sent, acked, mid = write_round(srv, d, seed, shift, kill_after=rng.uniform(0.0, 0.4))
        mid_workload += mid
        assert acked, f"round {r}: nothing was acknowledged before the kill"
        acked_total += len(acked)
        srv = lbd_server(args)
        bad, reads = fio_verify(d, srv.uri, seed, shift)
        lost = [b for b in bad if b in acked]
        assert not lost, f"round {r}: acknowledged writes lost after kill -9: {lost[:10]}"
        assert all(b in sent for b in bad), f"round {r}: fio found bad blocks it never wrote"
        assert reads >= len(acked), (reads, len(acked))
        check_headers(srv.uri, acked)
        if r == 0:
            # the control: the same verification without the change file fails
            assert srv.stop() == 0
            alone = lbd_server(["-s", "64M", "-f", str(base)])
            bad, _ = fio_verify(d, alone.uri, seed, shift)
            assert len(bad) >= len(acked), "verification passed without the writes"
            assert alone.stop() == 0
        else:
            assert srv.stop() == 0
    print(f"\nkill -9 under fio: {ROUNDS} rounds, {acked_total} acknowledged writes "
          f"verified, {mid_workload} kills mid-workload")
    # most kills must land while fio was still writing, or the test proves little
    assert mid_workload >= ROUNDS // 2, f"only {mid_workload} of {ROUNDS} kills mid-workload"
