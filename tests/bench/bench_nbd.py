#!/usr/bin/env python3
"""Side-by-side NBD benchmark: LBD against nbdkit and qemu-nbd on the same base.

Not a pytest test (pytest only collects ``test_*.py``); run it directly::

    python tests/bench/bench_nbd.py [--size 1G] [--runtime 8] \\
        [--only lbd,nbdkit-file,nbdkit-cow,qemu-nbd] [--json out.json]

One run creates a random base image in a temporary directory, reads it once so
it sits in the page cache, then for every selected server starts it on a Unix
socket, runs the workloads with nbdcopy and fio's ``nbd`` engine (libnbd) and
stops it.  Read workloads share one server start; every write workload gets a
freshly started server over fresh state (new change file / overlay / copy).
See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# nbdcopy of the whole device must reach at least this rate, else it counts as hung.
NBDCOPY_MIN_RATE = 8 * MiB


class BenchError(Exception):
    """A failure that ends the run with a clear one-line message."""


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str  # "MiB/s" or "IOPS"
    writes: bool
    fio: dict[str, str] | None = None  # None: nbdcopy of the whole device to null:


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-read", "seq read (nbdcopy to null:)", "MiB/s", False),
    Workload("randread-4k-qd32", "4k random read, QD32", "IOPS", False,
             {"rw": "randread", "bs": "4k", "iodepth": "32"}),
    Workload("randwrite-4k-qd32", "4k random write, QD32", "IOPS", True,
             {"rw": "randwrite", "bs": "4k", "iodepth": "32"}),
    Workload("randread-4k-qd1", "4k random read, QD1", "IOPS", False,
             {"rw": "randread", "bs": "4k", "iodepth": "1"}),
    Workload("seqwrite-256k-qd8", "256k seq write, QD8", "MiB/s", True,
             {"rw": "write", "bs": "256k", "iodepth": "8"}),
)


@dataclass
class Result:
    value: float  # in the workload's unit
    seconds: float  # measured wall time of the I/O phase
    server_cpu: float  # server CPU seconds (user+sys, all threads) during the workload
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.server_cpu / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", MiB), ("g", GiB), ("t", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 512M)") from None
    if n <= 0 or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 1 MiB")
    return n


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


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a live process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def find_lbd(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("lbd")
    if found:
        return found
    venv = REPO / ".venv" / "bin" / "lbd"
    return str(venv) if venv.exists() else None


def copy_file(src: Path, dst: Path) -> None:
    """Reflink when the filesystem can, else a full copy; then fsync so the copy's
    writeback does not run in the background during a measurement."""
    run(["cp", "--reflink=auto", "--sparse=never", str(src), str(dst)],
        timeout=600, what="copy base image")
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- servers


@dataclass
class Launch:
    argv: list[str]
    ready_text: str | None = None  # must appear in the server's output before it counts as up
    env: dict[str, str] | None = None
    scratch: list[Path] = field(default_factory=list)  # files to delete after the server stops


@dataclass
class Ctx:
    workdir: Path
    base: Path
    size: int
    lbd: str | None
    lbd_args: list[str]


class ServerKind:
    name: str = ""
    tools: tuple[str, ...] = ()

    def launch(self, ctx: Ctx, sock: Path, tag: str, writes: bool) -> Launch:
        raise NotImplementedError


class LBD(ServerKind):
    name = "lbd"

    def launch(self, ctx: Ctx, sock: Path, tag: str, writes: bool) -> Launch:
        assert ctx.lbd
        change = ctx.workdir / f"lbd-{tag}.lbd"
        remove(change)
        argv = [ctx.lbd, "serve", "-s", str(ctx.size), "-f", str(ctx.base), "-E", str(change),
                "--unix", str(sock),
                # No management daemon: its default 127.0.0.1:6666 may be taken by
                # another lbd on this machine.
                "-a", "none", *ctx.lbd_args]
        return Launch(argv, ready_text="listening on", scratch=[change])


class NbdkitFile(ServerKind):
    name = "nbdkit-file"
    tools = ("nbdkit",)

    def launch(self, ctx: Ctx, sock: Path, tag: str, writes: bool) -> Launch:
        argv = ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent"]
        if not writes:
            # Reads serve the base itself, read-only so it can never be modified.
            return Launch([*argv, "-r", "file", str(ctx.base)])
        copy = ctx.workdir / f"nbdkit-file-{tag}.img"
        log(f"  copying base for {self.name} writes")
        copy_file(ctx.base, copy)
        return Launch([*argv, "file", str(copy)], scratch=[copy])


class NbdkitCow(ServerKind):
    name = "nbdkit-cow"
    tools = ("nbdkit",)

    def launch(self, ctx: Ctx, sock: Path, tag: str, writes: bool) -> Launch:
        # The cow filter keeps its overlay in an unlinked temporary file in $TMPDIR.
        tmp = ctx.workdir / f"cow-tmp-{tag}"
        tmp.mkdir(exist_ok=True)
        argv = ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", "--filter=cow",
                "file", str(ctx.base)]
        return Launch(argv, env={**os.environ, "TMPDIR": str(tmp)}, scratch=[tmp])


class QemuNbd(ServerKind):
    name = "qemu-nbd"
    tools = ("qemu-nbd", "qemu-img")

    def launch(self, ctx: Ctx, sock: Path, tag: str, writes: bool) -> Launch:
        ovl = ctx.workdir / f"qemu-{tag}.qcow2"
        remove(ovl)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(ctx.base), "-F", "raw",
             str(ovl)], timeout=60, what="qemu-img create")
        # Writeback cache (qemu-nbd's default, spelled out), the default thread-pool
        # aio, several clients at once for multi-connection nbdcopy, and --persistent
        # so it survives from one client to the next.
        argv = ["qemu-nbd", "-k", str(sock), "-f", "qcow2", "--cache=writeback",
                "--aio=threads", "--shared=8", "--persistent", str(ovl)]
        return Launch(argv, scratch=[ovl])


SERVERS: dict[str, ServerKind] = {s.name: s for s in (LBD(), NbdkitFile(), NbdkitCow(),
                                                      QemuNbd())}


class Server:
    """One started server process, stopped (by PID) in stop()."""

    def __init__(self, kind: ServerKind, ctx: Ctx, tag: str, writes: bool) -> None:
        self.kind = kind
        self.ctx = ctx
        self.sock = ctx.workdir / f"{kind.name}-{tag}.sock"
        self.logpath = ctx.workdir / f"{kind.name}-{tag}.log"
        remove(self.sock)
        self.launch = kind.launch(ctx, self.sock, tag, writes)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self) -> None:
        with open(self.logpath, "wb") as logf:
            self.proc = subprocess.Popen(self.launch.argv, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.launch.env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind.name} exited with {self.proc.returncode} while "
                                 f"starting: {' '.join(self.launch.argv)}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind.name} not ready after {START_TIMEOUT:.0f}s: "
                                 f"{' '.join(self.launch.argv)}\n{self.log_tail()}")
            text_ok = (self.launch.ready_text is None
                       or self.launch.ready_text in self.log_tail(1 << 20))
            if text_ok and self.sock.exists() and self._probe():
                return
            time.sleep(0.05)

    def _probe(self) -> bool:
        """Full NBD handshake with nbdinfo; also checks the advertised size."""
        try:
            p = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True, text=True,
                               timeout=10, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return False
        if p.returncode != 0:
            return False
        size = int(p.stdout.strip())
        if size != self.ctx.size:
            raise BenchError(f"{self.kind.name} advertises {size} bytes, expected "
                             f"{self.ctx.size}")
        return True

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log(f"{self.kind.name} (pid {proc.pid}) ignored SIGTERM for "
                        f"{STOP_TIMEOUT:.0f}s; killing it")
                    proc.kill()
                    proc.wait()
            if proc is not None and proc.returncode not in (0, -signal.SIGTERM):
                log(f"warning: {self.kind.name} exited with {proc.returncode}:\n"
                    f"{self.log_tail(800)}")
        finally:
            for path in (*self.launch.scratch, self.sock):
                remove(path)


@contextmanager
def serving(kind: ServerKind, ctx: Ctx, tag: str, writes: bool) -> Iterator[Server]:
    server = Server(kind, ctx, tag, writes)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        # Push any dirty data (change files, overlays) out now rather than during
        # the next measurement; the files are deleted already, so this is cheap.
        os.sync()


# --------------------------------------------------------------------------- clients


def measure(server: Server, body: Callable[[], tuple[float, dict[str, Any]]]) -> Result:
    cpu0, t0 = server.cpu(), time.monotonic()
    value, extra = body()
    seconds = time.monotonic() - t0
    cpu = server.cpu() - cpu0
    if server.proc is not None and server.proc.poll() is not None:
        raise BenchError(f"{server.kind.name} died during the workload "
                         f"(exit {server.proc.returncode}):\n{server.log_tail()}")
    if "seconds" in extra:  # fio: its own runtime, excluding connect and ramp time
        seconds = extra["seconds"]
    return Result(value, seconds, cpu, extra)


def run_nbdcopy(server: Server, size: int, runtime: int) -> Result:
    """Copy the whole device to null: (nbdcopy defaults: up to 4 connections if the
    server allows multi-conn, 64 requests in flight each).  Repeated while the runs
    so far took less than the fio runtime (at most 5 runs); reports the median."""

    def body() -> tuple[float, dict[str, Any]]:
        rates: list[float] = []
        t_all = time.monotonic()
        while not rates or (time.monotonic() - t_all < runtime and len(rates) < 5):
            t0 = time.monotonic()
            run(["nbdcopy", server.uri, "null:"], timeout=30 + size / NBDCOPY_MIN_RATE,
                what=f"nbdcopy from {server.kind.name}")
            rates.append(size / MiB / (time.monotonic() - t0))
        return statistics.median(rates), {"seconds": time.monotonic() - t_all,
                                          "runs_mib_s": rates}

    return measure(server, body)


def run_fio(server: Server, wl: Workload, runtime: int, ramp: int, outdir: Path) -> Result:
    assert wl.fio is not None
    out = outdir / f"fio-{server.kind.name}-{wl.key}.json"
    argv = ["fio", f"--name={wl.key}", "--ioengine=nbd", f"--uri={server.uri}",
            *(f"--{k}={v}" for k, v in wl.fio.items()),
            "--numjobs=1", "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}",
            "--norandommap", "--randrepeat=0", "--group_reporting",
            "--output-format=json", f"--output={out}"]

    def body() -> tuple[float, dict[str, Any]]:
        run(argv, timeout=runtime + ramp + 120, what=f"fio {wl.key} on {server.kind.name}")
        data = json.loads(out.read_text())
        job = data["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio {wl.key} on {server.kind.name}: error {job['error']}")
        side = job["write" if wl.writes else "read"]
        seconds = job["job_runtime"] / 1000.0
        pct = side.get("clat_ns", {}).get("percentile", {})
        extra: dict[str, Any] = {
            "seconds": seconds,
            "iops": side["iops"],
            "mib_s": side["bw_bytes"] / MiB,
            "clat_mean_us": side.get("clat_ns", {}).get("mean", 0.0) / 1000.0,
            "clat_p99_us": pct.get("99.000000", 0) / 1000.0,
            "fio_usr_cpu_pct": job.get("usr_cpu"),
            "fio_sys_cpu_pct": job.get("sys_cpu"),
        }
        value = extra["iops"] if wl.unit == "IOPS" else extra["mib_s"]
        return value, extra

    return measure(server, body)


# --------------------------------------------------------------------------- driver


def check_tools(names: Sequence[str], ctx: Ctx) -> None:
    needed = {"fio", "nbdcopy", "nbdinfo", "cp"}
    for name in names:
        needed.update(SERVERS[name].tools)
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if "lbd" in names and not (ctx.lbd and os.access(ctx.lbd, os.X_OK)):
        missing.append(f"lbd (not on PATH nor at {REPO / '.venv/bin/lbd'}; run tools/setup.sh)")
    if missing:
        raise BenchError("missing tools: " + ", ".join(missing)
                         + "\n  Debian: apt-get install -y fio libnbd-bin nbdkit qemu-utils")
    engines = run(["fio", "--enghelp"], timeout=30, what="fio --enghelp").stdout.split()
    if "nbd" not in engines:
        raise BenchError("this fio has no 'nbd' ioengine (needs fio >= 3.19 built with libnbd)")
    if any(n.startswith("nbdkit") for n in names):
        run(["nbdkit", "file", "--dump-plugin"], timeout=30, what="nbdkit file plugin check")
    if "nbdkit-cow" in names:
        run(["nbdkit", "--filter=cow", "null", "--dump-plugin"], timeout=30,
            what="nbdkit cow filter check")


def make_base(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        log(f"reusing base image {path}")
    else:
        log(f"writing {size / MiB:.0f} MiB random base image {path}")
        chunk = 16 * MiB
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
    log("reading the base image once to have it in the page cache")
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def bench_server(kind: ServerKind, ctx: Ctx, workloads: Sequence[Workload], runtime: int,
                 ramp: int) -> dict[str, Result | str]:
    results: dict[str, Result | str] = {}
    readers = [w for w in workloads if not w.writes]
    writers = [w for w in workloads if w.writes]

    def one(server: Server, wl: Workload) -> None:
        log(f"  {kind.name}: {wl.label}")
        if wl.fio is None:
            results[wl.key] = run_nbdcopy(server, ctx.size, runtime)
        else:
            results[wl.key] = run_fio(server, wl, runtime, ramp, ctx.workdir)
        r = results[wl.key]
        assert isinstance(r, Result)
        log(f"  {kind.name}: {wl.label}: {r.value:,.0f} {wl.unit}, server CPU {r.cpu_pct:.0f}%")

    def guarded(wls: Sequence[Workload], fn: Callable[[], None]) -> None:
        try:
            fn()
        except BenchError as exc:
            log(f"  {kind.name}: FAILED: {exc}")
            for w in wls:
                results.setdefault(w.key, f"FAILED: {str(exc).splitlines()[0]}")

    pending = list(readers)
    while pending:
        # Reads share one server start; after a failure the rest get a fresh one.
        def reads() -> None:
            with serving(kind, ctx, "read", writes=False) as server:
                while pending:
                    one(server, pending[0])
                    pending.pop(0)

        failed = pending[0]
        guarded([failed], reads)
        if pending and pending[0] is failed:
            pending.pop(0)
    for wl in writers:
        def write(wl: Workload = wl) -> None:
            with serving(kind, ctx, wl.key, writes=True) as server:
                one(server, wl)
        guarded([wl], write)
    return results


def fmt(r: Result | str | None, cpu: bool) -> str:
    if r is None:
        return "-"
    if isinstance(r, str):
        return "FAILED"
    if cpu:
        return f"{r.cpu_pct:.0f}%"
    return f"{r.value:,.0f}"


def print_table(title: str, names: Sequence[str], workloads: Sequence[Workload],
                results: dict[str, dict[str, Result | str]], cpu: bool) -> None:
    head = ["workload", "unit", *names]
    rows = [[w.label, "CPU" if cpu else w.unit,
             *(fmt(results[n].get(w.key), cpu) for n in names)] for w in workloads]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                         for i, c in enumerate(cells))

    print(title)
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=GiB, help="device size (default 1G)")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio job (default 8)")
    ap.add_argument("--ramp", type=int, default=1,
                    help="fio ramp time in seconds, not measured (default 1)")
    ap.add_argument("--only", default=",".join(SERVERS),
                    help=f"comma-separated servers (default all: {','.join(SERVERS)})")
    ap.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS),
                    help="comma-separated workloads (default all: "
                         f"{','.join(w.key for w in WORKLOADS)})")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--workdir", type=Path,
                    help="use (and keep) this directory instead of a fresh temporary one; "
                         "a base image of the right size there is reused")
    ap.add_argument("--lbd", help="lbd executable (default: PATH, then .venv/bin/lbd)")
    ap.add_argument("--lbd-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for 'lbd serve' (repeatable), e.g. --lbd-arg=-q")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names:
        ap.error(f"unknown server(s) {unknown}; choose from {','.join(SERVERS)}")
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in wanted if w not in {x.key for x in WORKLOADS}]
    if bad or not wanted:
        ap.error(f"unknown workload(s) {bad}")
    workloads = [w for w in WORKLOADS if w.key in wanted]

    # SIGTERM/SIGHUP to the benchmark still runs every finally: (servers stopped).
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lbd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(workdir=workdir.resolve(), base=workdir.resolve() / "base.img", size=args.size,
              lbd=find_lbd(args.lbd), lbd_args=args.lbd_arg)
    results: dict[str, dict[str, Result | str]] = {}
    t_start = time.monotonic()
    try:
        check_tools(names, ctx)
        free = shutil.disk_usage(workdir).free
        if free < 3 * args.size:
            raise BenchError(f"{workdir}: {free / GiB:.1f} GiB free, "
                             f"need ~{3 * args.size / GiB:.1f} GiB")
        make_base(ctx.base, args.size)
        for name in names:
            log(f"== {name}")
            results[name] = bench_server(SERVERS[name], ctx, workloads, args.runtime, args.ramp)
    except BenchError as exc:
        print(f"bench_nbd: {exc}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    print()
    print(f"LBD NBD benchmark: {args.size / MiB:.0f} MiB random base in page cache, Unix "
          f"socket, fio runtime {args.runtime}s (+{args.ramp}s ramp), {os.cpu_count()} CPUs, "
          f"total {elapsed:.0f}s")
    print()
    print_table("Throughput (higher is better)", names, workloads, results, cpu=False)
    print()
    print_table("Server CPU during the workload (100% = one core busy)", names, workloads,
                results, cpu=True)
    failures = {f"{n}/{k}": r for n, rs in results.items() for k, r in rs.items()
                if isinstance(r, str)}
    for where, msg in failures.items():
        print(f"{where}: {msg}")

    if args.json:
        doc = {
            "size": args.size, "runtime": args.runtime, "ramp": args.ramp,
            "cpus": os.cpu_count(), "host": platform.node(), "elapsed_s": elapsed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workloads": {w.key: {"label": w.label, "unit": w.unit} for w in workloads},
            "results": {
                n: {k: ({"error": r} if isinstance(r, str) else
                        {"value": r.value, "unit": next(w.unit for w in workloads if w.key == k),
                         "seconds": r.seconds, "server_cpu_s": r.server_cpu,
                         "server_cpu_pct": r.cpu_pct, **r.extra})
                    for k, r in rs.items()}
                for n, rs in results.items()
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
