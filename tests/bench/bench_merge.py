#!/usr/bin/env python3
"""Side-by-side merge benchmark: lbd-merge against qemu-img commit and a plain copy.

Not a pytest test; run it directly::

    python tests/bench/bench_merge.py [--size 1G] [--changed 256M] [--extent 1M] [--runs 3]

One run makes a random base image and a sparse file holding the *changed
data* (random bytes in ``--extent`` pieces at random places, holes
elsewhere).  The same changes are written once into an LBD change file
(``lbd serve -f BASE -E C``) and once into a qcow2 overlay over the same base
(``qemu-nbd``), both with ``nbdcopy --destination-is-zero`` so only the
data pieces are written.  Then, on a fresh copy of the base each time, with
everything in the page cache and every tool syncing its result:

- ``lbd-merge -f COPY -e C.lbd``            (commit the change file into the base)
- ``qemu-img commit -d OVERLAY``            (the same into the same base; -d keeps the
                                             overlay, as lbd-merge keeps the change file)
- ``cp --sparse=always CHANGES OUT; sync OUT``  the physical limit: write the same
                                             bytes at the same places
- ``dd if=DATA of=COPY bs=4M conv=notrunc,fdatasync``  the same bytes, one sequential run

The medians are printed side by side; the ratio is lbd-merge over the faster
of the two physical copies.  See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
PATH = os.pathsep.join([str(REPO / ".venv" / "bin"), "/usr/bin", "/usr/sbin", "/bin",
                        os.environ.get("PATH", "")])
ENV = {**os.environ, "PATH": PATH}


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def sh(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"bench_merge: {' '.join(cmd)} exited {p.returncode}:\n"
                         f"{p.stdout}{p.stderr}")
    return p


def timed(*cmd: str) -> float:
    t0 = time.monotonic()
    sh(*cmd)
    return time.monotonic() - t0


def write_random(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def make_changes(work: Path, size: int, changed: int, extent: int) -> tuple[Path, Path]:
    """A sparse image with the changed pieces, and the same bytes back to back."""
    rng = random.Random(7)
    slots = size // extent
    count = min(changed // extent, slots)
    picks = sorted(rng.sample(range(slots), count))
    sparse, packed = work / "changes.raw", work / "changes.bin"
    with open(sparse, "wb") as fs, open(packed, "wb") as fp:
        fs.truncate(size)
        for slot in picks:
            data = rng.randbytes(extent)
            fs.seek(slot * extent)
            fs.write(data)
            fp.write(data)
    return sparse, packed


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_merge: server exited {proc.returncode}")
        if path.exists() and subprocess.run(
                ["nbdinfo", "--size", f"nbd+unix:///?socket={path}"], capture_output=True,
                env=ENV).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit("bench_merge: server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fill_through_nbd(server: list[str], sock: Path, sparse: Path) -> None:
    proc = subprocess.Popen(server, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        sh("nbdcopy", "--destination-is-zero", str(sparse), f"nbd+unix:///?socket={sock}")
    finally:
        stop(proc)
    sock.unlink(missing_ok=True)


def fresh_copy(base: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    sh("cp", "--reflink=never", "--sparse=never", str(base), str(dst))
    sh("sync", str(dst))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="device / base size (default 1G)")
    ap.add_argument("--changed", default="256M", help="changed data (default 256M)")
    ap.add_argument("--extent", default="1M", help="size of each changed piece (default 1M)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool, median (default 3)")
    ap.add_argument("--workdir", help="use (and keep) this directory")
    args = ap.parse_args()
    size, changed, extent = parse_size(args.size), parse_size(args.changed), \
        parse_size(args.extent)
    for tool in ("lbd", "lbd-merge", "qemu-img", "qemu-nbd", "nbdcopy", "nbdinfo", "dd"):
        if shutil.which(tool, path=PATH) is None:
            raise SystemExit(f"bench_merge: {tool} not found (tools/setup.sh installs it)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lbd-bench-merge-",
                                                 dir=os.environ.get("TMPDIR", "/var/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="lbdm-"))
    try:
        print(f"bench_merge: {args.size} base, {args.changed} changed in {args.extent} "
              f"pieces, {args.runs} runs each, in {work}", flush=True)
        base = work / "base.img"
        write_random(base, size, 1)
        sparse, packed = make_changes(work, size, changed, extent)
        copy = work / "copy.img"
        # the same changes as an LBD change file and as a qcow2 overlay on the base copy
        change = work / "c.lbd"
        change.unlink(missing_ok=True)
        fresh_copy(base, copy)
        sock = sockdir / "s"
        fill_through_nbd(["lbd", "serve", "-s", str(size), "-f", str(copy), "-E", str(change),
                          "--unix", str(sock), "-a", "none", "-q"], sock, sparse)
        ovl = work / "ovl.qcow2"
        ovl.unlink(missing_ok=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "copy.img", "-F", "raw", str(ovl))
        fill_through_nbd(["qemu-nbd", "--persistent", "-k", str(sock), "-f", "qcow2",
                          str(ovl)], sock, sparse)
        data = changed // extent * extent
        for f in (base, sparse, packed, change, ovl):  # into the page cache
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M"], capture_output=True)
        times: dict[str, list[float]] = {k: [] for k in
                                         ("lbd-merge", "qemu-img commit", "cp --sparse", "dd")}
        out = work / "out.raw"
        for _ in range(args.runs):
            fresh_copy(base, copy)
            times["lbd-merge"].append(timed("lbd-merge", "-f", str(copy), "-e", str(change),
                                            "--no-progress"))
            fresh_copy(base, copy)
            times["qemu-img commit"].append(timed("qemu-img", "commit", "-q", "-d", str(ovl)))
            out.unlink(missing_ok=True)
            times["cp --sparse"].append(timed("sh", "-c", f"cp --sparse=always {sparse} {out} "
                                              f"&& sync {out}"))
            fresh_copy(base, copy)
            times["dd"].append(timed("dd", f"if={packed}", f"of={copy}", "bs=4M",
                                     "conv=notrunc,fdatasync", "status=none"))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{'tool':<18} {'median s':>9} {'MiB/s':>9}   runs (s)")
        for k, v in med.items():
            runs = " ".join(f"{x:.3f}" for x in times[k])
            print(f"{k:<18} {v:9.3f} {data / MiB / v:9.1f}   {runs}")
        limit = min(med["cp --sparse"], med["dd"])
        print(f"\nlbd-merge / physical copy limit: {med['lbd-merge'] / limit:.2f}x "
              f"(target <= 1.5x); lbd-merge / qemu-img commit: "
              f"{med['lbd-merge'] / med['qemu-img commit']:.2f}x")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
