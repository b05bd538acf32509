"""What the offline tools share: opening files and stacks, ids, exit codes.

Every file is opened through the same code the server uses
(:class:`~lbd.layers.changefile.ChangeFile`,
:class:`~lbd.layers.changefile_v1.V1ChangeFile`,
:class:`~lbd.layers.fileio.FileIO`) and locked the same way, so a tool
never parses the format itself and never touches a file a running LBD
writes.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import click
from lbd.layers import changefile
from lbd.layers.changefile import ChangeFile
from lbd.layers.changefile_v1 import V1ChangeFile
from lbd.layers.fileio import FileIO
from lbd.layers.flat import fingerprint, image_size
from lbd.layers.intent import refuse_if_unfinished

from lbd.errors import ConfigError, CorruptionError, LBDError
from lbd.extentmap import ZERO, ExtentMap
from lbd.layer import ID_CHANGE, ID_IMAGE, ID_NONE, Identity

if TYPE_CHECKING:
    from lbd.layers.rbd import CephOptions

SECTOR = 512

# exit codes of every tool (docs/tools.md); --check follows qemu-img check
EXIT_OK = 0
EXIT_ERROR = 1  # usage, a file that cannot be opened or is refused, an I/O error
EXIT_CORRUPT = 2  # a change file failed a checksum or structure check
EXIT_LEAKS = 3  # --check: no corruption, but space that compaction would reclaim

AnyChangeFile = ChangeFile | V1ChangeFile


class ToolError(LBDError):
    """A failure the tools report in one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ToolCommand(click.Command):
    """A click command whose usage errors exit 1, since 2 and 3 mean findings."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise


def size_option(text: str | None) -> int | None:
    """``-s SIZE`` as the server parses it (imported late: lbd.config pulls in trio)."""
    if not text:
        return None
    from lbd.config import parse_size

    try:
        return parse_size(text, "-s")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def ceph_options(conf: str | None, client_id: str | None,
                 keyring: str | None) -> CephOptions | None:
    """--ceph-conf/--ceph-id/--ceph-keyring, for a base named rbd:... (docs/rbd.md)."""
    if not (conf or client_id or keyring):
        return None
    from lbd.layers.rbd import CephOptions

    return CephOptions(conf, client_id, keyring)


def ceph_click_options(fn: Any) -> Any:
    """The Ceph options of the tools, as ``lbd serve`` names them."""
    for opt in reversed([
        click.option("--ceph-conf", metavar="FILE", help="ceph.conf for an rbd:... base."),
        click.option("--ceph-id", metavar="USER", help="Ceph client id (default admin)."),
        click.option("--ceph-keyring", metavar="FILE", help="Keyring for the Ceph client."),
    ]):
        fn = opt(fn)
    return fn


def drop_cache(fd: int) -> None:
    """So a verify reads the disk, not what the tool just left in the page cache."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def die(prog: str, exc: BaseException) -> NoReturn:
    if isinstance(exc, CorruptionError):
        code = EXIT_CORRUPT
    elif isinstance(exc, ToolError):
        code = exc.exit_code
    else:
        code = EXIT_ERROR
    click.echo(f"{prog}: error: {exc}", err=True)
    sys.exit(code)


def human(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


@dataclass
class Opened:
    """One file a tool works on: a change file (native or v1) or a raw image."""

    path: str
    kind: str  # "native", "v1" or "raw"
    io: FileIO
    size: int | None  # device size (None: a v1 file alone does not say)
    cf: AnyChangeFile | None = None
    _identity: Identity | None = field(default=None, repr=False)
    # other ids that read the same (an RBD image's head: its unchanged snapshots)
    aliases: list[Identity] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def format(self) -> str:
        return {"native": "LBD change file, version 2",
                "v1": "original LBD change file, version 1",
                "raw": "raw image", "rbd": "Ceph RBD image"}[self.kind]

    def identity(self) -> Identity:
        """What a change file created on top of this one records as its parent."""
        if self._identity is None:
            if self.cf is not None:
                self._identity = Identity(ID_CHANGE, self.cf.header.uuid, self.name)
            else:
                assert self.size is not None
                self._identity = Identity(ID_IMAGE, fingerprint(self.io, self.size), self.name)
        return self._identity

    @property
    def parent(self) -> Identity | None:
        """The recorded parent; None when the format records none (v1, raw)."""
        return self.cf.header.parent if self.kind == "native" and self.cf is not None else None

    def close(self) -> None:
        if self.cf is not None:
            self.cf.close(clean=False)
        else:
            self.io.close()


def open_file(path: str, *, writable: bool = False, exclusive: bool = False,
              size: int | None = None, verify: bool = False, strict: bool = True,
              use_index: bool = True, raw_ok: bool = True,
              io_class: type[FileIO] = FileIO) -> Opened:
    """Open a change file (by its magic) or a raw image, locked.

    ``exclusive`` takes an exclusive lock even for reading (a file the tool
    will replace).  Raises :class:`ToolError` with a message naming the file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ToolError(f"{path}: no such file") from None
    except OSError as exc:
        raise ToolError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ToolError(f"{path}: is a directory")
    try:
        kind = changefile.detect(path) if stat.S_ISREG(st.st_mode) else "unknown"
        if kind == "native":
            cf: AnyChangeFile = ChangeFile.open(path, writable=writable, io_factory=io_class,
                                                verify=verify, use_index=use_index)
            if exclusive and not writable:
                cf.io.lock("change file", exclusive=True)
            if size is not None and cf.header.device_size != size:
                cf.close(clean=False)
                raise ToolError(f"{path} belongs to a device of {cf.header.device_size} bytes, "
                                f"not {size}")
            return Opened(path, "native", cf.io, cf.header.device_size, cf)
        if kind == "v1":
            cf = V1ChangeFile.open(path, writable=writable, device_size=size,
                                   io_factory=io_class, strict=strict)
            if exclusive and not writable:
                cf.io.lock("change file", exclusive=True)
            return Opened(path, "v1", cf.io, size, cf)
        if not raw_ok:
            raise ToolError(f"{path} is not an LBD change file (neither version 2 nor the "
                            "original's version 1)")
        io = io_class(path, writable=writable)
        try:
            io.lock("image", exclusive=exclusive or writable)
            actual = image_size(io)
            if size is not None and actual != size:
                raise ToolError(f"{path} is {actual} bytes but the device is {size} bytes")
        except BaseException:
            io.close()
            raise
        return Opened(path, "raw", io, actual)
    except PermissionError:
        raise ToolError(f"{path}: permission denied") from None
    except ConfigError as exc:
        raise ToolError(str(exc)) from None


@dataclass
class Stack:
    """A base (optional) and change files above it, bottom first."""

    base: Opened | None
    changes: list[Opened]
    size: int
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Opened]:
        return ([self.base] if self.base else []) + self.changes

    def check_chain(self, force: bool, *, skip_first: bool = False) -> None:
        """Refuse files that do not belong together (size, recorded parents).

        Each native change file records the id of the layer it was created on;
        it must be the one below it here.  v1 files record nothing: noted.
        ``skip_first`` does not check the lowest change file against the base
        (a resumed merge into that base has already changed it).
        """
        below: Opened | None = self.base
        for i, f in enumerate(self.changes):
            parent = f.parent
            if parent is None:
                self.notes.append(f"{f.path}: a version-1 file records no parent; "
                                  "not checked")
            elif not (skip_first and i == 0 and below is self.base):
                want = below.identity() if below is not None else Identity(ID_NONE)
                if not parent.same(want) and not any(
                        parent.same(a) for a in (below.aliases if below else [])):
                    msg = (f"{f.path} was created on top of {parent}, but below it here is "
                           f"{_describe(below, want)}; they do not belong together")
                    if not force:
                        raise ToolError(msg + " (--force overrides)")
                    self.notes.append(msg + "; --force given, going on")
            below = f

    def overlay(self) -> ExtentMap:
        return overlay_of(self.changes)

    def close(self) -> None:
        for f in reversed(self.files):
            f.close()


LAYER_SHIFT = 56


def overlay_of(files: list[Opened]) -> ExtentMap:
    """Change files' maps, bottom-up, in one map of encoded locations.

    A data location is ``(index + 1) << LAYER_SHIFT | file offset`` of the
    file at ``index`` in ``files``: contiguity arithmetic still works inside
    one file and never joins two files.
    """
    out = ExtentMap()
    for i, f in enumerate(files):
        assert f.cf is not None
        tag = (i + 1) << LAYER_SHIFT
        for s, n, loc in f.cf.map:
            out.set(s, n, loc if loc == ZERO else tag | loc)
    return out


def decode(loc: int) -> tuple[int, int]:
    """An overlay location -> (change file index, file offset)."""
    return (loc >> LAYER_SHIFT) - 1, loc & ((1 << LAYER_SHIFT) - 1)


def _describe(f: Opened | None, ident: Identity) -> str:
    return str(ident) if f is None else f"{f.path} ({ident})"


def open_stack(base: str | None, changes: list[str], *, size: int | None = None,
               writable: str | None = None, exclusive: bool = False,
               io_class: type[FileIO] = FileIO, half_merged_ok: str | bool = False,
               ceph: CephOptions | None = None) -> Stack:
    """Open a base and change files (bottom first); ``writable`` names one to write.

    The device size comes from ``size``, else the native change files'
    headers, else the base; every file must agree.  A half-merged file (an
    interrupted lbd-merge into it) is refused, except ``half_merged_ok``
    (the target a merge resumes; True: all, for lbd-inspect to report).
    A base named ``rbd:POOL/IMAGE[@SNAP]`` is an RBD image (tools/rbdtool.py).
    """
    if not changes and base is None:
        raise ToolError("nothing to work on: give change files (and -f BASE)")
    for p in ([base] if base and not base.startswith("rbd:") else []) + changes:
        if half_merged_ok is not True and p != half_merged_ok:
            try:
                refuse_if_unfinished(p, "file")
            except ConfigError as exc:
                raise ToolError(str(exc)) from None
    opened: list[Opened] = []
    try:
        if size is None:
            size = _size_hint(base, changes)
        b = None
        if base is not None and base.startswith("rbd:"):
            from .rbdtool import open_rbd

            b = open_rbd(base, size=size, writable=writable == base, ceph=ceph,
                         half_merged_ok=half_merged_ok in (True, base))
            opened.append(b)
            size = size or b.size
        elif base is not None:
            b = open_file(base, writable=writable == base, size=size, exclusive=exclusive,
                          io_class=io_class)
            opened.append(b)
            if b.kind != "raw":
                raise ToolError(f"-f {base}: a base must be a raw image, not a change file "
                                "(give it with -e)")
            size = size or b.size
        cs = []
        for p in changes:
            f = open_file(p, writable=writable == p, size=size, raw_ok=False,
                          exclusive=exclusive, io_class=io_class)
            opened.append(f)
            cs.append(f)
            if size is None:
                size = f.size
        if size is None:
            # v1 files alone: the highest block any of them holds
            size = max((f.size or 0) for f in cs) or SECTOR
            for f in cs:
                if f.cf is not None:
                    f.cf.device_size = size
        for f in cs:
            f.size = size
        return Stack(b, cs, size)
    except BaseException:
        for f in reversed(opened):
            f.close()
        raise


def _size_hint(base: str | None, changes: list[str]) -> int | None:
    """The device size a native change file records, before opening anything."""
    for p in changes:
        try:
            with open(p, "rb") as f:
                raw = f.read(1024)
        except OSError:
            continue
        for slot in (raw[:512], raw[512:1024]):
            h = changefile.Header.decode(slot)
            if h is not None:
                return h.device_size
    return None


def iter_runs(m: ExtentMap, size: int) -> Iterator[tuple[int, int, int | None]]:
    """``(sector, count, loc)`` covering the whole device, absent runs included."""
    pos = 0
    end = size // SECTOR
    for s, n, loc in m:
        if s >= end:
            break
        if s > pos:
            yield pos, s - pos, None
        n = min(n, end - s)
        yield s, n, loc
        pos = s + n
    if pos < end:
        yield pos, end - pos, None

