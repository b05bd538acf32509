"""The flat layer: a raw image file or block device, sector n at byte n*512."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Sequence

from lbd.errors import ConfigError, IOFailure
from lbd.layer import ID_IMAGE, Buffer, Identity, Layer, State

from .fileio import FileIO
from .intent import refuse_if_unfinished

_BLKGETSIZE64 = 0x80081272
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


def image_size(io: FileIO) -> int:
    st = os.fstat(io.fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(io.fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("<Q", buf)[0])
    return st.st_size


def fingerprint(io: FileIO, size: int) -> bytes:
    """A content fingerprint of an image: its size and 16 samples of 64 KiB.

    Cheap enough to take at every start on a 1 TiB image; it tells a change
    file that the base under it is not the one it was created on.  (It cannot
    see a change between the samples; docs/format.md says so.)
    """
    h = hashlib.sha256(struct.pack("<Q", size))
    for i in range(_SAMPLES):
        off = (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1) if size > _SAMPLE_BYTES else 0
        off -= off % 512
        h.update(io.pread(_SAMPLE_BYTES, off))
    return h.digest()[:16]


class FlatLayer(Layer):
    kind = "flat"

    def __init__(self, path: str, size: int, writable: bool) -> None:
        super().__init__(size, writable)
        self.path = path
        refuse_if_unfinished(path, "flat image")
        try:
            self.io = FileIO(path, writable=writable)
        except FileNotFoundError:
            raise ConfigError(f"flat image {path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"flat image {path}: is a directory") from None
        except PermissionError:
            mode = "read-write" if writable else "reading"
            raise ConfigError(f"flat image {path}: permission denied (opening for {mode})") \
                from None
        try:
            if stat.S_ISDIR(os.fstat(self.io.fd).st_mode):  # O_RDONLY opens a directory
                raise ConfigError(f"flat image {path}: is a directory")
            actual = image_size(self.io)
            if actual != size:
                raise ConfigError(
                    f"flat image {path} is {actual} bytes but the device is {size} bytes; "
                    f"a flat layer must be exactly the device size (use -s {actual} or "
                    f"-b {actual // 512})" if actual % 512 == 0 else
                    f"flat image {path} is {actual} bytes but the device is {size} bytes; "
                    "a flat layer must be exactly the device size")
            # shared when read-only, exclusive when writable: nothing writes an
            # image that a running stack reads as its base
            self.io.lock("flat image")
        except BaseException:
            self.io.close()
            raise
        self._identity: Identity | None = None
        self._dirty = False  # written since the last flush

    def describe(self) -> str:
        return self.path

    def identity(self) -> Identity:
        # Not cached while writable: the content (and so the fingerprint) changes.
        if self._identity is None or self.writable:
            self._identity = Identity(ID_IMAGE, fingerprint(self.io, self.size),
                                      os.path.basename(self.path))
        return self._identity

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        try:
            self.io.readinto(view, offset, nowait=nowait)
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"reading {self.path}") from exc
        self.reads += 1
        self.read_bytes += len(view)
        return []

    def read_fast(self, offset: int, length: int) -> bytearray | bool | None:
        try:
            data = self.io.read_nowait(length, offset)
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"reading {self.path}") from exc
        self.reads += 1
        self.read_bytes += length
        return data

    def locate(self, offset: int, length: int) -> tuple[int, int] | bool | None:
        self.reads += 1
        self.read_bytes += length
        return (self.io.fd, offset)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        return [(s, n, State.DATA if data else State.ZERO)
                for s, n, data in self.io.seek_data_holes(offset, offset + length)]

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        try:
            try:
                self.io.pwritev(buffers, offset)
            finally:
                self._dirty = True  # after the write: a flush that saw it clean came first
            if fua:
                self.io.fdatasync()
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"writing {self.path}") from exc
        self.writes += 1
        self.written_bytes += nbytes

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool,
             fua: bool) -> None:
        try:
            if trim:
                self.io.punch_hole(offset, length)  # advisory: ignored if unsupported
            else:
                done = (self.io.zero_range(offset, length) if no_hole
                        else self.io.punch_hole(offset, length))
                if not done:
                    if fast:
                        raise IOFailure(errno.ENOTSUP, f"zeroing is not fast on {self.path}")
                    self._write_zeros(offset, length)
            self._dirty = True
            if fua:
                self.io.fdatasync()
        except OSError as exc:
            raise IOFailure.from_oserror(exc, f"zeroing {self.path}") from exc

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = memoryview(bytes(min(length, 1 << 20)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            self.io.pwrite(chunk[:n], pos)
            pos += n

    def flush_pending(self) -> bool:
        return self.io.writable  # an image opened read-only never has anything to sync

    def flush(self) -> None:
        # Not ``self.writable``: a layer just made read-only by a new top may
        # still hold writes acknowledged before the switch.
        if self.io.writable and self._dirty:
            self._dirty = False
            try:
                self.io.fdatasync()
            except OSError as exc:
                self._dirty = True
                raise IOFailure.from_oserror(exc, f"flushing {self.path}") from exc

    def cache(self, offset: int, length: int) -> None:
        self.io.advise_willneed(offset, length)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.io.close()
