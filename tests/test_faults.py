"""Faults underneath the server: a full disk, a failing base, a failing change file.

* ENOSPC: the change file lives on a small tmpfs.  Writes fill it until
  they fail with ENOSPC; the server stays up, every write acknowledged so far
  reads back, and once space is freed (a filler file removed, the file
  system grown) writing goes on.  Stopping while the disk is full, and
  restarting, keeps every acknowledged write.
* EIO: the base image (and, in other tests, the change file or a writable
  flat image) lives on ``tests/failfs.py``, a FUSE file system of the tests'
  own that fails reads of a range, or writes, on command.  Those requests
  get EIO; everything else, and every other client, goes on; when the
  failures stop, all data is intact.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import LBD, random_file, require, run

MiB = 1 << 20
KiB = 1 << 10
HERE = Path(__file__).resolve().parent


def nbd_handle(uri: str):  # type: ignore[no-untyped-def]
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def nbd_errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    """The errno of a libnbd call that must fail."""
    import nbd

    try:
        fn(*args)
    except nbd.Error as exc:
        return exc.errnum or -1
    raise AssertionError(f"{fn.__name__}{args[1:]} succeeded; it should have failed")


def no_internal_errors(srv: LBD) -> None:
    log = srv.log()
    for bad in ("Traceback", "internal error", "failed unexpectedly"):
        assert bad not in log, log[-4000:]


# -- a small file system ------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    require("mount", "umount")
    path.mkdir()
    p = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
    if p.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the fault tests need root): {p.stderr}",
                    pytrace=False)
    try:
        yield path
    finally:
        run(["umount", "-l", str(path)], check=False)


def fill(h, start: int, block: int, acked: dict[int, bytes], rng: random.Random,
         limit: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Write unique blocks from ``start`` until ENOSPC; then 10 more that must fail too.

    Returns (next offset, number of ENOSPC errors).
    """
    import nbd

    off = start
    failures = 0
    while off + block <= limit and failures < 10:
        data = rng.randbytes(block)
        try:
            h.pwrite(data, off)
        except nbd.Error as exc:
            assert exc.errnum == errno.ENOSPC, f"write at {off} failed with {exc}"
            failures += 1
        else:
            assert failures == 0, "a write succeeded after ENOSPC with nothing freed"
            acked[off] = data
        off += block
    return off, failures


def verify(h, acked: dict[int, bytes]) -> None:  # type: ignore[no-untyped-def]
    for off, data in acked.items():
        assert h.pread(len(data), off) == data, f"acknowledged write at {off} lost"


def test_disk_full_enospc_then_space_freed(tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "small", "12m") as fs:
        filler = fs / "filler"
        filler.write_bytes(os.urandom(3 * MiB))
        chg = fs / "c.lbd"
        size = 256 * MiB
        args = ["-s", "256M", "-E", str(chg)]
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        witness = nbd_handle(srv.uri)
        rng = random.Random(60)
        acked: dict[int, bytes] = {}
        off, failures = fill(h, 0, 64 * KiB, acked, rng, size)
        assert failures == 10 and len(acked) > 50, (failures, len(acked))
        # full: the server is up, the data is there, other clients work, flush works
        verify(witness, acked)
        witness.flush()
        run(["nbdinfo", "--size", srv.uri])
        # space is freed: writing goes on
        filler.unlink()
        off2, failures = fill(h, off, 64 * KiB, acked, rng, off + 32 * 64 * KiB)
        assert failures == 0, "writes still fail after space was freed"
        verify(witness, acked)
        # full again, then a stop while full: the index snapshot may not fit
        off3, failures = fill(h, off2, 64 * KiB, acked, rng, size)
        assert failures == 10
        off3, failures = fill(h, off3, 512, acked, rng, size)  # to the last sector
        assert failures == 10
        h.shutdown()
        witness.shutdown()
        code = srv.stop()
        assert code == 0, f"lbd serve exited {code} when stopped on a full disk:\n" \
            f"{srv.log()[-3000:]}"
        assert "could not write the index snapshot" in srv.log(), srv.log()[-3000:]
        no_internal_errors(srv)
        # grow the file system and serve the same change file again: all there
        run(["mount", "-o", "remount,size=64m", str(fs)])
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        verify(h, acked)
        h.pwrite(b"after" * 1000, off3)
        assert h.pread(5000, off3) == b"after" * 1000
        h.shutdown()
        assert srv.stop() == 0
        no_internal_errors(srv)


def test_disk_full_kill9_keeps_acknowledged_writes(tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while the change file's disk is full: after a restart every write
    acknowledged before the crash is there (no torn entry may hide them)."""
    with tmpfs(tmp_path / "small", "6m") as fs:
        chg = fs / "c.lbd"
        args = ["-s", "64M", "-E", str(chg)]
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        rng = random.Random(61)
        acked: dict[int, bytes] = {}
        # small and odd-sized writes, so the disk fills in the middle of anything
        import nbd

        failures = 0
        for _ in range(4000):
            n = rng.choice([512, 4096, 4096, 65536, 1536])
            off = rng.randrange(0, 64 * MiB - n) // 512 * 512
            data = rng.randbytes(n)
            try:
                h.pwrite(data, off)
            except nbd.Error as exc:
                assert exc.errnum == errno.ENOSPC, exc
                failures += 1
                if failures > 30:
                    break
                continue
            for k in [k for k in acked if k < off + n and k + len(acked[k]) > off]:
                old = acked.pop(k)  # keep the model simple: drop what this overlaps
                if k < off:
                    acked[k] = old[:off - k]
                if k + len(old) > off + n:
                    acked[off + n] = old[off + n - k:]
            acked[off] = data
        assert failures > 30, "the disk never filled"
        srv.kill9()
        run(["mount", "-o", "remount,size=64m", str(fs)])
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        verify(h, acked)
        h.shutdown()
        assert srv.stop() == 0
        no_internal_errors(srv)


# -- a failing disk (FUSE) ------------------------------------------------------------------


@contextmanager
def failfs(tmp_path: Path, backing: Path) -> Iterator[Path]:
    """Mount tests/failfs.py over ``backing``; yields the mount point."""
    require("fusermount3")
    mnt = tmp_path / "failfs"
    mnt.mkdir()
    log = open(tmp_path / "failfs.log", "wb")
    p = subprocess.Popen([sys.executable, str(HERE / "failfs.py"), str(backing), str(mnt)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("failfs did not mount:\n"
                                     + (tmp_path / "failfs.log").read_text())
            time.sleep(0.05)
        yield mnt
    finally:
        if run(["fusermount3", "-u", str(mnt)], check=False).returncode != 0:
            run(["fusermount3", "-u", "-z", str(mnt)], check=False)  # still busy: lazily
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        log.close()


def ctl(mnt: Path, command: str) -> None:
    with open(mnt / "ctl", "w") as f:
        f.write(command + "\n")


def failed_reads(mnt: Path) -> int:
    return int((mnt / "ctl").read_text().split()[1])


def test_base_read_errors_become_eio(tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    size = 16 * MiB
    backing = random_file(tmp_path / "base.img", size, seed=62)
    model = bytearray(backing.read_bytes())
    with failfs(tmp_path, backing) as mnt:
        srv = lbd_server(["-s", "16M", "-f", str(mnt / "base.img"),
                          "-E", str(tmp_path / "c.lbd")])
        h = nbd_handle(srv.uri)
        other = nbd_handle(srv.uri)
        assert h.pread(4096, 0) == model[:4096]
        bad = 4 * MiB
        ctl(mnt, f"fail {bad} {64 * KiB}")
        # small and large (sendfile) reads, unaligned reads, and an unaligned write
        # (read-modify-write of a base sector) all get EIO
        assert nbd_errno(h.pread, 4096, bad) == errno.EIO
        assert nbd_errno(h.pread, 1 * MiB, bad - 512 * KiB) == errno.EIO
        assert nbd_errno(h.pread, 100, bad + 1000) == errno.EIO
        assert nbd_errno(h.pwrite, b"rmw", bad + 100) == errno.EIO
        assert failed_reads(mnt) >= 4
        # the same connection and another one go on; reads elsewhere are fine
        assert h.pread(1 * MiB, 0) == model[:1 * MiB]
        assert other.pread(1 * MiB, 8 * MiB) == model[8 * MiB:9 * MiB]
        # an aligned write over the bad range lands in the change file and reads back
        h.pwrite(b"\x5a" * 8192, bad)
        model[bad:bad + 8192] = b"\x5a" * 8192
        assert h.pread(8192, bad) == model[bad:bad + 8192]
        assert nbd_errno(h.pread, 4096, bad + 8192) == errno.EIO
        # the failure ends: everything is intact
        ctl(mnt, "ok")
        h.pwrite(b"rmw", bad + 100)
        model[bad + 100:bad + 103] = b"rmw"
        for i in range(0, size, 2 * MiB):
            assert other.pread(2 * MiB, i) == model[i:i + 2 * MiB], i
        h.shutdown()
        other.shutdown()
        assert srv.stop() == 0
        no_internal_errors(srv)


def test_writable_flat_write_errors_become_eio(tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    size = 8 * MiB
    backing = random_file(tmp_path / "base.img", size, seed=63)
    model = bytearray(backing.read_bytes())
    with failfs(tmp_path, backing) as mnt:
        srv = lbd_server(["-s", "8M", "-F", str(mnt / "base.img")])
        h = nbd_handle(srv.uri)
        h.pwrite(b"A" * 4096, 0)
        model[:4096] = b"A" * 4096
        ctl(mnt, "failwrites")
        assert nbd_errno(h.pwrite, b"B" * 4096, 8192) == errno.EIO
        assert nbd_errno(h.pwrite, b"B" * 100, 10) == errno.EIO
        assert h.pread(4096, 0) == model[:4096]
        ctl(mnt, "ok")
        h.pwrite(b"C" * 4096, 8192)
        model[8192:12288] = b"C" * 4096
        h.flush()
        assert h.pread(size, 0) == model
        h.shutdown()
        assert srv.stop() == 0
        no_internal_errors(srv)
    assert backing.read_bytes() == model


def test_change_file_write_errors_lose_no_acknowledged_write(tmp_path: Path,
                                                             lbd_server) -> None:  # type: ignore[no-untyped-def]
    """The change file's own disk fails some writes, then kill -9.

    A rewrite of a block not yet synced goes in place: its journal entry is
    written, then its data.  When the data write fails (and its retry too),
    the client gets EIO, and no later acknowledged write may be lost to the
    entry whose data never landed.
    """
    from lbd.layers.changefile import ChangeFile

    from lbd.layer import Identity

    backing = tmp_path / "c.lbd"
    ChangeFile.create(str(backing), 16 * MiB, Identity()).close()
    with failfs(tmp_path, backing) as mnt:
        args = ["-s", "16M", "-E", str(mnt / "base.img")]
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        h.pwrite(b"1" * 4096, 0)  # its payload: the first data in the file
        loc = 4096 + 64 * KiB  # after the header and the first journal area
        with open(mnt / "base.img", "rb") as f:
            f.seek(loc)
            assert f.read(4096) == b"1" * 4096, "the payload is not where expected"
        ctl(mnt, f"failwrite {loc} 4096")
        assert nbd_errno(h.pwrite, b"2" * 4096, 0) == errno.EIO  # the in-place rewrite
        ctl(mnt, "ok")
        h.pwrite(b"3" * 4096, 1 * MiB)  # acknowledged after the failure
        h.pwrite(b"4" * 512, 2 * MiB)
        assert h.pread(4096, 0) in (b"1" * 4096, b"2" * 4096)
        srv.kill9()
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        assert h.pread(4096, 1 * MiB) == b"3" * 4096, "an acknowledged write was lost"
        assert h.pread(512, 2 * MiB) == b"4" * 512, "an acknowledged write was lost"
        assert h.pread(4096, 0) in (b"1" * 4096, b"2" * 4096)
        # the same with a flush after the failure: then a full check of every payload
        h.pwrite(b"X" * 4096, 6 * MiB)
        where = backing.read_bytes().find(b"X" * 4096)
        assert where > 0
        ctl(mnt, f"failwrite {where} 4096")
        assert nbd_errno(h.pwrite, b"Y" * 4096, 6 * MiB) == errno.EIO
        ctl(mnt, "ok")
        h.flush()
        h.pwrite(b"7" * 4096, 5 * MiB)
        srv.kill9()
        srv = lbd_server(args)
        h = nbd_handle(srv.uri)
        assert h.pread(4096, 5 * MiB) == b"7" * 4096
        assert h.pread(4096, 6 * MiB) in (b"X" * 4096, b"Y" * 4096)
        assert h.pread(4096, 1 * MiB) == b"3" * 4096
        h.shutdown()
        assert srv.stop() == 0
        no_internal_errors(srv)
    # every payload the journal vouches for checks out (lbd-inspect --check's test)
    ChangeFile.open(str(backing), writable=False, verify=True).close(clean=False)
