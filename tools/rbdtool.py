"""RBD images in the offline tools: a base (``-f rbd:POOL/IMAGE[@SNAP]``) or an output.

The tools work on :class:`~tools.common.Opened` files through a small part
of :class:`~lbd.layers.fileio.FileIO` (``readinto``, ``pwrite``,
``copy_from``, ``punch_hole``/``zero_range``, ``seek_data_holes``,
``fdatasync``).  :class:`RBDIO` offers the same calls on an RBD image,
through the server's own :class:`~lbd.layers.rbd.RBDLayer` (the same
connection code, errors and identity), so ``lbd-inspect`` maps a stack whose
base is in Ceph and ``lbd-merge`` commits change files into an RBD image or
writes a stack out to a new one.

An in-place merge into an RBD image keeps its intent record in the image's
metadata (``lbd.merge-intent``) instead of a file beside the target; the RBD
layer refuses to serve an image that has one.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from lbd.layers.rbd import CephOptions, RBDLayer, RBDTarget, connect, parse_target

from lbd.errors import ConfigError, IOFailure
from lbd.layer import State

from .common import Opened, ToolError

PREFIX = "rbd:"
COPY_PIECE = 4 << 20  # one write; several go out together
COPY_BATCH = 8  # pieces in flight at once


def is_rbd(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)  # type: ignore[union-attr]


class RBDIO:
    """The FileIO calls the tools use, on an RBD image."""

    fd = -1  # no page cache to drop (drop_cache ignores the error)

    def __init__(self, layer: RBDLayer) -> None:
        self.layer = layer
        self.writable = layer.writable

    def _io(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except IOFailure as exc:
            raise OSError(exc.errno if exc.errno != errno.EPERM else errno.EIO, str(exc)) \
                from None

    def readinto(self, view: memoryview, offset: int, *, nowait: bool = False) -> None:
        self._io(self.layer.read_present, offset, view, False)

    def pwrite(self, data: Any, offset: int) -> None:
        self._io(self.layer.write, offset, [data], len(data), False)

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        self._io(self.layer.write, offset, buffers, sum(len(b) for b in buffers), False)

    def copy_from(self, src: Any, src_offset: int, length: int, offset: int) -> None:
        """Read from a file (or image), write here: a few MiB at a time, several in flight."""
        pos = 0
        while pos < length:
            batch = []
            for _ in range(COPY_BATCH):
                if pos >= length:
                    break
                n = min(COPY_PIECE, length - pos)
                buf = bytearray(n)
                src.readinto(memoryview(buf), src_offset + pos)
                batch.append((offset + pos, [buf], n))
                pos += n
            self._io(self.layer.write_batch, batch)

    def punch_hole(self, offset: int, length: int) -> bool:
        # write_zeroes, not discard: discard may keep partial objects' old data
        self._io(self.layer.zero, offset, length, trim=False, no_hole=False, fast=False,
                 fua=False)
        return True

    def zero_range(self, offset: int, length: int) -> bool:
        return self.punch_hole(offset, length)

    def seek_data_holes(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        if end <= offset:
            return []
        return [(o, n, state == State.DATA)
                for o, n, state in self._io(self.layer.extents, offset, end - offset)]

    def fdatasync(self) -> None:
        self._io(self.layer.flush)

    def fsync(self) -> None:
        self.fdatasync()

    def close(self) -> None:
        self.layer.close()


def open_rbd(name: str, *, size: int | None, writable: bool, ceph: CephOptions | None,
             flag: str = "-f", half_merged_ok: bool = False) -> Opened:
    """An RBD image or snapshot as a tool's base; ToolError says what is wrong."""
    try:
        target = parse_target(name, flag)
        layer = RBDLayer(target, size, writable, ceph, flag, half_merged_ok=half_merged_ok)
    except ConfigError as exc:
        raise ToolError(str(exc)) from None
    f = Opened(str(target), "rbd", RBDIO(layer), layer.size,  # type: ignore[arg-type]
               _identity=layer.identity())
    try:
        f.aliases = snapshot_aliases(f)
    except BaseException:
        f.close()
        raise
    return f


def layer_of(f: Opened) -> RBDLayer:
    assert isinstance(f.io, RBDIO)
    return f.io.layer


def snapshot_aliases(f: Opened) -> list[Any]:
    """Identities a change file on this image's head may have recorded instead.

    A change file made on a snapshot (``-c rbd:img@v1 -E c.lbd``) may be
    committed into the image's head when the head has not changed since
    that snapshot: then both read the same.
    """
    layer = layer_of(f)
    if layer.target.snap is not None:
        return []
    rbd = layer._rbd
    out = []
    try:
        for snap in layer.image.list_snaps():
            changed: list[int] = []
            layer.image.diff_iterate(0, layer.size, snap["name"],
                                     lambda o, n, e, c=changed: c.append(o) or 0, True,
                                     True)
            if not changed:
                out.append(layer.identity_for(snap["id"]))
    except rbd.Error as exc:
        raise ToolError(f"{f.path}: listing its snapshots: {exc}") from None
    return out


# -- a new image ---------------------------------------------------------------------------


class NewImage:
    """``-o rbd:POOL/IMAGE[@SNAP]``: written as IMAGE.lbd-tmp, renamed when complete."""

    def __init__(self, name: str, size: int, ceph: CephOptions | None) -> None:
        try:
            self.target = parse_target(name, "-o")
        except ConfigError as exc:
            raise ToolError(str(exc)) from None
        from lbd.layers.rbd import import_bindings

        _, self.rbd = import_bindings()
        self.size = size
        self.ceph = ceph or CephOptions()
        self.tmp_name = self.target.image + ".lbd-tmp"
        try:
            self.cluster = connect(self.ceph, f"-o {self.target}")
        except ConfigError as exc:
            raise ToolError(str(exc)) from None
        self.ioctx: Any = None
        try:
            try:
                self.ioctx = self.cluster.open_ioctx(self.target.pool)
            except Exception as exc:
                raise ToolError(f"-o {self.target}: cannot open pool {self.target.pool!r}: "
                                f"{exc}") from None
            if self.target.namespace:
                self.ioctx.set_namespace(self.target.namespace)
            names = set(self.rbd.RBD().list(self.ioctx))
            if self.target.image in names:
                raise ToolError(f"{self.target}: the image exists; give a new name (nothing "
                                "is overwritten)")
            if self.tmp_name in names:  # what a killed earlier run left
                self.rbd.RBD().remove(self.ioctx, self.tmp_name)
            self.rbd.RBD().create(self.ioctx, self.tmp_name, size)
        except BaseException:
            self.close()
            raise

    def open(self) -> Opened:
        tmp = RBDTarget(self.target.pool, self.tmp_name, None, self.target.namespace)
        return open_rbd(str(tmp), size=self.size, writable=True, ceph=self.ceph, flag="-o")

    def finish(self) -> None:
        """Rename into place, then snapshot (protected) if the name has @SNAP."""
        rbd = self.rbd
        rbd.RBD().rename(self.ioctx, self.tmp_name, self.target.image)
        if self.target.snap is not None:
            with rbd.Image(self.ioctx, self.target.image) as img:
                img.create_snap(self.target.snap)
                img.protect_snap(self.target.snap)

    def discard(self) -> None:
        try:
            self.rbd.RBD().remove(self.ioctx, self.tmp_name)
        except self.rbd.Error:
            pass

    def close(self) -> None:
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
