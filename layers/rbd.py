"""The RBD layer: a Ceph RBD image or snapshot, through librbd (docs/rbd.md).

Named as Ceph names it, ``rbd:[POOL/[NAMESPACE/]]IMAGE[@SNAP]`` (the pool
defaults to ``rbd``, like the ``rbd`` command's).  A snapshot is always
read-only; an image without ``@SNAP`` can be the writable top layer.

The bindings (``rados``, ``rbd``) come from Debian's ``python3-rados`` and
``python3-rbd``; they are imported only when an RBD layer is opened, so LBD
without Ceph works and asking for an RBD layer without them says what to
install.

This layer may wait on the network, so it is not ``local``: a read asked
with ``nowait`` raises :class:`~lbd.errors.WouldBlock` and the frontend
repeats it (and every other call) in a worker thread.  librbd releases the
GIL in its calls, so reads in several threads are in flight at once; a large
read is split into object-sized pieces read with ``aio_read`` together, and a
batch of writes is sent with ``aio_write`` together.  Every operation is
bounded by ``timeout``: a cluster that does not answer gives EIO after it,
and the next request tries again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from lbd.errors import ConfigError, IOFailure, WouldBlock
from lbd.layer import ID_IMAGE, Buffer, Identity, Layer, State

log = logging.getLogger(__name__)

DEFAULT_POOL = "rbd"
DEFAULT_ID = "admin"
DEFAULT_TIMEOUT = 30.0
INTENT_KEY = "lbd.merge-intent"  # image metadata while an lbd-merge into it is unfinished
INSTALL_HINT = ("the RBD layer needs Ceph's Python bindings: install Debian's python3-rbd and "
                "python3-rados (apt-get install python3-rbd python3-rados, or run "
                "tools/setup.sh) and run LBD with Debian's /usr/bin/python3, or a venv made "
                "from it with --system-site-packages")
# a read this large or larger is split into pieces read in parallel
_SPLIT = 1 << 20
_MAX_PIECE = 4 << 20

_NAME = r"[^/@\s]+"
_SPEC = re.compile(rf"(?:(?P<pool>{_NAME})/(?:(?P<ns>{_NAME})/)?)?(?P<image>{_NAME})"
                   rf"(?:@(?P<snap>[^/@\s]+))?")


@dataclass(frozen=True)
class RBDTarget:
    """Where an RBD layer's data is: pool, namespace, image and snapshot."""

    pool: str
    image: str
    snap: str | None = None
    namespace: str = ""

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snap}" if self.snap is not None else ""
        return f"rbd:{self.pool}/{ns}{self.image}{snap}"


@dataclass(frozen=True)
class CephOptions:
    """How to reach the cluster; None means the ``rbd`` command's default."""

    conf: str | None = None  # ceph.conf; None: $CEPH_CONF, /etc/ceph/ceph.conf, ...
    client_id: str | None = None  # cephx user without "client."; None: admin
    keyring: str | None = None  # None: what ceph.conf says (/etc/ceph/ceph.client.ID.keyring)
    timeout: float = DEFAULT_TIMEOUT  # connect and every operation


def parse_target(text: str, flag: str = "-c") -> RBDTarget:
    """``rbd:[POOL/[NAMESPACE/]]IMAGE[@SNAP]`` (the ``rbd:`` prefix is optional)."""
    spec = text[4:] if text.startswith("rbd:") else text
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ConfigError(f"{flag} {text}: not an RBD image name; expected "
                          "rbd:POOL/IMAGE or rbd:POOL/IMAGE@SNAP (or POOL/NAMESPACE/IMAGE)")
    return RBDTarget(m.group("pool") or DEFAULT_POOL, m.group("image"), m.group("snap"),
                     m.group("ns") or "")


def import_bindings() -> tuple[Any, Any]:
    """``(rados, rbd)``, or a ConfigError that says what to install."""
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return rados, rbd


def connect(opts: CephOptions, what: str) -> Any:
    """A connected ``rados.Rados``; ConfigError with the reason if it cannot be."""
    rados, _ = import_bindings()
    user = opts.client_id or DEFAULT_ID
    try:
        cluster = rados.Rados(rados_id=user, conffile=opts.conf or "")
    except rados.ObjectNotFound:
        raise ConfigError(f"{what}: Ceph configuration {opts.conf or '(default)'}: no such "
                          "file" + ("" if opts.conf else " (give --ceph-conf)")) from None
    except rados.Error as exc:
        raise ConfigError(f"{what}: Ceph configuration {opts.conf or '(default)'}: {exc}") \
            from None
    try:
        t = f"{opts.timeout:g}"
        settings = {"client_mount_timeout": t, "rados_mon_op_timeout": t,
                    "rados_osd_op_timeout": t}
        if not logging.getLogger("lbd").isEnabledFor(logging.DEBUG):
            settings["err_to_stderr"] = "false"  # LBD says what went wrong itself
        if opts.keyring:
            settings["keyring"] = opts.keyring
        for key, value in settings.items():
            cluster.conf_set(key, value)
        mon_host = cluster.conf_get("mon_host") or ""
        if not mon_host.strip():
            raise ConfigError(f"{what}: no monitor address: the Ceph configuration "
                              f"{opts.conf or '(default)'} has no mon_host "
                              "(give --ceph-conf)")
        try:
            cluster.connect(timeout=max(1, round(opts.timeout)))
        except rados.TimedOut:
            raise ConfigError(f"{what}: the Ceph cluster (mon_host {mon_host}) did not answer "
                              f"within {opts.timeout:g} s") from None
        except rados.ObjectNotFound:
            raise ConfigError(f"{what}: no key for client.{user}: keyring "
                              f"{opts.keyring or cluster.conf_get('keyring')} not found "
                              "(give --ceph-keyring)") from None
        except rados.PermissionDeniedError:
            raise ConfigError(f"{what}: the Ceph cluster refused client.{user}: no key for it "
                              f"or the wrong key (keyring "
                              f"{opts.keyring or cluster.conf_get('keyring')})") from None
        except rados.Error as exc:
            raise ConfigError(f"{what}: cannot connect to the Ceph cluster (mon_host "
                              f"{mon_host}) as client.{user}: {exc}") from None
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


class RBDLayer(Layer):
    kind = "rbd"
    local = False

    def __init__(self, target: RBDTarget, size: int | None, writable: bool,
                 opts: CephOptions | None = None, flag: str = "-c",
                 half_merged_ok: bool = False) -> None:
        """``size`` None takes the image's (the offline tools); ``half_merged_ok``
        opens an image an interrupted lbd-merge left half-merged (to resume it)."""
        super().__init__(size or 0, writable)
        self.target = target
        self.opts = opts or CephOptions()
        self.flag = flag
        self._size_given = size is not None
        self._half_merged_ok = half_merged_ok
        rados, rbd = import_bindings()
        self._rados, self._rbd = rados, rbd
        what = f"{flag} {target}"
        if writable and target.snap is not None:
            raise ConfigError(f"{what}: a snapshot is read-only; only an image (named "
                              "without @SNAP) can be written")
        self.cluster = connect(self.opts, what)
        self.ioctx: Any = None
        self.image: Any = None
        self._opened_rw = writable  # stays True after make_readonly: flush still flushes
        try:
            self._open(what)
        except BaseException:
            self._release()
            raise
        self._identity = self._make_identity()

    def _open(self, what: str) -> None:
        rados, rbd = self._rados, self._rbd
        t = self.target
        user = self.opts.client_id or DEFAULT_ID
        try:
            self.ioctx = self.cluster.open_ioctx(t.pool)
        except rados.ObjectNotFound:
            raise ConfigError(f"{what}: the Ceph cluster has no pool {t.pool!r}") from None
        except rados.Error as exc:
            raise ConfigError(f"{what}: cannot open pool {t.pool!r}: {exc}") from None
        if t.namespace:
            try:
                exists = rbd.RBD().namespace_exists(self.ioctx, t.namespace)
            except rbd.Error as exc:
                raise ConfigError(f"{what}: cannot look up namespace {t.namespace!r}: {exc}") \
                    from None
            if not exists:
                raise ConfigError(f"{what}: pool {t.pool!r} has no namespace "
                                  f"{t.namespace!r}")
            self.ioctx.set_namespace(t.namespace)
        try:
            self.image = rbd.Image(self.ioctx, t.image, snapshot=t.snap,
                                   read_only=not self.writable)
        except rbd.ImageNotFound:
            raise ConfigError(self._not_found(what)) from None
        except rbd.PermissionError:
            mode = "write" if self.writable else "read"
            hint = (" (a read-only key? serve it read-only with -c, with a change file on "
                    "top)" if self.writable else "")
            raise ConfigError(f"{what}: permission denied: client.{user} may not {mode} "
                              f"image {t.image!r} in pool {t.pool!r}{hint}") from None
        except rbd.Timeout:
            raise ConfigError(f"{what}: opening the image timed out after "
                              f"{self.opts.timeout:g} s (is an OSD down?)") from None
        except rbd.Error as exc:
            raise ConfigError(f"{what}: cannot open the image: {exc}") from None
        try:
            actual = self.image.size()
            st = self.image.stat()
        except rbd.Error as exc:
            raise ConfigError(f"{what}: cannot read the image's size: {exc}") from None
        if not self._size_given:
            self.size = actual
        if actual != self.size:
            raise ConfigError(
                f"{what} is {actual} bytes but the device is {self.size} bytes; an RBD layer "
                "must be exactly the device size"
                + (f" (use -s {actual} or -b {actual // 512})" if actual % 512 == 0 else ""))
        self.object_size = int(st["obj_size"])
        self.image_id = self.image.id()
        self.snap_id = self.image.snap_get_id(t.snap) if t.snap is not None else None
        # a snapshot is never written: only the head can be half-merged
        rec = self.merge_intent() if t.snap is None else None
        if rec is not None and not self._half_merged_ok:
            raise ConfigError(
                f"{what}: an lbd-merge into it was interrupted and it is half-merged (image "
                f"metadata {INTENT_KEY}); finish it first by re-running: "
                f"{rec.get('command', 'lbd-merge with the same arguments')}")
        if self.writable:
            self._lock(what)

    def _not_found(self, what: str) -> str:
        """Which part of the name is missing: the image, or its snapshot."""
        t, rbd = self.target, self._rbd
        if t.snap is not None:
            try:
                with rbd.Image(self.ioctx, t.image, read_only=True) as img:
                    snaps = [s["name"] for s in img.list_snaps()]
            except rbd.Error:
                pass
            else:
                have = ", ".join(snaps[:10]) + (", ..." if len(snaps) > 10 else "")
                return (f"{what}: image {t.image!r} has no snapshot {t.snap!r} "
                        f"({'its snapshots: ' + have if snaps else 'it has no snapshots'})")
        ns = f" namespace {t.namespace!r} of" if t.namespace else ""
        return f"{what}: no image {t.image!r} in{ns} pool {t.pool!r}"

    def _lock(self, what: str) -> None:
        """The exclusive lock, held while serving: no second writer (like a flat file's)."""
        rbd = self._rbd
        if not self.image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
            log.warning("%s: the image has no exclusive-lock feature: nothing stops another "
                        "client from writing it at the same time", what)
            return
        try:
            self.image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except (rbd.ReadOnlyImage, rbd.ImageBusy, rbd.Timeout):
            owners = []
            try:
                owners = [o.get("owner", "?") for o in self.image.lock_get_owners()]
            except rbd.Error:
                pass
            raise ConfigError(f"{what}: the image is in use by another writer "
                              f"({', '.join(owners) or 'lock owner unknown'}); refusing to "
                              "write it too") from None
        except rbd.PermissionError:
            raise ConfigError(f"{what}: permission denied taking the image's exclusive lock "
                              f"(client.{self.opts.client_id or DEFAULT_ID}: a read-only "
                              "key?)") from None

    def _make_identity(self) -> Identity:
        return self.identity_for(self.snap_id, str(self.target))

    def identity_for(self, snap_id: int | None, desc: str = "") -> Identity:
        """What a change file on this image (``snap_id`` None: its head) or one of its
        snapshots records: the cluster, pool, image and snapshot ids, which stay the
        same across renames and restarts."""
        h = hashlib.sha256(b"rbd\0")
        h.update(self.cluster.get_fsid().encode() + b"\0")
        h.update(struct.pack("<q", self.ioctx.get_pool_id()))
        h.update(self.target.namespace.encode() + b"\0" + self.image_id.encode() + b"\0")
        h.update(struct.pack("<q", -1 if snap_id is None else snap_id))
        return Identity(ID_IMAGE, h.digest()[:16], desc[:64])

    # -- description -------------------------------------------------------------------

    def describe(self) -> str:
        return str(self.target)

    def identity(self) -> Identity:
        return self._identity

    def info(self) -> dict[str, Any]:
        d = super().info()
        t = self.target
        d["rbd"] = {"pool": t.pool, "namespace": t.namespace, "image": t.image,
                    "snapshot": t.snap, "image_id": self.image_id, "snap_id": self.snap_id,
                    "object_size": self.object_size, "client": self.opts.client_id or DEFAULT_ID,
                    "conf": self.opts.conf, "timeout": self.opts.timeout}
        return d

    # -- the intent record of an in-place lbd-merge (docs/tools.md) ------------------------

    def merge_intent(self) -> dict[str, Any] | None:
        """The record an unfinished lbd-merge into this image left, or None."""
        rbd = self._rbd
        try:
            raw = self.image.metadata_get(INTENT_KEY)
        except KeyError:
            return None
        except rbd.Error as exc:
            if isinstance(exc, rbd.ImageNotFound | rbd.ObjectNotFound):
                return None
            raise self._failure(exc, "reading the metadata of") from exc
        try:
            rec = json.loads(raw)
            return rec if isinstance(rec, dict) else {"damaged": True, "command": "?"}
        except ValueError:
            return {"damaged": True, "command": "?"}

    def set_merge_intent(self, record: dict[str, Any]) -> None:
        """Store the record in the image's metadata (one RADOS write: all or nothing)."""
        self._call("writing the metadata of", self.image.metadata_set, INTENT_KEY,
                   json.dumps(record))

    def clear_merge_intent(self) -> None:
        self._call("writing the metadata of", self.image.metadata_remove, INTENT_KEY)

    # -- errors ---------------------------------------------------------------------------

    def _failure(self, exc: BaseException, what: str) -> IOFailure:
        rbd = self._rbd
        if isinstance(exc, rbd.Timeout):
            msg = f"{what} {self.target}: no answer from the Ceph cluster within " \
                  f"{self.opts.timeout:g} s"
        else:
            msg = f"{what} {self.target}: {exc}"
        code = errno.EIO
        if isinstance(exc, (rbd.ReadOnlyImage, rbd.PermissionError)):
            code = errno.EPERM
        elif isinstance(exc, rbd.NoSpace | rbd.DiskQuotaExceeded):
            code = errno.ENOSPC
        log.error("%s", msg)
        return IOFailure(code, msg)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._rbd.Error as exc:
            raise self._failure(exc, what) from exc

    # -- reads ----------------------------------------------------------------------------

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        if nowait:
            raise WouldBlock()
        n = len(view)
        if n < _SPLIT:
            data = self._call("reading", self.image.read, offset, n)
            view[:len(data)] = data
        else:
            self._read_parallel(offset, view)
        self.reads += 1
        self.read_bytes += n
        return []

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        """A read cut into object-aligned pieces (one piece below _SPLIT)."""
        end = offset + length
        if length < _SPLIT:
            return [(offset, length)]
        piece = min(self.object_size, _MAX_PIECE)
        pieces = []
        pos = offset
        while pos < end:
            nxt = min((pos // piece + 1) * piece, end)
            pieces.append((pos, nxt - pos))
            pos = nxt
        return pieces

    async def aread_present(self, offset: int, view: memoryview) -> list[tuple[int, int]]:
        """The read from the event loop: librbd aio, woken through the trio token.

        No worker thread: the pieces are submitted here (librbd queues them
        and returns) and the completions, in librbd's threads, only copy the
        data into ``view`` and wake this task.
        """
        token = trio.lowlevel.current_trio_token()
        pieces = self._pieces(offset, len(view))
        done = trio.Event()
        left = [len(pieces)]
        errors: list[int] = []

        def one_done() -> None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

        def make_cb(pos: int) -> Callable[[Any, bytes | None], None]:
            def cb(comp: Any, data: bytes | None) -> None:  # in a librbd thread
                rv = comp.get_return_value()
                if rv < 0 or data is None:
                    errors.append(-rv if rv < 0 else errno.EIO)
                else:
                    view[pos - offset:pos - offset + len(data)] = data
                try:
                    token.run_sync_soon(one_done)
                except trio.RunFinishedError:  # the server stopped meanwhile
                    pass
            return cb

        sent = 0
        try:
            for pos, n in pieces:
                self.image.aio_read(pos, n, make_cb(pos))
                sent += 1
        except self._rbd.Error as exc:
            left[0] -= len(pieces) - sent
            if left[0] > 0:
                with trio.CancelScope(shield=True):  # the view must outlive them
                    await done.wait()
            raise self._failure(exc, "reading") from exc
        await done.wait()
        if errors:
            self._raise_read_error(errors[0], offset, len(view))
        self.reads += 1
        self.read_bytes += len(view)
        return []

    def _raise_read_error(self, code: int, offset: int, length: int) -> None:
        if code == errno.ETIMEDOUT:
            raise self._failure(self._rbd.Timeout("read timed out"), "reading")
        msg = (f"reading {self.target} [{offset}, {offset + length}): "
               f"{os.strerror(code)}")
        log.error("%s", msg)
        raise IOFailure(errno.EIO, msg)

    def _read_parallel(self, offset: int, view: memoryview) -> None:
        """Object-aligned pieces, all in flight at once with aio_read."""
        end = offset + len(view)
        pieces = self._pieces(offset, len(view))
        done = threading.Event()
        left = [len(pieces)]
        errors: list[int] = []
        lock = threading.Lock()

        def make_cb(pos: int, n: int) -> Callable[[Any, bytes | None], None]:
            def cb(comp: Any, data: bytes | None) -> None:
                rv = comp.get_return_value()
                if rv < 0 or data is None:
                    errors.append(-rv if rv < 0 else errno.EIO)
                else:
                    view[pos - offset:pos - offset + len(data)] = data
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            return cb

        comps = []
        try:
            for pos, n in pieces:
                comps.append(self.image.aio_read(pos, n, make_cb(pos, n)))
        except self._rbd.Error as exc:
            # wait for the ones already sent before the view goes away
            with lock:
                left[0] -= len(pieces) - len(comps)
                if left[0] == 0:
                    done.set()
            done.wait()
            raise self._failure(exc, "reading") from exc
        done.wait()
        if errors:
            self._raise_read_error(errors[0], offset, end - offset)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        """DATA where RADOS objects exist (whole-object granularity), ZERO elsewhere."""
        found: list[tuple[int, int]] = []

        def cb(o: int, n: int, exists: bool) -> int:
            if exists:
                found.append((o, n))
            return 0

        self._call("mapping", self.image.diff_iterate, offset, length, None, cb, True, True)
        found.sort()
        out: list[tuple[int, int, State]] = []
        pos, end = offset, offset + length
        for o, n in found:
            o0, o1 = max(o, pos), min(o + n, end)
            if o1 <= o0:
                continue
            if o0 > pos:
                out.append((pos, o0 - pos, State.ZERO))
            if out and out[-1][2] == State.DATA and out[-1][0] + out[-1][1] == o0:
                out[-1] = (out[-1][0], o1 - out[-1][0], State.DATA)
            else:
                out.append((o0, o1 - o0, State.DATA))
            pos = o1
        if pos < end:
            out.append((pos, end - pos, State.ZERO))
        return out

    # -- writes ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if not self.writable:
            raise IOFailure(errno.EPERM, f"RBD layer {self.target} is read-only")

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        self._check_writable()
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
        self._call("writing", self.image.write, data, offset)
        if fua:
            self._call("flushing", self.image.flush)
        self.writes += 1
        self.written_bytes += nbytes

    async def awrite(self, offset: int, buffers: Sequence[Buffer], nbytes: int,
                     fua: bool) -> None:
        """The write from the event loop: aio_write (and aio_flush for FUA), no thread."""
        self._check_writable()
        # referenced until the completion: librbd may write from it
        data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
        rv = await self._await_aio(lambda cb: self.image.aio_write(data, offset, cb), "writing")
        if rv < 0:
            self._raise_write_error(-rv)
        if fua:
            rv = await self._await_aio(self.image.aio_flush, "flushing")
            if rv < 0:
                self._raise_write_error(-rv, "flushing")
        self.writes += 1
        self.written_bytes += nbytes

    async def _await_aio(self, submit: Callable[[Callable[..., None]], Any], what: str) -> int:
        """Submit one librbd aio and sleep until its completion wakes this task."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result = [0]

        def cb(comp: Any, *_: Any) -> None:  # in a librbd thread
            result[0] = comp.get_return_value()
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        try:
            submit(cb)
        except self._rbd.Error as exc:
            raise self._failure(exc, what) from exc
        with trio.CancelScope(shield=True):  # the buffers must outlive the operation
            await done.wait()
        return result[0]

    def _raise_write_error(self, code: int, what: str = "writing") -> None:
        text = (f"no answer from the Ceph cluster within {self.opts.timeout:g} s"
                if code == errno.ETIMEDOUT else os.strerror(code))
        msg = f"{what} {self.target}: {text}"
        log.error("%s", msg)
        raise IOFailure(errno.ENOSPC if code in (errno.ENOSPC, errno.EDQUOT) else
                        errno.EPERM if code in (errno.EROFS, errno.EPERM) else errno.EIO, msg)

    def write_batch(self, items: Sequence[tuple[int, Sequence[Buffer], int]]) -> None:
        """Every write in flight at once (aio_write); raises if any failed."""
        self._check_writable()
        if len(items) == 1:
            offset, buffers, nbytes = items[0]
            self.write(offset, buffers, nbytes, False)
            return
        # Overlapping writes in one batch must land in order: librbd orders
        # in-flight writes to the same object, but be plain about it and fall
        # back to one at a time when two of them overlap.
        spans = sorted((o, o + n) for o, _, n in items)
        if any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)):
            for offset, buffers, nbytes in items:
                self.write(offset, buffers, nbytes, False)
            return
        done = threading.Event()
        left = [len(items)]
        errors: list[int] = []
        lock = threading.Lock()

        def cb(comp: Any) -> None:
            rv = comp.get_return_value()
            if rv < 0:
                errors.append(-rv)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        sent = 0
        keep = []  # librbd may write from our buffers (rbd_disable_zero_copy_writes=false)
        try:
            for offset, buffers, _n in items:
                data = bytes(buffers[0]) if len(buffers) == 1 else b"".join(buffers)
                keep.append(data)
                self.image.aio_write(data, offset, cb)
                sent += 1
        except self._rbd.Error as exc:
            with lock:
                left[0] -= len(items) - sent
                if left[0] == 0:
                    done.set()
            done.wait()
            raise self._failure(exc, "writing") from exc
        done.wait()
        if errors:
            code = errors[0]
            what = "no answer from the Ceph cluster within " \
                f"{self.opts.timeout:g} s" if code == errno.ETIMEDOUT else \
                errno.errorcode.get(code, str(code))
            msg = f"writing {self.target}: {what}"
            log.error("%s", msg)
            raise IOFailure(errno.ENOSPC if code in (errno.ENOSPC, errno.EDQUOT) else errno.EIO,
                            msg)
        self.writes += len(items)
        self.written_bytes += sum(n for _, _, n in items)

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool,
             fua: bool) -> None:
        self._check_writable()
        if trim:
            # advisory: librbd may keep partial objects (rbd_skip_partial_discard)
            self._call("discarding", self.image.discard, offset, length)
        else:
            # whole objects are discarded, partial ones zeroed: always reads as zeros
            self._call("zeroing", self.image.write_zeroes, offset, length)
        if fua:
            self._call("flushing", self.image.flush)

    def flush(self) -> None:
        if self.image is not None and self._opened_rw:
            self._call("flushing", self.image.flush)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        try:
            if self.image is not None:
                self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        for obj in (self.image, self.ioctx):
            if obj is not None:
                try:
                    obj.close()
                except Exception as exc:  # closing: report, go on
                    log.warning("closing %s: %s", self.target, exc)
        self.image = self.ioctx = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
