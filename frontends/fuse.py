"""The FUSE frontend: the layered device as one regular file (pyfuse3 on trio).

The mountpoint is either an empty directory, in which the device appears as
one file (named after the export, or ``device``), or an existing regular
file, over which the device is mounted (as nbdfuse and qemu-storage-daemon
do).  Every FUSE request is translated into one call on the same
:class:`~lbd.device.Device` the NBD server drives, so both frontends see the
same bytes at the same time.

The file is opened with ``direct_io``: the kernel keeps no page cache for it,
so a write made through NBD is seen by the next read of the file, and every
read and write reaches the engine with its own offset and size.  Its size is
the device size and never changes: a truncate to another size fails with
EPERM, a same-size truncate (``dd`` without ``conv=notrunc`` and with
``seek=``) succeeds; reads at the end are short; a write that starts at the
end fails with ENOSPC, one that crosses it writes what fits and returns the
short count, as a block device does.  ``fsync`` is the engine's FLUSH.
pyfuse3 3.5 has no ``fallocate`` and no ``lseek``: punching holes (TRIM)
goes through NBD or ``lbd ctl trim`` (docs/fuse.md).

Resource handling: :meth:`FuseFrontend.mount` mounts (pyfuse3 keeps one
session per process); :meth:`FuseFrontend.run` serves requests until
:meth:`FuseFrontend.shutdown` (which stops reading new requests and waits for
those in flight) or an unmount from outside; :meth:`FuseFrontend.unmount`
unmounts and ends the session, and is safe to call more than once.

Error handling: engine errors (:class:`~lbd.errors.IOFailure`) become the
same errno for the caller; any other exception in a request is logged with
its traceback and answered EIO (pyfuse3 would otherwise end its main loop).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from lbd.device import Device
from lbd.errors import ConfigError, IOFailure, WouldBlock
from lbd.layer import State

try:
    import pyfuse3
except ImportError:  # an optional dependency: `pip install lbd[fuse]`
    pyfuse3 = None

log = logging.getLogger(__name__)

ROOT = 1  # pyfuse3.ROOT_INODE
FILE = 2  # the device file's inode when the mountpoint is a directory
DEFAULT_NAME = "device"
ATTR_TIMEOUT = 1.0  # seconds the kernel may cache attributes (st_blocks changes)
BLOCKS_TTL = 1.0  # seconds st_blocks is reused at least before the extents are counted again
BLOCKS_CHUNK = 64 << 20  # bytes of the device counted per block_status call
FSNAME = "lbd"  # mount source; the type is fuse.lbd


def fuse_errno(exc: BaseException) -> int:
    """The errno a FUSE caller gets for an engine exception (the one mapping)."""
    if isinstance(exc, IOFailure):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


# -- the mountpoint ---------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo (space, tab, newline, backslash are octal)."""
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(path: str) -> tuple[str, str] | None:
    """``(fstype, source)`` of the mount whose mountpoint is ``path``, or None."""
    want = {os.path.abspath(path)}
    parent, base = os.path.split(os.path.abspath(path))
    want.add(os.path.join(os.path.realpath(parent), base))
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or "-" not in fields[6:]:
                    continue
                sep = fields.index("-", 6)
                if _unescape(fields[4]) in want:
                    found = (fields[sep + 1], _unescape(fields[sep + 2]))  # the last one wins
    except OSError:
        return None
    return found


def unmount_hint(path: str) -> str:
    return f"fusermount3 -u {_quote(os.path.abspath(path))}"


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def check_mountpoint(path: str) -> bool:
    """Check that ``path`` can be mounted on; True for a directory, False for a file.

    Raises :class:`ConfigError` naming the problem: a mount left behind by a
    process that died (with the ``fusermount3 -u`` line to run), a live
    mount, a path that does not exist, a directory that is not empty, or
    something that is neither a directory nor a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(
                f"mountpoint {path}: a FUSE mount left behind by a process that stopped "
                f"without unmounting (transport endpoint is not connected); unmount it "
                f"with:  {unmount_hint(path)}") from None
        if exc.errno == errno.ENOENT:
            raise ConfigError(f"mountpoint {path} does not exist: create an empty directory "
                              "(the device appears inside it) or a file (the device is "
                              "mounted over it)") from None
        raise ConfigError(f"mountpoint {path}: {exc.strerror or exc}") from None
    mounted = find_mount(path)
    if mounted is not None:
        fstype, source = mounted
        raise ConfigError(f"mountpoint {path} is already a mount point ({fstype} from "
                          f"{source}); unmount it first:  {unmount_hint(path)}"
                          if fstype.startswith("fuse") else
                          f"mountpoint {path} is already a mount point ({fstype} from "
                          f"{source}); choose another one")
    if stat.S_ISDIR(st.st_mode):
        try:
            entries = os.listdir(path)
        except OSError as exc:
            raise ConfigError(f"mountpoint {path}: {exc.strerror or exc}") from None
        if entries:
            raise ConfigError(f"mountpoint {path} is a directory that is not empty "
                              f"({len(entries)} entries): the mount would hide them; use an "
                              "empty directory or a regular file")
        return True
    if stat.S_ISREG(st.st_mode):
        return False
    raise ConfigError(f"mountpoint {path} is neither a directory nor a regular file")


def file_name(export_name: str) -> str:
    """The device file's name inside a directory mountpoint."""
    name = export_name
    if not name:
        return DEFAULT_NAME
    if name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > 255:
        log.warning("FUSE: the export name %r cannot be a file name; the file is called %s",
                    name, DEFAULT_NAME)
        return DEFAULT_NAME
    return name


# -- the file system --------------------------------------------------------------------------


_Base: Any = pyfuse3.Operations if pyfuse3 is not None else object


class DeviceFS(_Base):  # type: ignore[misc]
    """pyfuse3 operations: a directory holding one file, or the file alone."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, device: Device, *, name: str | None, readonly: bool) -> None:
        super().__init__()
        self.device = device
        self.name = name.encode() if name is not None else None  # None: the root is the file
        self.file_ino = FILE if name is not None else ROOT
        self.readonly = readonly  # --readonly; a read-only device is read-only anyway
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started_ns = time.time_ns()
        self.mtime_ns = self.started_ns
        self._blocks = 0
        self._blocks_at = -1e9  # time.monotonic() of the last count
        self._blocks_ttl = BLOCKS_TTL
        self._counting = False
        self.spawn: Callable[..., Any] | None = None  # starts a background task
        self.opens = 0
        self._next_fh = 1
        self._sync_fhs: set[int] = set()  # opened with O_SYNC / O_DSYNC
        self.requests = {"read": 0, "write": 0, "fsync": 0}

    # -- attributes ---------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return not self.readonly and self.device.writable

    def count_blocks(self) -> int:
        """512-byte sectors the topmost layer holding them has as data (a worker thread).

        Counted in chunks, so a change file's lock is never held for long;
        with a fragmented change file this takes a while (~0.5 s for 100k
        extents), hence the cache and the background refresh.
        """
        t0 = time.monotonic()
        device = self.device
        total = 0
        pos = 0
        while pos < device.size:
            n = min(BLOCKS_CHUNK, device.size - pos)
            for m, state, depth in device.block_status(pos, n):
                if depth > 0 and state == State.DATA:
                    total += m
            pos += n
        self._blocks = total // 512
        done = time.monotonic()
        self._blocks_at = done
        self._blocks_ttl = max(BLOCKS_TTL, 20 * (done - t0))  # at most ~5% of a core
        return self._blocks

    async def _refresh_blocks(self) -> None:
        try:
            await trio.to_thread.run_sync(self.count_blocks)
        except Exception:
            log.exception("FUSE: counting the allocated blocks failed")
        finally:
            self._counting = False

    async def _file_attrs(self) -> Any:
        if time.monotonic() - self._blocks_at > self._blocks_ttl and not self._counting:
            # stale: answer with the last count, count again in the background
            self._counting = True
            if self.spawn is not None:
                self.spawn(self._refresh_blocks)
            else:
                await self._refresh_blocks()
        blocks = self._blocks
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.file_ino
        a.st_mode = stat.S_IFREG | (0o644 if self.writable else 0o444)
        a.st_nlink = 1
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_size = self.device.size
        a.st_blocks = blocks
        a.st_blksize = 4096
        a.st_atime_ns = self.mtime_ns
        a.st_mtime_ns = self.mtime_ns
        a.st_ctime_ns = self.mtime_ns
        a.attr_timeout = ATTR_TIMEOUT
        a.entry_timeout = ATTR_TIMEOUT
        return a

    def _dir_attrs(self) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_size = 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started_ns
        a.attr_timeout = ATTR_TIMEOUT
        a.entry_timeout = ATTR_TIMEOUT
        return a

    async def _attrs(self, inode: int) -> Any:
        if inode == self.file_ino:
            return await self._file_attrs()
        if inode == ROOT:
            return self._dir_attrs()
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return await _guard("getattr", self._attrs, inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != ROOT or self.name is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR if self.name is None else errno.ENOENT)
        if name == self.name:
            return await _guard("lookup", self._attrs, self.file_ino)
        if name in (b".", b".."):
            return self._dir_attrs()
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        if inode != self.file_ino:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != self.device.size:
            log.warning("FUSE: truncate to %d bytes refused: the device size is fixed at %d "
                        "bytes (dd needs conv=notrunc)", attr.st_size, self.device.size)
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mtime:
            self.mtime_ns = attr.st_mtime_ns
        return await _guard("setattr", self._attrs, inode)

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 512
        s.f_blocks = self.device.size // 512
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 2 if self.name is not None else 1
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- the directory ------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT or self.name is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0 and self.name is not None:
            attrs = await _guard("readdir", self._file_attrs)
            pyfuse3.readdir_reply(token, self.name, attrs, 1)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- the file -----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode != self.file_ino:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY and not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        if flags & (os.O_SYNC | os.O_DSYNC):
            self._sync_fhs.add(fh)  # the kernel leaves O_SYNC to us: FLUSH after each write
        # O_TRUNC is ignored, as a block device ignores it (the size is fixed).
        # direct_io: no page cache, so NBD writes show at once and every
        # request reaches the engine as it was made.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> Any:
        device = self.device
        self.requests["read"] += 1
        end = device.size
        if off >= end or size <= 0:
            return b""
        if off + size > end:
            size = end - off  # a short read at the end, as for a file
        try:
            return device.read_cached(off, size)  # the range was checked above
        except WouldBlock:
            pass
        except Exception as exc:
            raise _fail("read", exc, off, size) from None
        try:
            return await trio.to_thread.run_sync(device.read, off, size)
        except Exception as exc:
            raise _fail("read", exc, off, size) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        device = self.device
        self.requests["write"] += 1
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        end = device.size
        n = len(buf)
        if off >= end and n:
            # as for a block device: nothing is written past the end
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + n > end:
            buf = memoryview(buf)[:end - off]  # what fits; the caller sees the short count
            n = end - off
        try:
            if device.local:
                device.write(off, buf)
            else:
                await trio.to_thread.run_sync(device.write, off, buf)
            if self._sync_fhs and fh in self._sync_fhs:
                await device.aflush()
        except Exception as exc:
            raise _fail("write", exc, off, n) from None
        self.mtime_ns = time.time_ns()
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.requests["fsync"] += 1
        try:
            await self.device.aflush()
        except Exception as exc:
            raise _fail("fsync", exc, 0, 0) from None

    async def flush(self, fh: int) -> None:
        return None  # close(2): FLUSH is fsync's job, as for any file

    async def release(self, fh: int) -> None:
        self._sync_fhs.discard(fh)


def _fail(what: str, exc: Exception, off: int, size: int) -> Exception:
    """The FUSEError for a failed request; unexpected exceptions are logged in full."""
    code = fuse_errno(exc)
    if isinstance(exc, (IOFailure, OSError)):
        log.error("FUSE %s of %d bytes at %d failed: %s", what, size, off, exc)
    else:
        log.exception("FUSE %s of %d bytes at %d: internal error", what, size, off)
    return pyfuse3.FUSEError(code)


async def _guard(what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    try:
        return await fn(*args)
    except pyfuse3.FUSEError:
        raise
    except Exception as exc:
        raise _fail(what, exc, 0, 0) from None


# -- waiting for requests ---------------------------------------------------------------------
#
# pyfuse3's workers wait for the next request with trio's wait_readable on
# the /dev/fuse descriptor: a round trip through the event loop (epoll_ctl,
# epoll_wait) for every request.  A client at queue depth 1 sends its next
# request within microseconds of our reply, so a short look at the
# descriptor first (as the NBD server does for a lone connection) saves that
# round trip.  pyfuse3 looks ``_wait_fuse_readable`` up as a module global on
# every call, so it can be replaced; the replacement keeps its contract
# (True: a request is there; False: the main loop must end).

_WAIT_VERIFIED = {"3.5.0"}  # pyfuse3 versions whose main loop was read for this
SPIN = float(os.environ.get("LBD_FUSE_SPIN_US", "50")) * 1e-6  # seconds of polling
WAIT = 0.0002  # then seconds of sleeping in select before the event loop


class _Waiter:
    """The replacement for pyfuse3's ``_wait_fuse_readable``.

    Returns True only right after ``poll`` saw a request waiting: pyfuse3
    then reads it with no checkpoint in between, so no other task can take
    it first and the blocking read never blocks.  A worker that just
    answered a request takes the next one at once, without a trip through
    the scheduler; one that finds nothing spins briefly (when ``may_spin``:
    no other frontend has clients) and then waits in the event loop, one
    worker at a time (trio allows one waiter per descriptor).  Every
    ``FAIRNESS`` requests taken at once it yields, so a busy mount never
    starves the other tasks (NBD clients, signals).
    """

    FAIRNESS = 32

    def __init__(self, fd: int, may_spin: Callable[[], bool]) -> None:
        self.fd = fd
        self.may_spin = may_spin
        self.lock: trio.Lock | None = None
        self.closing = False
        self.streak = 0
        self._poll = select.poll()  # not select(): it fails for descriptors over 1023
        self._poll.register(fd, select.POLLIN)
        self.ready = lambda: bool(self._poll.poll(0))

    async def wait(self) -> bool:
        if self.closing:
            return False
        if self.streak < self.FAIRNESS and self.ready():
            self.streak += 1
            return True
        self.streak = 0
        if self.lock is None:
            self.lock = trio.Lock()
        async with self.lock:
            while True:
                if self.closing:
                    return False
                if self.ready():
                    return True
                if self.may_spin() and self._spin():
                    return True
                try:
                    await trio.lowlevel.wait_readable(self.fd)
                except trio.ClosedResourceError:
                    return False

    def _spin(self) -> bool:
        if SPIN > 0:
            deadline = time.perf_counter() + SPIN
            while time.perf_counter() < deadline:
                os.sched_yield()
                if self.ready():
                    return True
        if self.fd < 1024:  # select's limit; poll's timeout is in whole milliseconds
            return bool(select.select([self.fd], [], [], WAIT)[0])
        return False


def _fuse_fd() -> int | None:
    """The /dev/fuse descriptor of this process's (one) pyfuse3 session."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


# -- the mount --------------------------------------------------------------------------------


class FuseFrontend:
    """One FUSE mount of a device (pyfuse3 allows one per process)."""

    def __init__(self, device: Device, mountpoint: str, *, export_name: str = "",
                 readonly: bool = False) -> None:
        if pyfuse3 is None:
            raise ConfigError("the FUSE frontend needs pyfuse3: pip install 'lbd[fuse]' "
                              "(tools/setup.sh installs it)")
        self.device = device
        self.mountpoint = os.path.abspath(mountpoint)
        self.is_dir = check_mountpoint(mountpoint)
        self.name = file_name(export_name) if self.is_dir else None
        self.path = os.path.join(self.mountpoint, self.name) if self.name else self.mountpoint
        self.fs = DeviceFS(device, name=self.name, readonly=readonly)
        self.mounted = False
        self.stopping = False
        self.ended = trio.Event()  # the main loop returned (shutdown, or unmounted from outside)
        self.may_spin: Callable[[], bool] = lambda: True
        self._waiter: _Waiter | None = None

    def mount(self) -> None:
        # Checked again: the mountpoint may have changed since __init__.
        check_mountpoint(self.mountpoint)
        options = set(pyfuse3.default_options)
        options.add(f"fsname={FSNAME}")
        options.add("subtype=lbd")
        try:
            pyfuse3.init(self.fs, self.mountpoint, options)
        except RuntimeError as exc:
            raise ConfigError(f"cannot mount on {self.mountpoint}: {exc} (is /dev/fuse there, "
                              "and fusermount3 installed?)") from None
        self.mounted = True
        fd = _fuse_fd()
        if fd is not None and pyfuse3.__version__ in _WAIT_VERIFIED and \
                hasattr(pyfuse3, "_wait_fuse_readable"):
            self._waiter = _Waiter(fd, self.may_spin)
            pyfuse3._wait_fuse_readable = self._waiter.wait

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mount, report the device file's path, serve until shut down or unmounted."""
        await trio.to_thread.run_sync(self.fs.count_blocks)  # the first st_blocks
        self.mount()
        log.info("FUSE: device file at %s (%s, %d bytes)", self.path,
                 "read-write" if self.fs.writable else "read-only", self.device.size)
        task_status.started(self.path)
        try:
            async with trio.open_nursery() as nursery:
                self.fs.spawn = nursery.start_soon
                try:
                    await pyfuse3.main()
                finally:
                    self.fs.spawn = None
                    nursery.cancel_scope.cancel()
        finally:
            self.ended.set()
        if not self.stopping:
            log.warning("FUSE: %s was unmounted from outside", self.mountpoint)

    async def shutdown(self) -> None:
        """Stop reading new requests and wait for those in flight; then :meth:`unmount`."""
        self.stopping = True
        if self.mounted and not self.ended.is_set():
            if self._waiter is not None:
                self._waiter.closing = True
            pyfuse3.terminate()
            await self.ended.wait()

    def unmount(self) -> None:
        """Unmount (if still mounted) and end the pyfuse3 session; idempotent."""
        if not self.mounted:
            return
        self.mounted = False
        still = find_mount(self.mountpoint) is not None
        pyfuse3.close(unmount=still)
        if still and find_mount(self.mountpoint) is not None:
            log.error("FUSE: %s is still mounted; unmount it with:  %s", self.mountpoint,
                      unmount_hint(self.mountpoint))
        else:
            log.info("FUSE: unmounted %s", self.mountpoint)

    def info(self) -> dict[str, Any]:
        return {"type": "fuse", "mountpoint": self.mountpoint, "file": self.path,
                "readonly": not self.fs.writable, "opens": self.fs.opens,
                "requests": dict(self.fs.requests)}
