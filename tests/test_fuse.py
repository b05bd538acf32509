"""The FUSE frontend with the kernel's FUSE client: the device as one file.

Every test mounts with a real ``lbd mount`` (or ``lbd serve --mount``)
process and reads and writes the file with ordinary system calls and tools.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from fuse_support import FuseEnv
from support import random_file, run

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
