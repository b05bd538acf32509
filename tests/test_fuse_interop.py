"""The FUSE file under real kernel clients: a loop device with ext4, fio, and
NBD clients on the same engine at the same time."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fuse_support import FuseEnv
from support import TOOL_PATH, nbdsh, random_file, require, run

MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ext4_on_a_loop_device_over_the_file(fuse: FuseEnv, tmp_path: Path) -> None:
    require("mkfs.ext4", "e2fsck")
    change = tmp_path / "c.lbd"
    args = ["-s", "64M", "-E", str(change)]
    m = fuse.mount(args)
    assert m.file is not None
    dev = fuse.losetup(m.file)
    run(["mkfs.ext4", "-q", "-F", dev])
    fsdir = tmp_path / "fs"
    fuse.mount_fs(dev, fsdir)
    rng = random.Random(11)
    files: dict[str, str] = {}
    (fsdir / "sub").mkdir()
    for i in range(40):
        data = rng.randbytes(rng.randint(1, 600_000))
        name = f"sub/f{i}" if i % 3 else f"f{i}"
        (fsdir / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    fuse.umount_fs(fsdir)
    fsck = run(["e2fsck", "-fn", dev], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    fuse.detach(dev)
    assert m.stop() == 0
    # a fresh process on the same change file: the file system is all there
    m2 = fuse.mount(args)
    assert m2.file is not None
    dev = fuse.losetup(m2.file)
    fsck = run(["e2fsck", "-fn", dev], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    fuse.mount_fs(dev, fsdir)
    for name, digest in files.items():
        assert sha256(fsdir / name) == digest, name
    fuse.umount_fs(fsdir)
    fuse.detach(dev)
    assert "Traceback" not in m.log() + m2.log()


def test_nbd_and_fuse_see_the_same_bytes(fuse: FuseEnv, tmp_path: Path) -> None:
    """Writes through one frontend are read at once through the other, on an open file."""
    base = random_file(tmp_path / "base.img", 8 * MiB, seed=12)
    m = fuse.mount(["-s", "8M", "-f", str(base), "-E", str(tmp_path / "c.lbd")], serve=True)
    assert m.file is not None
    fd = os.open(m.file, os.O_RDWR)
    try:
        before = os.pread(fd, 4096, 4096)  # read (and would cache) before the NBD write
        assert before == base.read_bytes()[4096:8192]
        nbdsh(m.uri, "h.pwrite(b'\\xab' * 4096, 4096)")
        assert os.pread(fd, 4096, 4096) == b"\xab" * 4096
        os.pwrite(fd, b"\xcd" * 1000, 100_001)
        nbdsh(m.uri, "assert h.pread(1000, 100001) == b'\\xcd' * 1000")
    finally:
        os.close(fd)
    # concurrently: an NBD client rewrites blocks with a counter while a FUSE
    # reader reads them; every read must be one whole version of the block
    stop = threading.Event()
    seen: list[int] = []
    errors: list[str] = []

    def reader() -> None:
        rfd = os.open(str(m.file), os.O_RDONLY)
        try:
            while not stop.is_set():
                block = os.pread(rfd, 4096, 2 * MiB)
                v = block[0]
                if block != bytes([v]) * 4096:
                    errors.append(f"torn block: {block[:8].hex()}...")
                    return
                seen.append(v)
        finally:
            os.close(rfd)

    nbdsh(m.uri, "h.pwrite(b'\\x01' * 4096, 2 * 1024 * 1024)")
    t = threading.Thread(target=reader)
    t.start()
    try:
        nbdsh(m.uri, "import time\n"
                     "for v in range(2, 201):\n"
                     "    h.pwrite(bytes([v]) * 4096, 2 * 1024 * 1024)\n"
                     "    time.sleep(0.001)\n")
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    with open(m.file, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4096) == b"\xc8" * 4096
    assert len(set(seen)) > 1  # the reader saw the block change while it read
    assert seen == sorted(seen)  # and never an older version after a newer one
    # the whole device, both ways, is one and the same
    run(["nbdcopy", m.uri, str(tmp_path / "via-nbd.img")])
    run(["cmp", str(tmp_path / "via-nbd.img"), str(m.file)])


def fio(*args: str) -> list[dict]:
    require("fio")
    p = run(["fio", "--output-format=json", "--name=fuse", *args], check=False, timeout=300)
    text = p.stdout
    body = text[text.find("\n{") + 1:] if not text.startswith("{") else text
    assert p.returncode == 0, f"fio exited {p.returncode}\n{p.stderr}\n{text[-3000:]}"
    assert "verify:" not in p.stderr, p.stderr
    jobs = json.loads(body)["jobs"]
    for j in jobs:
        assert j["error"] == 0, j
    return jobs


def test_fio_verify_on_the_file(fuse: FuseEnv, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", 32 * MiB, seed=13)
    m = fuse.mount(["-s", "32M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    assert m.file is not None
    # direct I/O at depth 32, two jobs on their own halves, crc32c in every block
    jobs = fio(f"--filename={m.file}", "--ioengine=libaio", "--direct=1", "--rw=randrw",
               "--bs=4k", "--iodepth=32", "--verify=crc32c", "--size=16M", "--numjobs=2",
               "--offset_increment=16M", "--verify_state_save=0")
    assert len(jobs) == 2
    for j in jobs:
        assert j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] > 0
    # buffered, large and odd-sized blocks
    fio(f"--filename={m.file}", "--ioengine=psync", "--rw=write", "--bsrange=1k-200k",
        "--verify=md5", "--size=32M", "--verify_state_save=0")
    assert "Traceback" not in m.log()


@pytest.mark.parametrize("how", ["fsync", "O_DSYNC"])
def test_fsync_flushes_the_change_file(fuse: FuseEnv, tmp_path: Path, how: str) -> None:
    """fsync(2), or a write to a file opened O_DSYNC, is the engine's FLUSH: fdatasync."""
    require("strace")
    change = tmp_path / "c.lbd"
    m = fuse.mount(["-s", "4M", "-E", str(change)])
    assert m.file is not None
    pid = m.proc.pid
    fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")
           if os.path.realpath(f"/proc/{pid}/fd/{n}") == str(change)}
    assert fds, "the change file is not open in lbd"
    trace = tmp_path / "strace.out"
    st = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o",
                           str(trace), "-p", str(pid)], stderr=subprocess.PIPE,
                          env={**os.environ, "PATH": TOOL_PATH})
    try:
        # wait until strace is attached (it then holds the tracer slot)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("TracerPid:") and line.split()[1] != "0"
                       for line in f):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("strace did not attach")
        time.sleep(0.5)  # strace attaches to the threads one by one
        fd = os.open(m.file, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x77" * 8192, 0)
            time.sleep(0.5)
            unsynced = trace.read_text() if trace.exists() else ""
            if how == "fsync":
                os.fsync(fd)
        finally:
            os.close(fd)
        if how == "O_DSYNC":
            fd = os.open(m.file, os.O_RDWR | os.O_DSYNC)
            try:
                os.pwrite(fd, b"\x78" * 8192, 8192)
            finally:
                os.close(fd)
        time.sleep(0.5)
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(30)
    synced = trace.read_text()
    syncs = [line for line in synced.splitlines() if "fdatasync(" in line or "fsync(" in line]
    assert not [s for s in unsynced.splitlines() if "sync(" in s], unsynced  # a write alone
    assert any(f"sync({fd_})" in s for s in syncs for fd_ in fds), synced


def test_st_blocks_follows_allocation(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    assert m.file is not None
    assert os.stat(m.file).st_blocks == 0  # nothing written: all of it reads from the null layer
    with open(m.file, "r+b") as f:
        f.seek(4 * MiB)
        f.write(b"\x01" * MiB)
    deadline = time.monotonic() + 30  # attributes may be cached for a second
    while os.stat(m.file).st_blocks != MiB // 512 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.stat(m.file).st_blocks == MiB // 512
    out = run(["du", "-k", str(m.file)]).stdout
    assert out.split()[0] == "1024", out
    assert m.stop() == 0
    base = random_file(tmp_path / "base.img", 16 * MiB, seed=14)
    m2 = fuse.mount(["-s", "16M", "-f", str(base)])
    assert m2.file is not None
    assert os.stat(m2.file).st_blocks == 16 * MiB // 512  # a flat image is data throughout
