"""Device.aread over a stack with a non-local layer (a pure-logic unit test).

The real remote layers are tested against real peers (tests/test_rbd.py);
this checks the engine's layer-by-layer async read on its own: a change file
(local) above a layer that is not local, ranges split between them, and the
default ``aread_present`` (a worker thread) beside an overridden one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from lbd.layers.expandable import ExpandableLayer

from lbd.device import Device
from lbd.errors import WouldBlock
from lbd.layer import Identity, Layer

SIZE = 1 << 20


class Remote(Layer):
    """In-memory data that pretends to be remote: never served with nowait."""

    kind = "remote"
    local = False

    def __init__(self, data: bytes, use_async: bool) -> None:
        super().__init__(len(data), False)
        self.data = data
        self.use_async = use_async
        self.calls: list[tuple[str, int, int]] = []

    def describe(self) -> str:
        return "memory"

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        if nowait:
            raise WouldBlock()
        self.calls.append(("thread", offset, len(view)))
        view[:] = self.data[offset:offset + len(view)]
        return []

    async def aread_present(self, offset: int, view: memoryview) -> list[tuple[int, int]]:
        if not self.use_async:
            return await super().aread_present(offset, view)
        await trio.sleep(0)
        self.calls.append(("async", offset, len(view)))
        view[:] = self.data[offset:offset + len(view)]
        return []


@pytest.mark.parametrize("use_async", [False, True])
async def test_aread_layer_by_layer(tmp_path: Path, use_async: bool) -> None:
    data = os.urandom(SIZE)
    remote = Remote(data, use_async)
    top = ExpandableLayer(str(tmp_path / "c.lbd"), SIZE, True, Identity())
    dev = Device(SIZE, [remote, top])
    assert not dev.local
    dev.write(4096, b"x" * 8192)
    dev.write(65536, b"y" * 512)
    with pytest.raises(WouldBlock):
        dev.read(0, 4096, nowait=True)
    want = bytearray(data)
    want[4096:12288] = b"x" * 8192
    want[65536:66048] = b"y" * 512
    assert await dev.aread(0, SIZE) == want
    # unaligned, and a range the change file holds entirely (no remote call)
    assert await dev.aread(4000, 300) == want[4000:4300]
    remote.calls.clear()
    assert await dev.aread(4096, 8192) == b"x" * 8192
    assert remote.calls == []
    # one call per missing range, through the layer's own aread_present or a thread
    assert await dev.aread(0, 16384) == want[:16384]
    how = "async" if use_async else "thread"
    assert remote.calls == [(how, 0, 4096), (how, 12288, 4096)]
    dev.close()
