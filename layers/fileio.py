"""The one seam through which layers do file I/O.

Everything a change file or flat image reads, writes or syncs goes through a
:class:`FileIO`, so a test can wrap it (record writes and syncs, inject
ENOSPC or EIO, simulate a power cut) without touching the layer code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from collections.abc import Sequence

from lbd.errors import ConfigError, WouldBlock

Buffer = bytes | bytearray | memoryview

# Appended data goes to the kernel in pieces this small (small payloads
# grouped, a large one cut), because the page cache sizes its folios by the
# write that creates them: ext4 with large folios (Linux 6.16+) makes a later
# 4 KiB rewrite cost time in proportion to the folio it lands in, about
# 1.8 us in a 16 KiB folio against 4.5 us in a 128 KiB one.
SMALL_PIECE = 16384
LARGE_PIECE = 65536

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class FileIO:
    """A file opened for a layer: positional I/O, sync, hole punching, locks."""

    def __init__(self, path: str, *, writable: bool, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self.writable = writable
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        self.nowait = hasattr(os, "RWF_NOWAIT")
        self.can_punch = True

    kernel_copy = True  # copy_from may use copy_file_range

    # -- names (the offline tools replace files atomically) ------------------------

    @classmethod
    def replace(cls, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` and make the rename durable."""
        os.replace(src, dst)
        fsync_dir(dst)

    @classmethod
    def remove(cls, path: str) -> None:
        """Delete ``path`` (if it exists) and make that durable."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(path)

    # -- reads -------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def readinto(self, view: memoryview, offset: int, *, nowait: bool = False) -> None:
        """Fill ``view`` from ``offset``; past EOF reads as zeros.

        With ``nowait`` the read must be served from the page cache; if it
        cannot, :class:`WouldBlock` is raised and the caller retries in a
        worker thread.
        """
        want = len(view)
        if nowait and self.nowait:
            try:
                got = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                raise WouldBlock() from None
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.nowait = False  # e.g. tmpfs: reads never block there anyway
                got = os.preadv(self.fd, [view], offset)
            if got == want:
                return
            if got < want and offset + got < self.size():
                raise WouldBlock()
        else:
            got = os.preadv(self.fd, [view], offset)
        while got < want:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                view[got:] = bytes(want - got)
                return
            got += n

    def read_nowait(self, length: int, offset: int) -> bytearray:
        """``length`` bytes at ``offset`` from the page cache, else :class:`WouldBlock`."""
        buf = bytearray(length)
        if self.nowait:
            try:
                if os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT) == length:
                    return buf
            except BlockingIOError:
                raise WouldBlock() from None
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
        self.readinto(memoryview(buf), offset, nowait=True)  # the general case
        return buf

    # -- writes ------------------------------------------------------------

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        total = sum(map(len, buffers))
        done = os.pwritev(self.fd, buffers, offset)
        if done == total:
            return
        # a short write: finish it piece by piece (ENOSPC surfaces here)
        flat = memoryview(b"".join(buffers))
        while done < total:
            n = os.pwrite(self.fd, flat[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.pwritev([data], offset)

    def pwritev_pieces(self, buffers: Sequence[Buffer], offset: int) -> None:
        """:meth:`pwritev` in pieces that keep the page cache's folios small.

        Buffers of up to :data:`SMALL_PIECE` bytes go out grouped, at most
        that many bytes a call; a larger buffer goes out alone, cut every
        :data:`LARGE_PIECE` bytes.  For data that may be rewritten in place
        in small pieces later (the change file's payloads).
        """
        pwritev = self.pwritev
        group: list[Buffer] = []
        size = 0
        for data in buffers:
            n = len(data)
            if size + n > SMALL_PIECE and group:
                pwritev(group, offset)
                offset += size
                group = []
                size = 0
            if n <= SMALL_PIECE:
                group.append(data)
                size += n
                continue
            view = memoryview(data)
            for i in range(0, n, LARGE_PIECE):
                pwritev([view[i:i + LARGE_PIECE]], offset + i)
            offset += n
        if group:
            pwritev(group, offset)

    def pwrite_each(self, items: Sequence[tuple[Buffer, int]]) -> None:
        """``pwrite(data, offset)`` for each item, in order.

        One system call per item, without the Python layers of
        :meth:`pwrite` (the change file's in-place rewrites); a subclass
        that replaces :meth:`pwritev` (tests that record or fail writes)
        still sees every write.  An error stops it: the exception's
        ``items_written`` says how many items were written before it.
        """
        k = 0
        try:
            if type(self).pwritev is not FileIO.pwritev:
                for data, offset in items:
                    self.pwritev([data], offset)
                    k += 1
                return
            fd = self.fd
            pwrite = os.pwrite
            for data, offset in items:
                n = pwrite(fd, data, offset)
                if n != len(data):  # short: finish it (ENOSPC surfaces there)
                    self.pwritev([memoryview(data)[n:]], offset + n)
                k += 1
        except OSError as exc:
            exc.items_written = k  # type: ignore[attr-defined]
            raise

    def copy_from(self, src: FileIO, src_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes of ``src`` into this file (the offline tools).

        ``copy_file_range`` keeps the data in the kernel; where it is not
        available, or :attr:`kernel_copy` is off (a test that must see every
        write through :meth:`pwritev`), the data goes through a buffer.
        Bytes past the end of ``src`` copy as zeros.
        """
        done = 0
        if self.kernel_copy:
            while done < length:
                try:
                    n = os.copy_file_range(src.fd, self.fd, length - done, src_offset + done,
                                           offset + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                         errno.EOPNOTSUPP):
                        raise
                    break
                if n == 0:
                    break
                done += n
        buf = bytearray(min(length - done, 8 << 20))
        while done < length:
            n = min(len(buf), length - done)
            view = memoryview(buf)[:n]
            src.readinto(view, src_offset + done)
            self.pwritev([view], offset + done)
            done += n

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (reads back as zeros). False if unsupported."""
        return self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> bool:
        """Zero a range keeping it allocated. False if unsupported."""
        return self._fallocate(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        if _libc.fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))

    def advise_willneed(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def seek_data_holes(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """``(start, length, is_data)`` runs of ``[offset, end)`` via SEEK_DATA/HOLE."""
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to EOF
                    data = end
                else:
                    return [(offset, end - offset, True)]
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data, True))
            pos = hole
        return out

    # -- locking -----------------------------------------------------------

    def lock(self, what: str, *, exclusive: bool | None = None) -> None:
        """Take an exclusive (writable) or shared (read-only) lock, or refuse.

        ``exclusive`` overrides the mode: the offline tools take an exclusive
        lock on a file they read and then replace (compaction).
        """
        excl = self.writable if exclusive is None else exclusive
        mode = fcntl.LOCK_EX if excl else fcntl.LOCK_SH
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(self.fd)
            who = f"process {holder}{_command_of(holder)}" if holder else "another process"
            how = "has it open" if excl else "has it open for writing"
            raise ConfigError(f"{what} {self.path} is locked: {who} {how}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_holder(fd: int) -> int | None:
    """The PID holding a flock on the file behind ``fd``, from /proc/locks."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and dev in parts:
                    pid = int(parts[parts.index(dev) - 1])
                    if pid != os.getpid():
                        return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def _command_of(pid: int) -> str:
    """`` (lbd serve -f ...)``: the holder's command line, to say who it is."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    if not argv:
        return ""
    argv[0] = os.path.basename(argv[0])
    if len(argv) > 1 and argv[0].startswith("python") and argv[1].endswith("lbd"):
        argv = argv[1:]  # a console script run by its interpreter
        argv[0] = os.path.basename(argv[0])
    text = " ".join(argv)
    return f" ({text[:77] + '...' if len(text) > 80 else text})"


def fsync_dir(path: str) -> None:
    """Make a directory entry (a created or renamed file) durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
