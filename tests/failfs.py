"""A FUSE file system for the tests that fails on command.

    python tests/failfs.py BACKING_FILE MOUNTPOINT

shows ``BACKING_FILE`` as ``MOUNTPOINT/base.img`` (read and write, no page
cache: every read reaches this process) and a control file
``MOUNTPOINT/ctl``.  Lines written to ``ctl``:

    fail OFFSET LENGTH       reads of base.img that touch the range fail with EIO
    failwrite OFFSET LENGTH  writes of base.img that touch the range fail with EIO
    failwrites               every write to base.img fails with EIO
    ok                   no more failures

Reading ``ctl`` returns how many reads and writes failed so far.  The
device-mapper ``error`` target is not available on the test machines; this
stands in for a disk with bad sectors.  Unmount with ``fusermount3 -u``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
IMG = ROOT + 1
CTL = ROOT + 2
NAMES = {b"base.img": IMG, b"ctl": CTL}


class FailFS(pyfuse3.Operations):
    def __init__(self, backing: str) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDWR)
        self.fail: list[tuple[int, int]] = []
        self.fail_write: list[tuple[int, int]] = []
        self.fail_writes = False
        self.failed_reads = 0
        self.failed_writes = 0

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        if inode == ROOT:
            e.st_mode, e.st_size = stat.S_IFDIR | 0o755, 0
        elif inode == IMG:
            e.st_mode, e.st_size = stat.S_IFREG | 0o644, os.fstat(self.fd).st_size
        elif inode == CTL:
            e.st_mode, e.st_size = stat.S_IFREG | 0o644, 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_blksize = 4096
        e.st_blocks = (e.st_size + 511) // 512
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(NAMES[name])

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(NAMES.items())
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, name, await self.getattr(inode), i + 1):
                break

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode not in (IMG, CTL):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == CTL:
            text = f"failed_reads {self.failed_reads}\nfailed_writes {self.failed_writes}\n"
            return text.encode()[off:off + size]
        for start, length in self.fail:
            if off < start + length and off + size > start:
                self.failed_reads += 1
                raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh == CTL:
            for line in buf.decode().splitlines():
                words = line.split()
                if words[:1] == ["fail"]:
                    self.fail.append((int(words[1]), int(words[2])))
                elif words[:1] == ["failwrite"]:
                    self.fail_write.append((int(words[1]), int(words[2])))
                elif words == ["failwrites"]:
                    self.fail_writes = True
                elif words == ["ok"]:
                    self.fail, self.fail_write, self.fail_writes = [], [], False
                elif words:
                    raise pyfuse3.FUSEError(errno.EINVAL)
            return len(buf)
        if self.fail_writes or any(off < start + length and off + len(buf) > start
                                   for start, length in self.fail_write):
            self.failed_writes += 1
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pwrite(self.fd, buf, off)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == IMG and fields.update_size:
            os.ftruncate(self.fd, attr.st_size)
        return await self.getattr(inode)  # (a truncate of ctl, by open "w": nothing to do)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh == IMG:
            os.fsync(self.fd)


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    fs = FailFS(backing)
    options = set(pyfuse3.default_options)
    options.add("fsname=failfs")
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
