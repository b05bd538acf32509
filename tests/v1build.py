"""Version-1 change files (the original Java LBD's format), for the tests.

Written from the format description (docs/format.md, "Version 1") and
nothing else: this is deliberately not LBD's own v1 code, so the tests check
that code against the spec, not against itself.  It allocates the way the
original did: missing tables first, top-down, then the data block, all
appended at the end of the file; a block already present is overwritten in
place.
"""

from __future__ import annotations

import os
import struct

MAGIC = bytes.fromhex("4c42445801010101")
U64 = struct.Struct(">Q")


class V1Writer:
    def __init__(self, path: str) -> None:
        self.path = path
        # an existing file is extended, a missing one created
        self.f = open(path, "r+b" if os.path.exists(path) else "w+b")

    def _size(self) -> int:
        self.f.seek(0, 2)
        return self.f.tell()

    def _get(self, pos: int) -> int:
        self.f.seek(pos)
        return int(U64.unpack(self.f.read(8))[0])

    def _put(self, pos: int, value: int) -> None:
        self.f.seek(pos)
        self.f.write(U64.pack(value))

    def _append(self, data: bytes) -> int:
        end = self._size()
        self.f.seek(end)
        self.f.write(data)
        return end

    def write_block(self, block: int, data: bytes) -> None:
        assert len(data) == 512
        if self._size() == 0:
            self._append(bytes(504) + MAGIC)  # the root table, magic in entry 63
        table = 0
        for level in range(5):
            idx = (block >> ((5 - level) * 6)) & 0x3F
            child = self._get(table + idx * 8)
            if child == 0:
                child = self._append(bytes(512))
                self._put(table + idx * 8, child)
            table = child
        idx = block & 0x3F
        loc = self._get(table + idx * 8)
        if loc == 0:
            loc = self._append(data)
            self._put(table + idx * 8, loc)
        else:
            self.f.seek(loc)
            self.f.write(data)

    def write(self, offset: int, data: bytes) -> None:
        assert offset % 512 == 0 and len(data) % 512 == 0
        for i in range(len(data) // 512):
            self.write_block(offset // 512 + i, data[i * 512:(i + 1) * 512])

    def close(self) -> None:
        self.f.close()


def read_block(path: str, block: int) -> bytes | None:
    """A block's 512 bytes, or None when the file does not hold it."""
    with open(path, "rb") as f:
        if not f.read(1):
            return None
        table = 0
        for level in range(6):
            idx = (block >> ((5 - level) * 6)) & 0x3F
            f.seek(table + idx * 8)
            table = int(U64.unpack(f.read(8))[0])
            if table == 0:
                return None
        f.seek(table)
        return f.read(512)


def build(path: str, writes: list[tuple[int, bytes]]) -> None:
    w = V1Writer(path)
    for off, data in writes:
        w.write(off, data)
    w.close()
