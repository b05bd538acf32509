"""LBD under ``fio``'s nbd engine: random mixed I/O at depth 32 with verification.

Every job is its own NBD connection (multi-conn) on its own range of the
device (``offset_increment``); fio writes blocks carrying a crc32c header and
reads them all back.  Runs over a flat base full of random data with a
change file on top, so every unwritten block reads from the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from support import random_file, require, run

MiB = 1 << 20
SIZE = 32 * MiB


def fio(uri: str, *args: str) -> list[dict[str, Any]]:
    """Run fio; fail on a non-zero exit or on any job reporting an error."""
    require("fio")
    p = run(["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
             "--name=lbd", "--verify_state_save=0", *args], check=False, timeout=120)
    text = p.stdout
    body = text[text.find("\n{") + 1:] if not text.startswith("{") else text
    assert p.returncode == 0, f"fio exited {p.returncode}\n{p.stderr}\n{text[-3000:]}"
    assert "verify:" not in p.stderr, p.stderr
    jobs = json.loads(body)["jobs"]
    for j in jobs:
        assert j["error"] == 0, j
    return jobs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_stack(lbd_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    base = random_file(tmp_path / "base.img", SIZE, seed=31)
    srv = lbd_server(["-s", "32M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    return base, srv


def no_errors_logged(srv: Any) -> None:
    log = srv.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_fio_randrw_4k_qd32_verify_four_connections(lbd_server, tmp_path: Path) -> None:
    base, srv = base_stack(lbd_server, tmp_path)
    before = sha256(base)
    jobs = fio(srv.uri, "--rw=randrw", "--bs=4k", "--iodepth=32", "--verify=crc32c",
               "--size=8M", "--numjobs=4", "--offset_increment=8M")
    assert len(jobs) == 4
    for j in jobs:
        assert j["write"]["io_bytes"] > 0
        # the verify pass read back at least every block written
        assert j["read"]["io_bytes"] >= j["write"]["io_bytes"]
    assert sha256(base) == before  # the base is never written
    no_errors_logged(srv)


def test_fio_randrw_mixed_block_sizes_verify(lbd_server, tmp_path: Path) -> None:
    base, srv = base_stack(lbd_server, tmp_path)
    before = sha256(base)
    jobs = fio(srv.uri, "--rw=randrw", "--bsrange=512-64k", "--iodepth=32",
               "--verify=crc32c", "--size=16M", "--numjobs=2", "--offset_increment=16M")
    assert len(jobs) == 2
    assert sha256(base) == before
    no_errors_logged(srv)


def test_fio_unaligned_blocks_verify(lbd_server, tmp_path: Path) -> None:
    """Odd block sizes (multiples of 512 that are not of 4k) at 512-byte alignment."""
    _, srv = base_stack(lbd_server, tmp_path)
    fio(srv.uri, "--rw=randwrite", "--bs=1536", "--blockalign=512", "--iodepth=16",
        "--verify=crc32c", "--size=4M", "--numjobs=2", "--offset_increment=16M")
    no_errors_logged(srv)


def test_fio_verify_after_restart(lbd_server, tmp_path: Path) -> None:
    """Written by fio, server stopped (SIGTERM), restarted on the same files:
    a verify-only fio run finds every block."""
    base, srv = base_stack(lbd_server, tmp_path)
    before = sha256(base)
    job = ["--rw=randwrite", "--bsrange=512-64k", "--iodepth=32", "--verify=crc32c",
           "--size=16M", "--numjobs=2", "--offset_increment=16M"]
    fio(srv.uri, *job, "--do_verify=0")
    assert srv.stop() == 0
    srv = lbd_server(["-s", "32M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    jobs = fio(srv.uri, *job, "--verify_only")
    assert sum(j["read"]["io_bytes"] for j in jobs) > 0
    assert sha256(base) == before
    no_errors_logged(srv)
