"""The layer contract: what a data source must do to sit in a device's stack.

Offsets and lengths given to a layer are in bytes, always multiples of 512 and
always inside the device: the device validates every request once, so layers
never re-check.  A layer needs only ``read_present``; writing, zeroing and
flushing are capabilities that writable layers add.

Local layers (files) do their I/O synchronously and are called inline on the
event loop, which is what makes small requests fast; ``nowait`` asks them to
serve only from the page cache and raise :class:`~lbd.errors.WouldBlock`
otherwise, and the device then repeats the request in a worker thread.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import trio

from lbd.errors import IOFailure

Buffer = bytes | bytearray | memoryview


class State(IntEnum):
    """How a layer holds a range (for reads and block status)."""

    ABSENT = 0  # not here: ask the layer below
    DATA = 1  # stored here
    ZERO = 2  # here, and reads as zeros (a hole, a trimmed range)


# identity kinds: what a change file was created on top of
ID_NONE = 0  # the null layer: nothing below
ID_CHANGE = 1  # another change file, by its uuid
ID_IMAGE = 2  # a flat image or a remote, by a content fingerprint
_ID_NAMES = {ID_NONE: "nothing (the null layer)", ID_CHANGE: "change file", ID_IMAGE: "image"}


@dataclass(frozen=True)
class Identity:
    """The identity of a layer, as a change file on top of it records it."""

    kind: int = ID_NONE
    ident: bytes = bytes(16)
    desc: str = ""

    def same(self, other: Identity) -> bool:
        return self.kind == other.kind and self.ident == other.ident

    def __str__(self) -> str:
        if self.kind == ID_NONE:
            return _ID_NAMES[ID_NONE]
        name = f" {self.desc}" if self.desc else ""
        return f"{_ID_NAMES.get(self.kind, 'unknown')}{name} (id {self.ident.hex()})"


# What a layer's ``write_submit`` returns for a write it finished at once (the
# -X cache took it): no callback follows, the caller replies now.
WRITTEN = "written"
# What ``read_submit`` returns when its cache held all of the range: the data
# is in the buffers already and no callback follows.
FILLED = "filled"


class Layer(ABC):
    kind: ClassVar[str]
    # False for a layer that may wait on a network (NBD, RBD).  Its
    # read_present(nowait=True) must raise WouldBlock rather than wait, and
    # frontends then call everything else in worker threads (Device.local).
    local: ClassVar[bool] = True

    def __init__(self, size: int, writable: bool) -> None:
        self.size = size
        self.writable = writable
        self.reads = 0
        self.read_bytes = 0
        self.writes = 0
        self.written_bytes = 0

    # -- description -----------------------------------------------------------

    @abstractmethod
    def describe(self) -> str:
        """The layer's parameter as a user gave it (a path, an address)."""

    def identity(self) -> Identity:
        """What a change file created on top of this layer records as its parent."""
        return Identity()

    def info(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "writable": self.writable,
            "param": self.describe(),
            "stats": {"reads": self.reads, "read_bytes": self.read_bytes,
                      "writes": self.writes, "written_bytes": self.written_bytes},
        }

    # -- I/O -----------------------------------------------------------------

    @abstractmethod
    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        """Fill the parts of ``view`` (device bytes from ``offset``) held here.

        ``view`` arrives zero-filled, so zero ranges need no work.  Returns
        the ``(offset, length)`` ranges this layer does not hold, for the
        layer below.
        """

    async def aread_present(self, offset: int, view: memoryview) -> list[tuple[int, int]]:
        """``read_present`` for the event loop, after ``nowait`` raised WouldBlock.

        By default a worker thread; a remote layer may wait on its network
        without one.
        """
        return await trio.to_thread.run_sync(self.read_present, offset, view, False)

    def absent(self, offset: int, length: int) -> bool:
        """True if this layer surely holds nothing of the (aligned) range.

        A cheap check with no I/O, for the remote read path to pass a range
        straight down; False when unsure.
        """
        return False

    def read_fast(self, offset: int, length: int) -> bytearray | bool | None:
        """A small aligned read served at once from memory or the page cache.

        The data if this layer holds all of the range as one piece it can
        read without waiting; ``False`` if it holds none of it (ask the layer
        below); ``None`` for anything else (the caller reads the ordinary
        way).  May raise :class:`WouldBlock`.
        """
        return None

    def locate(self, offset: int, length: int) -> tuple[int, int] | bool | None:
        """Where the range lives, if it is one contiguous piece of one file.

        ``(fd, file_offset)`` if so; ``False`` if none of it is held here
        (ask the layer below); ``None`` if it is anything else (partly held,
        zeros, not a file): the caller then reads it the ordinary way.
        """
        return None

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        """Cover ``[offset, offset + length)`` with ``(offset, length, state)``."""
        return [(offset, length, State.DATA)]

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        raise IOFailure(errno.EPERM, f"{self.kind} layer is read-only")

    async def awrite(self, offset: int, buffers: Sequence[Buffer], nbytes: int,
                     fua: bool) -> None:
        """``write`` for the event loop; by default in a worker thread."""
        await trio.to_thread.run_sync(self.write, offset, buffers, nbytes, fua)

    def write_batch(self, items: Sequence[tuple[int, Sequence[Buffer], int]]) -> None:
        """Several writes ``(offset, buffers, nbytes)`` in order; layers may merge them."""
        for offset, buffers, nbytes in items:
            self.write(offset, buffers, nbytes, False)

    def write_blocks(self, items: Sequence[tuple[int, Buffer]]) -> None:
        """Sector-aligned writes ``(offset, data)``, in order (the frontends' hot path).

        The device has checked them (aligned, in range, top writable).
        """
        self.write_batch([(offset, (data,), len(data)) for offset, data in items])

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool,
             fua: bool) -> None:
        raise IOFailure(errno.EPERM, f"{self.kind} layer is read-only")

    def flush(self) -> None:
        """Make every write acknowledged so far durable."""

    def flush_pending(self) -> bool:
        """False only when :meth:`flush` has certainly nothing to do: every write
        acknowledged so far is durable already (then a FLUSH is answered at once)."""
        return True

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (advisory)."""

    def make_readonly(self) -> None:
        """Stop accepting writes (the layer is being covered by a new top)."""
        self.flush()
        self.writable = False

    def close(self) -> None:
        """Flush (if writable) and release everything."""
