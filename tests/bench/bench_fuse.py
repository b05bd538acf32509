#!/usr/bin/env python3
"""Side-by-side FUSE benchmark: LBD's FUSE file against qemu-storage-daemon's.

Not a pytest test; run it directly (as root, with /dev/fuse)::

    python tests/bench/bench_fuse.py [--size 1G] [--runtime 8] [--only lbd,qsd] [--json F]

One run writes a random raw base image, reads it once so it sits in the page
cache, then for each exporter mounts the device as a file and runs fio with
direct I/O (libaio) on it:

- ``lbd``: ``lbd mount -s SIZE -f BASE -E CHANGE MNTDIR -a none -q``
  (a new change file per start);
- ``qsd``: ``qemu-img create -f qcow2 -b BASE -F raw OVL`` (a new overlay per
  start), then ``qemu-storage-daemon --blockdev file(OVL) --blockdev qcow2
  --export type=fuse,mountpoint=FILE,writable=on``.

Read workloads share one start; every write workload gets a fresh start over
fresh state.  Each result also shows the exporter's CPU use (user+system,
all threads, over wall time; 100% is one core).  See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class BenchError(Exception):
    """A failure that ends the run with a clear one-line message."""


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str  # "MiB/s" or "IOPS"
    writes: bool
    fio: dict[str, str]


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread-1m-qd32", "1 MiB seq read, QD32", "MiB/s", False,
             {"rw": "read", "bs": "1M", "iodepth": "32"}),
    Workload("randread-4k-qd32", "4k random read, QD32", "IOPS", False,
             {"rw": "randread", "bs": "4k", "iodepth": "32"}),
    Workload("randwrite-4k-qd32", "4k random write, QD32", "IOPS", True,
             {"rw": "randwrite", "bs": "4k", "iodepth": "32"}),
    Workload("randread-4k-qd1", "4k random read, QD1", "IOPS", False,
             {"rw": "randread", "bs": "4k", "iodepth": "1"}),
)


@dataclass
class Result:
    value: float
    cpu: float  # exporter CPU seconds per wall second


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f}s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise BenchError(f"{what}: exit {proc.returncode}: {' '.join(argv)}\n{tail}")
    return proc


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def is_mounted(path: Path) -> bool:
    p = os.path.abspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(line.split()[4] == p for line in f)


def make_base(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        log(f"reusing base image {path}")
    else:
        log(f"writing {size / MiB:.0f} MiB random base image {path}")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(16 * MiB, left)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:  # into the page cache
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


# --------------------------------------------------------------------------- exporters


@dataclass
class Mount:
    proc: subprocess.Popen[bytes]
    file: Path  # the device file fio uses
    point: Path  # what to check and unmount
    log: Path
    cleanup: list[Path]


class Exporter:
    name = ""
    tools: tuple[str, ...] = ()

    def start(self, base: Path, size: int, work: Path, tag: str) -> Mount:
        raise NotImplementedError


class LBDMount(Exporter):
    name = "lbd"

    def __init__(self, exe: str) -> None:
        self.exe = exe

    def start(self, base: Path, size: int, work: Path, tag: str) -> Mount:
        point = work / f"lbd-mnt-{tag}"
        point.mkdir()
        change = work / f"lbd-{tag}.lbd"
        logf = work / f"lbd-{tag}.log"
        with open(logf, "wb") as out:
            proc = subprocess.Popen([self.exe, "mount", "-s", str(size), "-f", str(base),
                                     "-E", str(change), "-a", "none", str(point)],
                                    stdout=out, stderr=subprocess.STDOUT)
        return Mount(proc, point / "device", point, logf, [change, point])


class QSD(Exporter):
    name = "qsd"
    tools = ("qemu-storage-daemon", "qemu-img")

    def start(self, base: Path, size: int, work: Path, tag: str) -> Mount:
        ovl = work / f"qsd-{tag}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
             str(ovl)], timeout=60, what="qemu-img create")
        point = work / f"qsd-{tag}.img"
        point.touch()
        logf = work / f"qsd-{tag}.log"
        with open(logf, "wb") as out:
            proc = subprocess.Popen(
                ["qemu-storage-daemon",
                 "--blockdev", f"driver=file,node-name=file0,filename={ovl}",
                 "--blockdev", "driver=qcow2,node-name=ovl0,file=file0",
                 "--export", f"type=fuse,id=exp0,node-name=ovl0,mountpoint={point},"
                             "writable=on"],
                stdout=out, stderr=subprocess.STDOUT)
        return Mount(proc, point, point, logf, [ovl, point])


@contextmanager
def mounted(exp: Exporter, base: Path, size: int, work: Path, tag: str) -> Iterator[Mount]:
    m = exp.start(base, size, work, tag)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (is_mounted(m.point) and m.file.exists() and m.file.stat().st_size == size):
            if m.proc.poll() is not None:
                raise BenchError(f"{exp.name} exited {m.proc.returncode}:\n"
                                 f"{m.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"{exp.name} did not mount within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)
        yield m
    finally:
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{exp.name} ignored SIGTERM for {STOP_TIMEOUT:.0f}s; killing it")
                m.proc.kill()
                m.proc.wait()
        if is_mounted(m.point):
            log(f"{m.point} still mounted after {exp.name} stopped; unmounting it")
            subprocess.run(["fusermount3", "-u", str(m.point)], check=False)
        for p in m.cleanup:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        m.log.unlink(missing_ok=True)


def run_fio(m: Mount, wl: Workload, runtime: int, size: int) -> Result:
    argv = ["fio", "--name=bench", f"--filename={m.file}", "--ioengine=libaio", "--direct=1",
            f"--size={size}", "--numjobs=1", "--time_based", f"--runtime={runtime}",
            "--ramp_time=1", "--norandommap", "--randrepeat=0", "--output-format=json"]
    argv += [f"--{k}={v}" for k, v in wl.fio.items()]
    cpu0 = cpu_seconds(m.proc.pid)
    t0 = time.monotonic()
    out = run(argv, timeout=runtime * 4 + 120, what=f"fio {wl.key}").stdout
    wall = time.monotonic() - t0
    cpu = (cpu_seconds(m.proc.pid) - cpu0) / wall
    job = json.loads(out[out.find("{"):])["jobs"][0]
    if job["error"]:
        raise BenchError(f"fio {wl.key}: error {job['error']}")
    side = job["write" if wl.writes else "read"]
    value = side["bw_bytes"] / MiB if wl.unit == "MiB/s" else side["iops"]
    return Result(value, cpu)


def bench(exp: Exporter, base: Path, size: int, work: Path, workloads: Sequence[Workload],
          runtime: int) -> dict[str, Result | str]:
    results: dict[str, Result | str] = {}

    def one(m: Mount, wl: Workload) -> None:
        log(f"  {exp.name}: {wl.label}")
        try:
            results[wl.key] = run_fio(m, wl, runtime, size)
        except BenchError as exc:
            log(f"  {exp.name}: {wl.key} failed: {exc}")
            results[wl.key] = "failed"

    readers = [w for w in workloads if not w.writes]
    if readers:
        with mounted(exp, base, size, work, "read") as m:
            for wl in readers:
                one(m, wl)
    for i, wl in enumerate(w for w in workloads if w.writes):
        with mounted(exp, base, size, work, f"write{i}") as m:
            one(m, wl)
    return results


def fmt(r: Result | str | None, unit: str) -> str:
    if r is None:
        return "-"
    if isinstance(r, str):
        return r
    return f"{r.value:,.0f} ({r.cpu * 100:.0f}% cpu)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="device size (default 1G)")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job (default 8)")
    ap.add_argument("--only", default="lbd,qsd", help="exporters: lbd,qsd")
    ap.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    ap.add_argument("--workdir", help="use (and keep the base image in) this directory")
    ap.add_argument("--lbd", help="the lbd executable (default: PATH, then .venv/bin/lbd)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    text = args.size.strip().lower()
    size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    workloads = [w for w in WORKLOADS if w.key in keys]
    lbd = args.lbd or shutil.which("lbd") or str(REPO / ".venv" / "bin" / "lbd")
    exporters: dict[str, Exporter] = {"lbd": LBDMount(lbd), "qsd": QSD()}
    try:
        unknown = [n for n in names if n not in exporters]
        if unknown:
            raise BenchError(f"unknown exporter(s): {', '.join(unknown)} (lbd, qsd)")
        missing = [t for n in names for t in exporters[n].tools if shutil.which(t) is None]
        missing += [t for t in ("fio", "fusermount3") if shutil.which(t) is None]
        if "lbd" in names and not os.access(lbd, os.X_OK):
            missing.append(f"lbd ({lbd})")
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)} (run tools/setup.sh)")
        if not os.path.exists("/dev/fuse"):
            raise BenchError("/dev/fuse is missing")
        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lbdfb-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            base = work / "base.img"
            make_base(base, size)
            table: dict[str, dict[str, Result | str]] = {}
            for n in names:
                log(f"{n}:")
                table[n] = bench(exporters[n], base, size, work, workloads, args.runtime)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    except BenchError as exc:
        print(f"bench_fuse: {exc}", file=sys.stderr)
        return 1
    width = max(len(w.label) + len(w.unit) + 3 for w in workloads)
    cols = [max(24, len(n)) for n in names]
    print(f"\nFUSE file, fio libaio direct=1, {size // MiB} MiB device, {args.runtime} s per "
          f"job, {os.cpu_count()} CPUs")
    print(f"{'workload':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols)))
    for w in workloads:
        cells = [fmt(table[n].get(w.key), w.unit) for n in names]
        print(f"{w.label + ' (' + w.unit + ')':<{width}}  "
              + "  ".join(f"{c:>{cw}}" for c, cw in zip(cells, cols)))
    if args.json:
        data: dict[str, Any] = {n: {k: (r if isinstance(r, str) else vars(r))
                                    for k, r in table[n].items()} for n in names}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
