"""The expandable layer: a change file holding only the sectors written to it.

The on-disk format is :mod:`lbd.layers.changefile` (spec: docs/format.md).
A change file is created when missing; an existing one is refused when it was
created on top of something other than the layer below it now (unless
``force``), because its sectors would then be mixed with the wrong base.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from lbd.errors import ConfigError, IOFailure
from lbd.extentmap import ZERO
from lbd.layer import ID_CHANGE, Buffer, Identity, Layer, State

from . import changefile
from .changefile import ChangeFile
from .changefile_v1 import V1ChangeFile
from .intent import refuse_if_unfinished

SECTOR = 512


class ExpandableLayer(Layer):
    kind = "expandable"

    def __init__(self, path: str, size: int, writable: bool, below: Identity, *,
                 force: bool = False, create: bool = True) -> None:
        super().__init__(size, writable)
        self.path = path
        self.created = False
        self.cf = self._open(path, size, writable, below, force, create)

    def _open(self, path: str, size: int, writable: bool, below: Identity, force: bool,
              create: bool) -> ChangeFile | V1ChangeFile:
        if os.path.isdir(path):
            raise ConfigError(f"change file {path}: is a directory")
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            # never unlink a device node or a FIFO below as an "empty file"
            raise ConfigError(f"change file {path}: not a regular file")
        parent_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            if not create:
                raise ConfigError(f"change file {path}: no such file")
            if not os.path.isdir(parent_dir):
                raise ConfigError(f"change file {path}: directory {parent_dir} does not exist")
            if os.path.exists(path):
                os.unlink(path)  # an empty file is an empty layer: make it a native one
            try:
                cf = ChangeFile.create(path, size, below)
            except PermissionError:
                raise ConfigError(f"change file {path}: permission denied creating it") from None
            except OSError as exc:
                raise ConfigError(f"change file {path}: cannot create: {exc.strerror}") from None
            self.created = True
            return cf
        refuse_if_unfinished(path, "change file")
        kind = changefile.detect(path)
        if kind == "unknown":
            raise ConfigError(f"{path} is not an LBD change file (unrecognised header); "
                              "refusing to use it")
        try:
            if kind == "v1":
                # the original's format: no size or parent recorded, nothing to check
                return V1ChangeFile.open(path, writable=writable, device_size=size)
            cf = ChangeFile.open(path, writable=writable)
        except PermissionError:
            mode = "read-write" if writable else "reading"
            raise ConfigError(f"change file {path}: permission denied (opening for {mode})") \
                from None
        try:
            h = cf.header
            if h.device_size != size:
                raise ConfigError(f"change file {path} belongs to a device of {h.device_size} "
                                  f"bytes, not {size}")
            if not h.parent.same(below) and not force:
                raise ConfigError(
                    f"change file {path} was created on top of {h.parent}, but the layer below "
                    f"it now is {below}; refusing to mix them (--force overrides)")
        except BaseException:
            cf.close(clean=False)
            raise
        return cf

    def describe(self) -> str:
        return self.path

    def identity(self) -> Identity:
        return Identity(ID_CHANGE, self.cf.header.uuid, os.path.basename(self.path))

    def info(self) -> dict:
        d = super().info()
        st = self.cf.stats()
        d["uuid"] = self.cf.header.uuid.hex()
        d["format"] = self.cf.version
        d["space"] = {"file_bytes": st.file_bytes, "live_bytes": st.live_bytes,
                      "dead_bytes": st.dead_bytes, "zero_bytes": st.zero_bytes,
                      "extents": st.extents,
                      "recycled_bytes": self.cf.recycled_bytes}
        return d

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        runs = self.cf.lookup(offset // SECTOR, len(view) // SECTOR)
        if len(runs) == 1:  # the common case: one run, absent or one piece of data
            loc = runs[0][2]
            if loc is None:
                return [(offset, len(view))]
            if loc >= 0:
                try:
                    self.cf.io.readinto(view, loc, nowait=nowait)
                except OSError as exc:
                    raise IOFailure.from_oserror(exc, f"reading {self.path}") from exc
                self.reads += 1
                self.read_bytes += len(view)
                return []
        absent: list[tuple[int, int]] = []
        read_io = self.cf.io
        for s, n, loc in runs:
            if loc is None:
                absent.append((s * SECTOR, n * SECTOR))
            elif loc != ZERO:
                pos = s * SECTOR - offset
                try:
                    read_io.readinto(view[pos:pos + n * SECTOR], loc, nowait=nowait)
                except OSError as exc:
                    raise IOFailure.from_oserror(exc, f"reading {self.path}") from exc
                self.read_bytes += n * SECTOR
        self.reads += 1
        return absent

    def absent(self, offset: int, length: int) -> bool:
        cf = self.cf
        m = cf.map
        if length == 4096 and not offset & 4095:  # as in read_fast: no lock
            if m.block(offset >> 12) is not None:
                return False
            if not m._chunks:
                return True
        with cf.lock:
            return m.single(offset >> 9, length >> 9) is None

    def read_fast(self, offset: int, length: int) -> bytearray | bool | None:
        cf = self.cf
        m = cf.map
        # A whole 4 KiB block: one probe of the map's block dict (a single
        # dict operation, atomic without the lock); where it is not there
        # and the map has no extent lists either, the block is absent.
        if length == 4096 and not offset & 4095:
            loc = m.block(offset >> 12)
            if loc is None:
                if not m._chunks:
                    return False
                with cf.lock:
                    loc = m.single(offset >> 9, 8)
        else:
            with cf.lock:
                loc = m.single(offset >> 9, length >> 9)
        if loc is None:
            return False
        if loc < 0:
            return bytearray(length) if loc == ZERO else None
        try:
            data = cf.io.read_nowait(length, loc)
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"reading {self.path}") from exc
        self.reads += 1
        self.read_bytes += length
        return data

    def locate(self, offset: int, length: int) -> tuple[int, int] | bool | None:
        runs = self.cf.lookup(offset // SECTOR, length // SECTOR)
        if len(runs) != 1:
            return None
        loc = runs[0][2]
        if loc is None:
            return False
        if loc == ZERO:
            return None
        self.reads += 1
        self.read_bytes += length
        return (self.cf.io.fd, loc)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        out = []
        for s, n, loc in self.cf.lookup(offset // SECTOR, length // SECTOR):
            state = State.ABSENT if loc is None else State.ZERO if loc == ZERO else State.DATA
            out.append((s * SECTOR, n * SECTOR, state))
        return out

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        self._check_writable()
        try:
            self.cf.write(offset // SECTOR, buffers, nbytes)
            if fua:
                self.cf.sync()
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"writing {self.path}") from exc
        self.writes += 1
        self.written_bytes += nbytes

    def write_batch(self, items: Sequence[tuple[int, Sequence[Buffer], int]]) -> None:
        self._check_writable()
        try:
            self.cf.write_batch([(off >> 9, bufs, n) for off, bufs, n in items])
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"writing {self.path}") from exc
        self.writes += len(items)
        for _, _, n in items:
            self.written_bytes += n

    def write_blocks(self, items: Sequence[tuple[int, Buffer]]) -> None:
        self._check_writable()
        try:
            self.written_bytes += self.cf.write_blocks(items)
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"writing {self.path}") from exc
        self.writes += len(items)

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool,
             fua: bool) -> None:
        # Trimmed and zeroed sectors are recorded as zero: they must not fall
        # through to the base again.  Their old data becomes dead space.
        self._check_writable()
        if trim and self.cf.version == 1:
            return  # v1 has no zero state; TRIM is advisory (docs/format.md)
        try:
            self.cf.zero(offset // SECTOR, length // SECTOR)
            if fua:
                self.cf.sync()
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"zeroing {self.path}") from exc

    def flush_pending(self) -> bool:
        # Not ``self.writable``: a layer just made read-only by a new top may
        # still hold writes acknowledged before the switch.  durable_seq moves
        # only after the fdatasync that made it so.
        cf = self.cf
        return cf.io.writable and cf.durable_seq != cf.seq

    def flush(self) -> None:
        if self.flush_pending():
            try:
                self.cf.sync()
            except OSError as exc:
                raise IOFailure.from_oserror(exc, f"flushing {self.path}") from exc

    def cache(self, offset: int, length: int) -> None:
        for _s, n, loc in self.cf.lookup(offset // SECTOR, length // SECTOR):
            if loc is not None and loc != ZERO:
                self.cf.io.advise_willneed(loc, n * SECTOR)

    def _check_writable(self) -> None:
        if not self.writable:
            raise IOFailure(errno.EPERM, f"change file {self.path} is read-only")

    def close(self) -> None:
        try:
            self.cf.close(clean=True)
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"closing {self.path}") from exc
