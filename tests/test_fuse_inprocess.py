"""The FUSE frontend run in the test's own trio loop, over a real kernel mount.

Here the device's only layer is a writable flat image that says it is not
local (as a remote NBD or RBD layer will): every call that may block must
then run in a worker thread, never on the event loop.  The file is used from
worker threads through the kernel, like any other program would.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from fuse_support import is_mounted
from lbd.frontends.fuse import FuseFrontend
from lbd.layers.flat import FlatLayer
from support import random_file

from lbd.device import Device
from lbd.errors import WouldBlock
from lbd.layer import Buffer

MiB = 1 << 20


class FarLayer(FlatLayer):
    """A flat image that behaves like a network layer: it records which threads call it."""

    local = False

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.calls: list[tuple[str, int]] = []

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        if nowait:
            raise WouldBlock()
        self.calls.append(("read", threading.get_ident()))
        return super().read_present(offset, view, nowait)

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        self.calls.append(("write", threading.get_ident()))
        super().write(offset, buffers, nbytes, fua)

    def flush(self) -> None:
        self.calls.append(("flush", threading.get_ident()))
        super().flush()

    def extents(self, offset: int, length: int) -> list:  # type: ignore[type-arg]
        self.calls.append(("extents", threading.get_ident()))
        return super().extents(offset, length)


async def test_a_non_local_device_is_served_from_worker_threads(tmp_path: Path) -> None:
    img = random_file(tmp_path / "far.img", 4 * MiB, seed=31)
    layer = FarLayer(str(img), 4 * MiB, True)
    device = Device(4 * MiB, [layer])
    assert not device.local
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fe = FuseFrontend(device, str(mnt))
    loop_thread = threading.get_ident()
    expected = bytearray(img.read_bytes())

    def use_the_file(path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            assert os.pread(fd, MiB, 0) == expected[:MiB]
            os.pwrite(fd, b"\x99" * 5000, 12345)  # unaligned: read-modify-write
            expected[12345:17345] = b"\x99" * 5000
            os.fsync(fd)
            assert os.pread(fd, 8192, 8192) == expected[8192:16384]
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", 4 * MiB)
            assert e.value.errno == errno.ENOSPC
            assert os.fstat(fd).st_blocks == 4 * MiB // 512
        finally:
            os.close(fd)

    try:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(fe.run)
            assert is_mounted(mnt)
            await trio.to_thread.run_sync(use_the_file, path)
            await fe.shutdown()
    finally:
        calls = list(layer.calls)  # what the frontend did (close() below flushes, too)
        fe.unmount()
        device.close()
    assert not is_mounted(mnt)
    assert img.read_bytes() == expected
    kinds = {k for k, _ in calls}
    assert {"read", "write", "flush", "extents"} <= kinds, kinds
    on_loop = [k for k, t in calls if t == loop_thread]
    assert not on_loop, f"called on the event loop: {on_loop}"
