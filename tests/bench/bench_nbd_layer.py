#!/usr/bin/env python3
"""The NBD layer's cost: reads through LBD (-n REMOTE -E change file) against
reads straight from the same remote, in one run.

Not a pytest test; run it directly::

    python tests/bench/bench_nbd_layer.py [--size 1G] [--runs 3] [--runtime 5] \\
        [--remotes nbdkit-file,qemu-nbd] [--json out.json]

One random base image (fsynced and read once, so it is in the page cache) is
served read-only by each remote on a Unix socket.  For each remote:

- ``nbdcopy REMOTE null:`` against ``nbdcopy LBD null:`` (nbdcopy's defaults:
  4 connections, 256 KiB requests), the median of ``--runs``, in MiB/s;
- fio's nbd engine, 4k random reads at QD32 for ``--runtime`` seconds, in IOPS.

Then writes (skip with ``--no-writes``): fio 4k random writes at QD32 to
nbdkit's ``memory`` plugin directly, and through ``lbd serve -N`` (write
through) and ``-X`` (write-back cache, ``--nbd-cache`` default 64 MiB), each on
a fresh remote; and 4k random reads through ``-n --nbd-cache 256m`` (the read
cache) beside the plain ``-n`` row above.

LBD is ``lbd serve -s SIZE -n REMOTE -E NEW.lbd --unix SOCK -a none -q`` (an
empty change file: every read goes to the remote).  The LBD column also shows
the LBD process's CPU use (user+system over wall time; 100% = one core).  On a
2-core machine the remote, LBD and the client share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def find_lbd() -> str:
    exe = shutil.which("lbd") or str(REPO / ".venv" / "bin" / "lbd")
    if not os.path.exists(exe):
        raise SystemExit("bench: lbd is not installed (tools/setup.sh)")
    return exe


def wait_ready(uri: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited {proc.returncode}")
        if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_remote(kind: str, base: Path, sock: str) -> subprocess.Popen[bytes]:
    if kind == "nbdkit-file":
        cmd = ["nbdkit", "-U", sock, "-f", "--exit-with-parent", "-r", "file", str(base)]
    elif kind == "qemu-nbd":
        cmd = ["qemu-nbd", "-k", sock, "-f", "raw", "-r", "--persistent", "--shared=16",
               "--cache=writeback", "--aio=threads", str(base)]
    else:
        raise SystemExit(f"bench: unknown remote {kind}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"nbd+unix:///?socket={sock}", proc, kind)
    return proc


def nbdcopy(uri: str, size: int, runs: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, text=True,
                           timeout=max(120, size // (8 * MiB)))
        dt = time.monotonic() - t0
        if p.returncode:
            raise RuntimeError(f"nbdcopy failed: {p.stderr.strip()}")
        rates.append(size / MiB / dt)
    return statistics.median(rates), rates


def fio_rand(uri: str, runtime: int, rw: str = "randread") -> float:
    """IOPS of fio's nbd engine: 4k ``rw`` (randread or randwrite) at QD32."""
    p = subprocess.run(["fio", "--ioengine=nbd", f"--uri={uri}", "--name=r", f"--rw={rw}",
                        "--bs=4k", "--iodepth=32", "--numjobs=1", "--time_based",
                        f"--runtime={runtime}", "--ramp_time=1", "--norandommap",
                        "--randrepeat=0", "--output-format=json"],
                       capture_output=True, text=True, timeout=runtime + 120)
    if p.returncode:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    out = p.stdout
    job = json.loads(out[out.find("{"):])["jobs"][0]
    return float(job["write" if rw == "randwrite" else "read"]["iops"])


def write_rows(lbds: list[tuple[str, str]], base: Path, work: Path, size: int,
               runtime: int) -> list[tuple[str, float, float | None]]:
    """(label, IOPS, LBD CPU) rows: writes direct, through -N and -X; cached reads."""
    rows: list[tuple[str, float, float | None]] = []
    msock, fsock, lsock = (str(work / n) for n in ("mem.sock", "file.sock", "lbdw.sock"))
    muri, furi, luri = (f"nbd+unix:///?socket={p}" for p in (msock, fsock, lsock))

    def memory() -> subprocess.Popen[bytes]:
        unlink_stale(msock)
        proc = subprocess.Popen(["nbdkit", "-U", msock, "-f", "--exit-with-parent", "memory",
                                 str(size)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(muri, proc, "nbdkit memory")
        return proc

    def through(lbd: str, layer: list[str], remote: subprocess.Popen[bytes], label: str,
                rw: str) -> None:
        """A fresh ``lbd serve`` with ``layer`` over ``remote``: one fio row; both stop."""
        unlink_stale(lsock)
        proc = subprocess.Popen([lbd, "serve", "-s", str(size), *layer, "--unix", lsock,
                                 "-a", "none", "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_ready(luri, proc, "lbd")
            log(label)
            value, cpu = measure(luri, proc.pid, fio_rand, runtime, rw)
            rows.append((label, value, cpu))
        finally:
            stop(proc)
            stop(remote)

    remote = memory()
    try:
        log("writes: direct")
        rows.append(("4k random write, nbdkit memory direct",
                     fio_rand(muri, runtime, "randwrite"), None))
    finally:
        stop(remote)
    for name, lbd in lbds:
        through(lbd, ["-N", muri], memory(), f"4k random write, -N (write-through) [{name}]",
                "randwrite")
        through(lbd, ["-X", muri], memory(),
                f"4k random write, -X (write-back cache) [{name}]", "randwrite")
        unlink_stale(fsock)
        through(lbd, ["-n", furi, "--nbd-cache", "256m"],
                start_remote("nbdkit-file", base, fsock),
                f"4k random read, -n --nbd-cache 256m [{name}]", "randread")
    return rows


def unlink_stale(path: str) -> None:
    """Remove a socket a stopped server left behind (it cannot listen there again)."""
    if os.path.exists(path):
        os.unlink(path)


def measure(uri: str, pid: int | None, fn: Any, *args: Any) -> tuple[Any, float | None]:
    c0, t0 = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
    value = fn(uri, *args)
    cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) if pid else None
    return value, cpu


def measure_lbd(lbd: str, name: str, kind: str, ruri: str, work: Path, size: int,
                args: argparse.Namespace) -> dict[str, Any]:
    lsock = str(work / "lbd.sock")
    change = work / "c.lbd"
    if change.exists():
        change.unlink()
    cell: dict[str, Any] = {}
    proc = subprocess.Popen([lbd, "serve", "-s", str(size), "-n", ruri, "-E",
                             str(change), "--unix", lsock, "-a", "none", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        luri = f"nbd+unix:///?socket={lsock}"
        wait_ready(luri, proc, "lbd")
        log(f"{kind}: {name}")
        (cell["seq"], cell["seq_runs"]), cell["seq_cpu"] = measure(
            luri, proc.pid, nbdcopy, size, args.runs)
        cell["rand"], cell["rand_cpu"] = measure(luri, proc.pid, fio_rand, args.runtime)
    finally:
        stop(proc)
    return cell


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3, help="nbdcopy runs per cell (median)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--remotes", default="nbdkit-file,qemu-nbd")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=LBD",
                    help="measure another lbd executable too (e.g. an older build), "
                    "in the same run; its rows are labelled NAME")
    ap.add_argument("--no-writes", action="store_true",
                    help="skip the write (-N, -X) and read-cache rows")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    for tool in ("nbdcopy", "nbdinfo", "fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is missing (tools/setup.sh installs it)")
    lbds = [("through LBD", find_lbd())]
    for spec in args.also:
        name, _, exe = spec.partition("=")
        if not exe or not os.path.exists(exe):
            raise SystemExit(f"bench: --also {spec}: not NAME=EXISTING_EXECUTABLE")
        lbds.append((name, exe))
    work = Path(tempfile.mkdtemp(prefix="lbdb-"))
    results: dict[str, Any] = {"size": size, "remotes": {}}
    try:
        base = work / "base.img"
        log(f"writing a random {size >> 20} MiB base image")
        with open(base, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        with open(base, "rb") as f:
            while f.read(16 * MiB):
                pass
        for kind in args.remotes.split(","):
            rsock = str(work / f"{kind}.sock")
            remote = start_remote(kind, base, rsock)
            ruri = f"nbd+unix:///?socket={rsock}"
            row: dict[str, Any] = {}
            try:
                log(f"{kind}: direct")
                (row["seq_direct"], row["seq_direct_runs"]), _ = measure(
                    ruri, None, nbdcopy, size, args.runs)
                row["rand_direct"], _ = measure(ruri, None, fio_rand, args.runtime)
                for name, lbd in lbds:
                    row[name] = measure_lbd(lbd, name, kind, ruri, work, size, args)
            finally:
                stop(remote)
            results["remotes"][kind] = row
        if not args.no_writes:
            results["writes"] = write_rows(lbds, base, work, size, args.runtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"NBD layer: reads of a {size >> 20} MiB image, directly from the remote vs "
          "through LBD (-n REMOTE -E change file)")
    print()
    hdr = f"{'workload':<34} {'remote':<12} {'direct':>10} {'LBD':>20} " \
          f"{'value':>10} {'ratio':>6} {'LBD CPU':>8}"
    print(hdr)
    print("-" * len(hdr))
    for kind, row in results["remotes"].items():
        for key, label, unit in (("seq", "seq read, nbdcopy to null:", "MiB/s"),
                                 ("rand", "4k random read, fio QD32", "IOPS")):
            d = row[f"{key}_direct"]
            for name, _ in lbds:
                t, cpu = row[name][key], row[name][f"{key}_cpu"]
                print(f"{label + ' (' + unit + ')':<34} {kind:<12} {d:>10,.0f} {name:>20} "
                      f"{t:>10,.0f} {t / d:>6.2f} {cpu * 100:>7.0f}%")
    if results.get("writes"):
        print()
        print("4k at QD32, fio: writes to nbdkit memory directly and through LBD; "
              "reads through the read cache")
        print()
        hdr = f"{'workload':<58} {'IOPS':>10} {'LBD CPU':>8}"
        print(hdr)
        print("-" * len(hdr))
        for label, value, cpu in results["writes"]:
            c = "" if cpu is None else f"{cpu * 100:.0f}%"
            print(f"{label:<58} {value:>10,.0f} {c:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
