#!/usr/bin/env python3
"""Instructions per request of ``lbd serve``, counted by callgrind (repeatable).

Wall-clock figures on this shared 2-core machine swing by 20 % or more from
run to run; an instruction count does not.  This runs ``lbd serve`` (flat
base + new change file) under ``valgrind --tool=callgrind`` with
instrumentation off, warms it with fio (random 4k writes over the first
64 MiB, so later writes are a mix of appends and in-place rewrites and later
reads a mix of change file and base), then counts only a measured fio run of
``--ios`` requests at QD32 for each workload.  It counts user-space
instructions of the server process only: system calls and the kernel's
copies are not in it, so use it for the Python side of the data path and
``bench_nbd.py`` for throughput.  ``remote-randread`` serves a stack of
``-n`` (nbdkit's ``file`` plugin on the base, read-only) under a new change
file: every read goes to the remote, the NBD layer's hot path.  (valgrind
counts each step of a ``rep stosb`` as an instruction: zeroing a new 4 KiB
buffer shows as ~4,500.)  With ``LBD_CG_KEEP=DIR`` the callgrind files stay in
DIR for ``callgrind_annotate``.

    python tests/bench/bench_instructions.py [--ios 20000] \
        [--workloads randwrite,randread,remote-randread]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lbd_exe() -> str:
    venv = ROOT / ".venv" / "bin" / "lbd"
    return str(venv) if venv.exists() else shutil.which("lbd") or "lbd"


def fio(sock: str, rw: str, ios: int, seed: int) -> None:
    subprocess.run(["fio", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", f"--rw={rw}",
                    "--bs=4k", "--iodepth=32", "--size=64M", f"--io_size={ios * 4096}",
                    "--norandommap", "--randrepeat=0", f"--randseed={seed}", "--name=w"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def count(workload: str, ios: int, work: Path, exe: str) -> int:
    base = work / "base.img"
    with open(base, "wb") as f:
        f.truncate(256 << 20)
    change = work / f"{workload}.lbd"
    sock = str(work / f"{workload}.sock")
    log = work / f"{workload}.log"
    python = Path(exe).resolve().parent / "python"
    remote = None
    below = ["-f", str(base)]
    rw = workload
    if workload.startswith("remote-"):
        rw = workload.removeprefix("remote-")
        rsock = str(work / f"{workload}.remote.sock")
        remote = subprocess.Popen(["nbdkit", "-U", rsock, "-f", "--exit-with-parent", "-r",
                                   "file", str(base)])
        deadline = time.monotonic() + 30
        while not os.path.exists(rsock):
            if remote.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nbdkit did not start")
            time.sleep(0.1)
        below = ["-n", f"nbd+unix:///?socket={rsock}"]
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.{workload}",
           "--instr-atstart=no", str(python) if python.exists() else sys.executable, exe,
           "serve", "-s", "256M", *below, "-E", str(change), "--unix", sock,
           "-a", "none", "-q"]
    with open(log, "wb") as out:
        srv = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock):
            if srv.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lbd serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        # warm: the blocks exist, the code paths are hot (a remote stack stays
        # empty: its reads all go to the remote)
        fio(sock, "randread" if remote else "randwrite", ios, 1)
        subprocess.run(["callgrind_control", "-i", "on", str(srv.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fio(sock, rw, ios, 2)
        subprocess.run(["callgrind_control", "-i", "off", str(srv.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(300)
        if remote is not None:
            remote.terminate()
            remote.wait(30)
    m = re.search(r"Collected : (\d+)", log.read_text())
    if not m:
        raise SystemExit(f"no callgrind total in {log}")
    return int(m.group(1))


class _kept:
    """A directory that stays (LBD_CG_KEEP): for callgrind_annotate afterwards."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ios", type=int, default=20000, help="measured requests per workload")
    ap.add_argument("--workloads", default="randwrite,randread,remote-randread")
    ap.add_argument("--lbd", default=lbd_exe(),
                    help="lbd script, run by the python beside it (default: .venv/bin/lbd)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "fio", "nbdkit"):
        if not shutil.which(tool):
            print(f"bench_instructions: {tool} is not installed", file=sys.stderr)
            return 2
    keep = os.environ.get("LBD_CG_KEEP")  # a directory to keep the callgrind files in
    with (tempfile.TemporaryDirectory(prefix="lbd-cg-") if not keep else _kept(keep)) as tmp:
        print(f"{'workload':<12} {'requests':>9} {'instructions':>14} {'per request':>12}")
        for w in args.workloads.split(","):
            total = count(w, args.ios, Path(tmp), args.lbd)
            print(f"{w:<12} {args.ios:>9,} {total:>14,} {total // args.ios:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
