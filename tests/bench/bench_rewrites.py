#!/usr/bin/env python3
"""A database's load on an overlay: the same pages rewritten with an fsync
every few writes.  IOPS and the overlay's disk use, LBD against qemu-nbd's
qcow2 overlay and nbdkit's cow filter, in one run.

Not a pytest test; run it directly::

    python tests/bench/bench_rewrites.py [--region 64M] [--runtime 10] \\
        [--only lbd,nbdkit-cow,qemu-nbd] [--pages 4k,16k]

For each server and page size a fresh overlay over one random base image
(bench_nbd.py's servers and base) takes fio's nbd engine: random writes of
one page over the first ``--region`` of the device, 8 in flight, an fsync
every 8 writes, for ``--runtime`` seconds.  The disk use is what the files
the server has open in the work directory (not the base) take on disk,
while it still runs (nbdkit's cow overlay is an unlinked temporary file).
A change file that appended every rewrite of synced data would grow by
about the data written; LBD recycles the dead payloads (docs/format.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_nbd as B

SERVERS = ("lbd", "nbdkit-cow", "qemu-nbd")


def disk_use(server: B.Server, ctx: B.Ctx) -> int:
    """Bytes on disk of the regular files in the work directory the server holds open."""
    assert server.proc is not None
    fds = Path(f"/proc/{server.proc.pid}/fd")
    seen: set[tuple[int, int]] = set()
    total = 0
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
            st = os.stat(fd)
        except OSError:
            continue
        if not target.startswith(str(ctx.workdir)) or target == str(ctx.base):
            continue
        if (st.st_dev, st.st_ino) in seen or not os.path.isfile(fd):
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=B.parse_size, default=B.GiB, help="device size (1G)")
    ap.add_argument("--region", type=B.parse_size, default=64 * B.MiB,
                    help="the part of the device rewritten (64M)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per run (10)")
    ap.add_argument("--only", default=",".join(SERVERS))
    ap.add_argument("--pages", default="4k,16k", help="page sizes (4k,16k)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    if any(n not in B.SERVERS for n in names):
        ap.error(f"servers: {','.join(B.SERVERS)}")
    pages = [p for p in args.pages.split(",") if p]
    workdir = Path(tempfile.mkdtemp(prefix="lbd-rewrites-")).resolve()
    ctx = B.Ctx(workdir=workdir, base=workdir / "base.img", size=args.size,
                lbd=B.find_lbd(None), lbd_args=[])
    rows: dict[tuple[str, str], tuple[float, int]] = {}
    try:
        B.check_tools(names, ctx)
        B.make_base(ctx.base, args.size)
        for page in pages:
            wl = B.Workload(f"rewrite-{page}", f"{page} page rewrites", "IOPS", True,
                            {"rw": "randwrite", "bs": page, "iodepth": "8",
                             "size": str(args.region), "fsync": "8"})
            for name in names:
                B.log(f"== {name}: {wl.label}")
                with B.serving(B.SERVERS[name], ctx, f"rw-{page}", True) as srv:
                    res = B.run_fio(srv, wl, args.runtime, 0, workdir)
                    rows[(page, name)] = (res.value, disk_use(srv, ctx))
    except B.BenchError as exc:
        print(f"bench_rewrites: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"Page rewrites over {args.region / B.MiB:.0f} MiB of a {args.size / B.MiB:.0f} MiB "
          f"device, fio QD8, fsync every 8 writes, {args.runtime}s each, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    header = ["page", *(f"{n} IOPS" for n in names), *(f"{n} disk MiB" for n in names)]
    lines = [header]
    for page in pages:
        iops = [f"{rows[(page, n)][0]:,.0f}" for n in names]
        use = [f"{rows[(page, n)][1] / B.MiB:,.0f}" for n in names]
        lines.append([page, *iops, *use])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for r in lines:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
