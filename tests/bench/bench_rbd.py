#!/usr/bin/env python3
"""Reads through LBD over an RBD snapshot, side by side with librbd itself, in one run.

Not a pytest test; run it directly (from the repository, with the venv's python,
which imports Debian's python3-rbd)::

    .venv/bin/python tests/bench/bench_rbd.py [--size 512M] [--runtime 8] [--json out.json]

It starts a private single-node Ceph cluster (tests/ceph_cluster.py: one mon,
one memstore OSD, loopback only), writes a random image of ``--size``,
snapshots it, and then runs each workload three ways against the same data:

- **LBD**: ``lbd serve -c rbd:IMAGE@golden -E change.lbd`` (the seed's use
  case: an empty change file on top of the golden snapshot) on a Unix
  socket, driven by fio's ``nbd`` engine;
- **librbd, Python**: this process reading the snapshot with the python3-rbd
  bindings: ``Image.read`` at queue depth 1, ``Image.aio_read`` with that many
  reads in flight otherwise;
- **fio rbd**: fio's own ``rbd`` engine (librbd from C) on the image, the
  ceiling for any client of this cluster.

Workloads: 1 MiB sequential reads at QD8 and QD1, 4 KiB random reads at QD32
and QD1.  Figures drift between runs and machines: compare the columns of one
run.  See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
os.environ["PATH"] = os.pathsep.join([str(REPO / ".venv" / "bin"), "/usr/bin", "/usr/sbin",
                                      os.environ.get("PATH", "")])


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str  # fio's --rw
    bs: int
    qd: int
    unit: str  # "MiB/s" or "IOPS"


WORKLOADS = (
    Workload("seq-1m-qd8", "1 MiB seq read, QD8", "read", MiB, 8, "MiB/s"),
    Workload("seq-1m-qd1", "1 MiB seq read, QD1", "read", MiB, 1, "MiB/s"),
    Workload("rand-4k-qd32", "4k random read, QD32", "randread", 4096, 32, "IOPS"),
    Workload("rand-4k-qd1", "4k random read, QD1", "randread", 4096, 1, "IOPS"),
)
COLUMNS = ("lbd", "librbd-python", "fio-rbd")
HEADERS = {"lbd": "LBD over RBD (fio nbd)", "librbd-python": "librbd from Python",
           "fio-rbd": "fio rbd engine (C)"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def value(wl: Workload, ios: int, seconds: float) -> float:
    return ios * wl.bs / MiB / seconds if wl.unit == "MiB/s" else ios / seconds


# -- the three clients --------------------------------------------------------------------


def fio(argv: list[str], wl: Workload, runtime: int, outdir: Path, tag: str,
        env: dict[str, str] | None = None) -> float:
    out = outdir / f"fio-{tag}-{wl.key}.json"
    cmd = ["fio", f"--name={wl.key}", *argv, f"--rw={wl.rw}", f"--bs={wl.bs}",
           f"--iodepth={wl.qd}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
           "--randrepeat=0", "--norandommap", "--output-format=json", f"--output={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(f"fio {tag} {wl.key} exited {p.returncode}: {p.stderr[-2000:]}")
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {tag} {wl.key}: error {job['error']}")
    r = job["read"]
    return r["bw_bytes"] / MiB if wl.unit == "MiB/s" else r["iops"]


def python_librbd(image: Any, size: int, wl: Workload, runtime: int) -> float:
    """The snapshot read from this process: read() at QD1, aio_read() with QD in flight."""
    rng = random.Random(7)
    blocks = size // wl.bs
    seq = [0]

    def next_offset() -> int:
        if wl.rw == "read":
            off = seq[0] * wl.bs
            seq[0] = (seq[0] + 1) % blocks
            return off
        return rng.randrange(blocks) * wl.bs

    # a second of warm-up, as fio's --ramp_time
    end = time.monotonic() + 1
    while time.monotonic() < end:
        image.read(next_offset(), wl.bs)
    if wl.qd == 1:
        n = 0
        t0 = time.monotonic()
        end = t0 + runtime
        while True:
            image.read(next_offset(), wl.bs)
            n += 1
            if n % 16 == 0 and time.monotonic() >= end:
                break
        return value(wl, n, time.monotonic() - t0)
    slots = threading.Semaphore(wl.qd)
    done = [0]
    failed: list[int] = []
    lock = threading.Lock()

    def cb(comp: Any, data: bytes | None) -> None:
        if comp.get_return_value() < 0:
            failed.append(comp.get_return_value())
        with lock:
            done[0] += 1
        slots.release()

    t0 = time.monotonic()
    end = t0 + runtime
    issued = 0
    while time.monotonic() < end:
        slots.acquire()
        image.aio_read(next_offset(), wl.bs, cb)
        issued += 1
    for _ in range(wl.qd):  # drain
        slots.acquire()
    seconds = time.monotonic() - t0
    if failed:
        raise RuntimeError(f"librbd aio_read failed: {failed[:3]}")
    return value(wl, done[0], seconds)


class LBDServer:
    def __init__(self, ceph: Any, image: str, size: int, workdir: Path) -> None:
        self.sockdir = Path(tempfile.mkdtemp(prefix="lbdb-"))
        self.sock = self.sockdir / "nbd.sock"
        self.change = workdir / "change.lbd"
        self.logf = open(workdir / "lbd.log", "wb")
        exe = shutil.which("lbd")
        if exe is None:
            raise RuntimeError("lbd is not installed (tools/setup.sh)")
        self.proc = subprocess.Popen(
            [exe, "serve", "-s", str(size), "-c", f"rbd:rbd/{image}@golden", "-E",
             str(self.change), "--ceph-conf", ceph.conf, "--unix", str(self.sock), "-a", "none"],
            stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lbd serve did not start: "
                                   + (workdir / "lbd.log").read_text()[-2000:])
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.change.unlink(missing_ok=True)


# -- the run ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M", help="image size (default 512M)")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per workload and client")
    ap.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    ap.add_argument("--json", help="write the figures here as JSON too")
    args = ap.parse_args()
    size = parse_size(args.size)
    wls = [w for w in WORKLOADS if w.key in args.workloads.split(",")]
    for tool in ("fio", "ceph-mon", "ceph-osd"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed: run tools/setup.sh")
            return 2
    try:
        import rbd
    except ImportError:
        log("python3-rbd does not import: run this with the venv's python (tools/setup.sh)")
        return 2
    from ceph_cluster import CephCluster

    workdir = Path(tempfile.mkdtemp(prefix="bench-rbd-"))
    results: dict[str, dict[str, float | str]] = {w.key: {} for w in wls}
    ceph = CephCluster(workdir, memstore_bytes=size * 2 + 512 * MiB)
    server: LBDServer | None = None
    try:
        t0 = time.monotonic()
        ceph.start()
        log(f"ceph cluster up in {time.monotonic() - t0:.1f} s ({ceph.dir})")
        name = "bench"
        with ceph.client() as (_, ioctx):
            rbd.RBD().create(ioctx, name, size)
            with rbd.Image(ioctx, name) as img:
                rng = random.Random(1)
                for off in range(0, size, 4 * MiB):
                    img.write(rng.randbytes(min(4 * MiB, size - off)), off)
                img.flush()
                img.create_snap("golden")
                img.protect_snap("golden")
        log(f"image rbd/{name}: {size >> 20} MiB of random data, snapshot golden")
        server = LBDServer(ceph, name, size, workdir)
        fio_rbd_env = {"CEPH_CONF": ceph.conf}
        with ceph.client() as (_, ioctx), \
                rbd.Image(ioctx, name, snapshot="golden", read_only=True) as snap:
            for wl in wls:
                runners: dict[str, Callable[[], float]] = {
                    "lbd": lambda wl=wl: fio(["--ioengine=nbd", f"--uri={server.uri}"], wl,
                                             args.runtime, workdir, "lbd"),
                    "librbd-python": lambda wl=wl: python_librbd(snap, size, wl,
                                                                 args.runtime),
                    "fio-rbd": lambda wl=wl: fio(["--ioengine=rbd", "--clientname=admin",
                                                  "--pool=rbd", f"--rbdname={name}",
                                                  f"--size={size}"], wl, args.runtime,
                                                 workdir, "rbd", fio_rbd_env),
                }
                for col in COLUMNS:
                    log(f"{wl.key}: {col}")
                    try:
                        results[wl.key][col] = runners[col]()
                    except Exception as exc:  # one failure does not end the run
                        log(f"{wl.key} {col} failed: {exc}")
                        results[wl.key][col] = "failed"
    finally:
        if server is not None:
            server.stop()
        ceph.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nReads of a {size >> 20} MiB RBD snapshot, {args.runtime} s per cell, "
          f"{os.cpu_count()} CPUs, Ceph memstore on loopback\n")
    width = 24
    print(f"{'workload':<24}" + "".join(f"{HEADERS[c]:>{width}}" for c in COLUMNS))
    for wl in wls:
        cells = []
        for c in COLUMNS:
            v = results[wl.key].get(c)
            cells.append(f"{v:>{width}}" if isinstance(v, str) else
                         f"{v:>{width - len(wl.unit) - 1},.0f} {wl.unit}")
        print(f"{wl.label:<24}" + "".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runtime": args.runtime,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
