"""The FUSE frontend with the kernel's FUSE client: the device as one file.

Every test mounts with a real ``lbd mount`` (or ``lbd serve --mount``)
process and reads and writes the file with ordinary system calls and tools.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest
from fuse_support import FuseEnv, is_mounted
from support import random_file, require, run

MiB = 1 << 20
SIZE = 16 * MiB


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_mount_reads_the_layered_device(fuse: FuseEnv, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=7)
    m = fuse.mount(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    assert m.file == m.mountpoint / "device"
    st = os.stat(m.file)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == SIZE
    assert os.listdir(m.mountpoint) == ["device"]
    assert sha256(m.file) == sha256(base)
    run(["cmp", str(base), str(m.file)])


def test_ordinary_tools_see_a_partitioned_disk(fuse: FuseEnv, tmp_path: Path) -> None:
    require("sfdisk", "fdisk", "file")
    base = tmp_path / "disk.img"
    with open(base, "wb") as f:
        f.truncate(SIZE)
    run(["sfdisk", "-q", str(base)], input=b"label: dos\nstart=2048, size=20480, type=83\n")
    m = fuse.mount(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    assert m.file is not None
    out = run(["file", str(m.file)]).stdout
    assert "DOS/MBR boot sector" in out, out
    out = run(["fdisk", "-l", str(m.file)]).stdout
    assert f"{m.file}1" in out and "2048" in out and "22527" in out, out
    dd = run(["dd", f"if={m.file}", "of=/dev/null", "bs=1M"])
    assert f"{SIZE} bytes" in dd.stderr, dd.stderr


def test_export_name_names_the_file(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "1M", "-E", str(tmp_path / "c.lbd"), "-x", "disk0.img"])
    assert m.file == m.mountpoint / "disk0.img"
    assert os.listdir(m.mountpoint) == ["disk0.img"]
    assert not os.path.exists(m.mountpoint / "device")
    assert os.path.getsize(m.file) == 1 * MiB
    m2 = fuse.mount(["-s", "1M", "-E", str(tmp_path / "d.lbd"), "-x", "disks/0"])
    assert m2.file == m2.mountpoint / "device"
    assert "the export name 'disks/0' cannot be a file name" in m2.log()


def test_mount_over_a_regular_file(fuse: FuseEnv, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=8)
    target = tmp_path / "disk.raw"
    target.write_bytes(b"the file underneath")
    m = fuse.mount(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")],
                   mountpoint=target)
    assert m.file == target
    assert is_mounted(target)
    assert os.path.getsize(target) == SIZE
    run(["cmp", str(base), str(target)])
    with open(target, "r+b") as f:
        f.seek(SIZE - 4096)
        f.write(b"\x5a" * 4096)
    assert m.stop() == 0
    assert not is_mounted(target)
    assert target.read_bytes() == b"the file underneath"


def test_writes_match_a_model_and_persist(fuse: FuseEnv, tmp_path: Path) -> None:
    """Random aligned and unaligned writes and reads, checked against a bytearray."""
    import random

    from support import LBD

    base = random_file(tmp_path / "base.img", SIZE, seed=9)
    change = tmp_path / "c.lbd"
    model = bytearray(base.read_bytes())
    m = fuse.mount(["-s", "16M", "-f", str(base), "-E", str(change)])
    assert m.file is not None
    rng = random.Random(5)
    fd = os.open(m.file, os.O_RDWR)
    try:
        for i in range(400):
            aligned = i % 2 == 0
            if aligned:
                n = 512 * rng.randint(1, 256)
                off = 512 * rng.randrange(0, (SIZE - n) // 512)
            else:
                n = rng.randint(1, 70000)
                off = rng.randrange(0, SIZE - n)
            if rng.random() < 0.6:
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
            else:
                assert os.pread(fd, n, off) == model[off:off + n], (i, off, n)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert m.file.read_bytes() == model
    assert m.stop() == 0
    assert not is_mounted(m.mountpoint)
    assert base.read_bytes() != model  # the base is read-only: writes went to the change file
    # The change file holds the writes: served over NBD, it reads as the model.
    srv = LBD(["-s", "16M", "-f", str(base), "-E", str(change)], cwd=tmp_path)
    try:
        run(["nbdcopy", srv.uri, str(tmp_path / "out.img")])
    finally:
        assert srv.stop() == 0
    assert (tmp_path / "out.img").read_bytes() == model


def test_size_is_fixed(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    assert m.file is not None
    path = str(m.file)
    fd = os.open(path, os.O_RDWR)
    try:
        # reads at the end are short, reads past it empty
        assert len(os.pread(fd, 4096, SIZE - 100)) == 100
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 4096, SIZE + 12345) == b""
        # a write that starts at the end fails; one that crosses it is short
        for off in (SIZE, SIZE + 4096):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 512, off)
            assert e.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 1000, SIZE - 300) == 300
        assert os.pread(fd, 300, SIZE - 300) == b"y" * 300
        # truncate: the same size is accepted, any other refused
        os.ftruncate(fd, SIZE)
        for size in (0, SIZE - 512, SIZE + 512, 2 * SIZE):
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, size)
            assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
    assert "truncate to 0 bytes refused: the device size is fixed" in m.log()
    run(["truncate", "-s", "16M", path])
    p = run(["truncate", "-s", "8M", path], check=False)
    assert p.returncode != 0 and "Operation not permitted" in p.stderr, p.stderr
    # dd: O_TRUNC is ignored, as for a block device, so a plain dd works
    src = random_file(tmp_path / "src", 2 * MiB, seed=3)
    run(["dd", f"if={src}", f"of={path}", "bs=64k"])
    assert os.path.getsize(path) == SIZE
    with open(path, "rb") as f:
        assert f.read(2 * MiB) == src.read_bytes()
        assert f.read(1) == b"\0"  # nothing after what dd wrote was cut off
    # dd seek= truncates to the seek offset unless conv=notrunc: refused, and
    # dd says so (then writes anyway, as it would to a block device)
    p = run(["dd", f"if={src}", f"of={path}", "bs=1M", "seek=4"])
    assert "failed to truncate to 4194304 bytes" in p.stderr, p.stderr
    assert "Operation not permitted" in p.stderr, p.stderr
    run(["dd", f"if={src}", f"of={path}", "bs=1M", "seek=6", "conv=notrunc"])
    assert os.path.getsize(path) == SIZE
    with open(path, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4 * MiB) == src.read_bytes() * 2
    # writing more than fits: dd stops with ENOSPC at the end, nothing is lost silently
    big = random_file(tmp_path / "big", SIZE + MiB, seed=4)
    p = run(["dd", f"if={big}", f"of={path}", "bs=1M", "conv=notrunc"], check=False)
    assert p.returncode != 0 and "No space left on device" in p.stderr, p.stderr
    assert os.path.getsize(path) == SIZE
    with open(path, "rb") as f:
        assert f.read() == big.read_bytes()[:SIZE]


@pytest.mark.parametrize("how", ["read-only device", "--readonly"])
def test_read_only(fuse: FuseEnv, tmp_path: Path, how: str) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=10)
    if how == "--readonly":
        args = ["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd"), "-r"]
    else:
        args = ["-s", "16M", "-f", str(base)]
    m = fuse.mount(args)
    assert m.file is not None
    assert stat.S_IMODE(os.stat(m.file).st_mode) == 0o444
    for flags in (os.O_RDWR, os.O_WRONLY):
        with pytest.raises(OSError) as e:
            os.open(m.file, flags)
        assert e.value.errno == errno.EROFS
    run(["cmp", str(base), str(m.file)])
    p = run(["dd", "if=/dev/zero", f"of={m.file}", "bs=4k", "count=1", "conv=notrunc"],
            check=False)
    assert p.returncode != 0 and "Read-only file system" in p.stderr, p.stderr
