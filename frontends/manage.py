"""The management daemon: the line protocol of docs/management.md onto a Service.

It runs in the ``lbd serve`` process, on the same trio loop as the NBD
server, and translates requests into calls on the device and the service:
PING, SHUTDOWN, DEVICE_INFO_STRINGS / DEVICE_INFO, LIVE_ADD_LAYER, CLIENTS,
FLUSH, HELP.  The wire format itself lives in :mod:`lbd.mgmtproto`.

Resource handling: :meth:`Manager.serve_tcp` owns its listeners and one task
per connection; it runs until cancelled (the service cancels it after the
NBD server has drained).  Every connection is closed by its own task, which
also owns the only reference to its socket.

Error handling: a connection's problems stay in that connection.  A
malformed request gets an ERR reply and the connection goes on; a line over
:data:`~lbd.mgmtproto.MAX_REQUEST_LINE`, no complete request within the idle
timeout, a wrong token or too many connections get an ERR reply and the
connection is closed; a peer that vanishes is forgotten.  A bug in a handler
is logged with its traceback and answered ``ERR INTERNAL``; nothing a client
sends can stop the daemon or block it for another client.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from lbd import __version__
from lbd import mgmtproto as M
from lbd.config import LayerSpec, format_address
from lbd.errors import ConfigError, IOFailure, LBDError
from lbd.layer import Layer

if TYPE_CHECKING:
    from lbd.serve import ServeOptions, Service

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0  # seconds to send a complete request (after connecting or a reply)
SEND_TIMEOUT = 10.0  # seconds a reply may take to leave
LINGER = 1.0  # after a closing ERR, seconds spent discarding input so the reply arrives
MAX_CONNECTIONS = 64
RECV_SIZE = 64 * 1024
GiB = 1 << 30

_ids = itertools.count(1)


def read_token_file(path: str, what: str = "--manage-token") -> str:
    """The shared secret in a token file (its content, white space stripped)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read(M.MAX_TOKEN + 4096)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file") from None
    try:
        return M.token_from_file_text(content)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def rbd_argv(specs: list[LayerSpec]) -> list[str]:
    """The --ceph-* options of the RBD layers (shared by all of them)."""
    ceph = next((s.ceph for s in specs if s.kind == "rbd" and s.ceph is not None), None)
    if ceph is None:
        return []
    argv = []
    for opt, value in (("--ceph-conf", ceph.conf), ("--ceph-keyring", ceph.keyring)):
        if value:
            argv += [opt, os.path.abspath(value)]
    if ceph.client_id:
        argv += ["--ceph-id", ceph.client_id]
    if ceph.timeout != 30.0:
        argv += ["--ceph-timeout", f"{ceph.timeout:g}"]
    return argv


def serve_argv(opts: ServeOptions) -> list[str]:
    """The ``lbd serve`` command line that opens the stack ``opts`` describes now.

    Paths are made absolute (``lbd serve`` never changes directory, so they
    mean what they meant to it); the size is given in bytes.  Logging flags
    are not repeated.
    """
    mount_only = opts.mount is not None and not opts.tcp and not opts.unix  # `lbd mount`
    argv = ["lbd", "mount" if mount_only else "serve", "-s", str(opts.size)]
    for spec in opts.specs:
        argv += [spec.flag, spec.param if spec.kind in ("nbd", "rbd")
                 else os.path.abspath(spec.param)]
    nbd = next((s for s in opts.specs if s.kind == "nbd"), None)
    if nbd is not None:  # the NBD layer options, shared by every NBD layer
        if nbd.cache:
            argv += ["--nbd-cache", str(nbd.cache)]
        if nbd.timeout != 30.0:
            argv += ["--nbd-timeout", f"{nbd.timeout:g}"]
        if nbd.keepalive != 5.0:
            argv += ["--nbd-keepalive", f"{nbd.keepalive:g}"]
    argv += rbd_argv(opts.specs)
    for host, port in opts.tcp:
        argv += ["-l", str(port) if host is None else format_address(host, port)]
    for path in opts.unix:
        argv += ["--unix", os.path.abspath(path)]
    if opts.export_name:
        argv += ["-x", opts.export_name]
    if opts.description and not mount_only:
        argv += ["--description", opts.description]
    if opts.readonly:
        argv.append("--readonly")
    if opts.oldstyle and not mount_only:
        argv.append("--oldstyle")
    if opts.force:
        argv.append("--force")
    if opts.manage is None:
        argv += ["-a", "none"]
    else:
        argv += ["-a", format_address(opts.manage[0] or M.DEFAULT_HOST, opts.manage[1])]
        if opts.manage_token:
            argv += ["--manage-token", os.path.abspath(opts.manage_token)]
        if opts.manage_timeout != IDLE_TIMEOUT:
            argv += ["--manage-timeout", f"{opts.manage_timeout:g}"]
    if opts.mount is not None:
        mountpoint = os.path.abspath(opts.mount)
        argv += [mountpoint] if mount_only else ["--mount", mountpoint]
    return argv


class _Close(Exception):
    """Raised by a handler: send this reply, then close the connection."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


class Manager:
    """The management daemon of one :class:`~lbd.serve.Service`."""

    def __init__(self, service: Service, *, token: str | None = None,
                 idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.service = service
        self.token = token
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.addresses: list[str] = []  # host:port we listen on
        self.connections = 0
        self._add_lock = trio.Lock()
        self._handlers: dict[str, Callable[[M.Request], Any]] = {
            "PING": self._ping, "SHUTDOWN": self._shutdown,
            "DEVICE_INFO_STRINGS": self._info_strings, "DEVICE_INFO": self._info,
            "LIVE_ADD_LAYER": self._live_add_layer, "CLIENTS": self._clients,
            "FLUSH": self._flush, "TRIM": self._trim, "HELP": self._help,
        }
        assert set(self._handlers) == set(M.COMMANDS)

    # -- listening ---------------------------------------------------------------------

    async def serve_tcp(self, host: str | None, port: int, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port``; reports the (first) bound port, runs until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host or M.DEFAULT_HOST)
        exposed = []
        for lst in listeners:
            h, p = lst.socket.getsockname()[:2]
            addr = format_address(h, p)
            self.addresses.append(addr)
            log.info("management daemon listening at %s", addr)
            if not is_loopback(h):
                exposed.append(addr)
        if exposed:
            log.warning("the management daemon at %s is not on a loopback address: anyone who "
                        "can connect can stop the device and add layers%s", ", ".join(exposed),
                        "" if self.token else " (--manage-token FILE makes every request "
                        "carry a secret)")
        task_status.started(listeners[0].socket.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                for lst in listeners:
                    nursery.start_soon(self._accept_loop, lst, nursery)
        finally:
            for lst in listeners:
                lst.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("management: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection, stream)

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        cid = next(_ids)
        try:
            peer = format_address(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        busy = self.connections >= self.max_connections
        self.connections += 1
        try:
            if busy:
                log.warning("management conn %d (%s): refused, %d connections already open",
                            cid, peer, self.max_connections)
                await self._close_with(stream, M.error(
                    M.BUSY, f"too many management connections ({self.max_connections})"))
                return
            log.debug("management conn %d (%s): connected", cid, peer)
            await self._session(stream, cid, peer)
        except Exception:
            log.exception("management conn %d (%s): internal error; closing it", cid, peer)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)
            log.debug("management conn %d (%s): closed", cid, peer)

    async def _session(self, stream: trio.SocketStream, cid: int, peer: str) -> None:
        lines = M.LineReader(M.MAX_REQUEST_LINE)
        while True:
            line: bytes | None = None
            with trio.move_on_after(self.idle_timeout) as idle:
                try:
                    line = await self._next_line(stream, lines)
                except M.LineTooLong as exc:
                    log.warning("management conn %d (%s): %s; closing", cid, peer, exc)
                    await self._close_with(stream, M.error(
                        M.TOO_LONG, f"request line longer than {M.MAX_REQUEST_LINE} bytes; "
                                    "closing"))
                    return
            if idle.cancelled_caught:
                log.info("management conn %d (%s): no complete request in %g s; closing",
                         cid, peer, self.idle_timeout)
                await self._close_with(stream, M.error(
                    M.TIMEOUT, f"no complete request in {self.idle_timeout:g} s; closing"))
                return
            if line is None:
                return  # the peer closed (or reset) the connection
            try:
                reply, after = await self._request(line, cid, peer)
            except _Close as close:
                await self._close_with(stream, close.reply)
                return
            if not await self._send(stream, reply):
                log.info("management conn %d (%s): the reply could not be sent; closing",
                         cid, peer)
                return
            if after is not None:
                after()
                return

    async def _next_line(self, stream: trio.SocketStream, lines: M.LineReader) -> bytes | None:
        while True:
            line = lines.next_line()
            if line is not None:
                return line
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            lines.feed(data)

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await stream.send_all(data)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return False

    async def _close_with(self, stream: trio.SocketStream, reply: bytes) -> None:
        """Send a last reply, then read and drop input for a moment before closing.

        Closing a socket with unread input sends a reset, and a reset can
        destroy the reply before the peer reads it.
        """
        if not await self._send(stream, reply):
            return
        with trio.move_on_after(LINGER):
            try:
                await stream.send_eof()
                while await stream.receive_some(RECV_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _request(self, line: bytes, cid: int, peer: str
                       ) -> tuple[bytes, Callable[[], None] | None]:
        """The reply to one request line, and what to do once it is sent."""
        try:
            req = M.parse_request(line)
        except M.RequestError as exc:
            log.info("management conn %d (%s): %s: %s", cid, peer, exc.code, exc.message)
            return M.error(exc.code, exc.message), None
        if req is None:
            return b"", None  # a blank line: no reply
        if self.token is not None:
            if req.token is None:
                log.info("management conn %d (%s): %s without a token", cid, peer, req.command)
                return M.error(M.AUTH, "this daemon requires a token: TOKEN <secret> "
                                       f"{req.command}"), None
            if not _same_secret(req.token, self.token):
                log.warning("management conn %d (%s): wrong token; closing", cid, peer)
                raise _Close(M.error(M.AUTH, "wrong token; closing"))
        level = logging.INFO if req.command in ("SHUTDOWN", "LIVE_ADD_LAYER", "FLUSH", "TRIM") \
            else logging.DEBUG
        log.log(level, "management conn %d (%s): %s%s", cid, peer, req.command,
                f" {req.arg}" if req.arg is not None else "")
        try:
            result = await self._handlers[req.command](req)
        except M.RequestError as exc:
            log.info("management conn %d (%s): %s refused: %s", cid, peer, req.command,
                     exc.message)
            return M.error(exc.code, exc.message), None
        except IOFailure as exc:
            log.error("management conn %d (%s): %s failed: %s", cid, peer, req.command, exc)
            return M.error(M.IO, str(exc)), None
        except Exception as exc:
            log.exception("management conn %d (%s): %s failed", cid, peer, req.command)
            return M.error(M.INTERNAL, f"{type(exc).__name__}: {exc}"), None
        if req.command == "SHUTDOWN":
            return result, self._stop
        return result, None

    def _stop(self) -> None:
        if not self.service.stop_requested.is_set():
            log.info("SHUTDOWN requested by the management daemon")
            self.service.stop_requested.set()

    # -- the requests ---------------------------------------------------------------------

    async def _ping(self, req: M.Request) -> bytes:
        return M.ok(True)

    async def _shutdown(self, req: M.Request) -> bytes:
        return M.ok(True)  # the service is told once this reply has been sent

    async def _info(self, req: M.Request) -> bytes:
        return M.ok(self.device_info())

    async def _info_strings(self, req: M.Request) -> bytes:
        return M.text(self.info_lines())

    async def _clients(self, req: M.Request) -> bytes:
        return M.ok(self.service.nbd.clients())

    async def _flush(self, req: M.Request) -> bytes:
        await self.service.device.aflush()
        return M.ok(True)

    async def _trim(self, req: M.Request) -> bytes:
        """Discard a range: it reads as zeros and the top layer releases its space.

        For the FUSE frontend, which cannot punch holes (pyfuse3 has no
        fallocate).  Done with FUA, so it is durable when the reply is sent.
        """
        assert req.arg is not None
        device = self.service.device
        offset, length = M.parse_range(req.arg, device.size)
        if self.service.stop_requested.is_set():
            raise M.RequestError(M.SHUTTING_DOWN, "the device is shutting down")
        if not self._writable():
            raise M.RequestError(M.READ_ONLY, "the device is read-only"
                                 + (" (--readonly)" if device.writable else ""))

        def trim() -> None:
            # WRITE_ZEROES that may punch holes, not an advisory TRIM: the range
            # must read as zeros afterwards on any top layer
            device.zero(offset, length, trim=False, no_hole=False, fua=True)

        if device.local:
            trim()
        else:
            await trio.to_thread.run_sync(trim)
        return M.ok({"offset": offset, "length": length})

    async def _help(self, req: M.Request) -> bytes:
        lines = []
        for c in M.COMMANDS.values():
            usage = f"{c.name} {c.arg}" if c.arg else c.name
            lines.append(f"{usage:<22} {c.help}")
        if self.token is not None:
            lines.append("every request must start with: TOKEN <secret>")
        return M.text(lines)

    async def _live_add_layer(self, req: M.Request) -> bytes:
        assert req.arg is not None
        return M.ok(await self.add_layer(req.arg))

    # -- LIVE_ADD_LAYER ---------------------------------------------------------------------

    async def add_layer(self, path_arg: str) -> dict[str, Any]:
        """Commit the top layer and push a new writable change file at ``path_arg``.

        The new layer is opened (created if missing) and checked before
        anything changes; then, between two requests of the event loop, it
        becomes the top and the old top read-only, so a write acknowledged
        before the switch is in the old top and one after it in the new
        one; then the old top is flushed.  Relative paths are relative to
        the server's working directory (``lbd ctl`` sends absolute ones).
        """
        svc = self.service
        device = svc.device
        async with self._add_lock:
            if svc.stop_requested.is_set():
                raise M.RequestError(M.SHUTTING_DOWN, "the device is shutting down")
            path = os.path.abspath(path_arg)
            old = device.top
            opener = _opener(path, device.size, device.layers, old)
            try:
                if old.writable and old.kind != "expandable":
                    # A writable image's fingerprint changes with every write:
                    # take it and create the layer with no request in between.
                    new = opener()
                else:
                    new = await trio.to_thread.run_sync(opener)
            except (LBDError, OSError) as exc:
                raise M.RequestError(M.BAD_LAYER, _layer_error(path, exc)) from None
            pushed = False
            try:
                if svc.stop_requested.is_set():
                    raise M.RequestError(M.SHUTTING_DOWN, "the device is shutting down")
                if device.top is not old:  # cannot happen under the lock; be sure
                    raise M.RequestError(M.INTERNAL, "the stack changed during the request")
                device.push_layer(new)
                pushed = True
            finally:
                if not pushed:
                    new.close()
                    if new.created:
                        _unlink_quietly(path)
            specs = svc.opts.specs
            if specs:
                last = specs[-1]
                specs[-1] = replace(last, writable=False)
            specs.append(LayerSpec("expandable", path, True))
            depth = len(device.layers) - 1
            log.info("layer %d added: %s (%s), writable; layer %d %s is now read-only",
                     depth, path, "created" if new.created else "existing", depth - 1,
                     old.describe())
            flush_error = None
            try:
                await trio.to_thread.run_sync(old.flush)
            except (LBDError, OSError) as exc:
                flush_error = str(exc)
                log.error("flushing the old top %s failed: %s", old.describe(), exc)
            argv = serve_argv(svc.opts)
            return {"layer": {"index": depth, "created": new.created, **new.info()},
                    "previous": {"index": depth - 1, **old.info()},
                    "flushed": flush_error is None, "flush_error": flush_error,
                    "writable": self._writable(), "command": argv,
                    "command_line": shlex.join(argv)}

    def _writable(self) -> bool:
        return self.service.device.writable and not self.service.opts.readonly

    # -- DEVICE_INFO -------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        svc = self.service
        device = svc.device
        opts = svc.opts
        stack = device.layers
        argv = serve_argv(opts)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "state": "stopping" if svc.stop_requested.is_set() else "running",
            "size": device.size,
            "blocks": device.size // 512,
            "block_size": 512,
            "writable": self._writable(),
            "frontends": [{"type": "nbd", "server": "NBDServer", "export": opts.export_name,
                           "description": opts.description, "readonly": opts.readonly,
                           "oldstyle": opts.oldstyle, "addresses": list(svc.nbd.addresses)}]
            + ([svc.fuse.info()] if svc.fuse is not None else []),
            "management": {"addresses": list(self.addresses), "token": self.token is not None,
                           "idle_timeout": self.idle_timeout,
                           "connections": self.connections},
            "layers": [{"index": len(stack) - 1 - i, **layer.info()}
                       for i, layer in enumerate(stack)],
            "clients": svc.nbd.clients(),
            "command": argv,
            "command_line": shlex.join(argv),
        }

    def info_lines(self) -> list[str]:
        """The configuration as text, in the original's format, plus statistics."""
        info = self.device_info()
        size = info["size"]
        nbd = info["frontends"][0]
        lines = [f"device size: {info['blocks']} blocks ({size} bytes / {size / GiB:.6f} GB)",
                 f"server type: NBDServer ({', '.join(nbd['addresses']) or 'no listener'})"
                 + (", read-only export" if nbd["readonly"] else "")]
        for fe in info["frontends"][1:]:
            if fe["type"] == "fuse":
                lines.append(f"FUSE file: {fe['file']}"
                             + (", read-only" if fe["readonly"] else ""))
        ports = sorted({a.rsplit(":", 1)[1] for a in self.addresses})
        lines.append(f"management port: {', '.join(ports)} ({', '.join(self.addresses)})"
                     + (", token required" if self.token is not None else ""))
        lines.append("layers:")
        for layer in info["layers"]:
            lines.append(f"    {layer['index']}: type={layer['type']:>18}, "
                         f"writable={str(layer['writable']).lower():>5}, param={layer['param']}")
            if layer["type"] != "null":
                lines.append("       " + _layer_stats(layer))
        clients = info["clients"]
        lines.append(f"clients: {len(clients)}")
        for c in clients:
            lines.append(f"    conn {c['id']} {c['peer']}: export {c['export']!r}, "
                         f"{'read-only' if c['readonly'] else 'writable'}, "
                         f"{c['requests']} requests")
        lines.append(f"restart: {info['command_line']}")
        return lines


def _layer_stats(layer: dict[str, Any]) -> str:
    st = layer["stats"]
    text = (f"reads {st['reads']} ({st['read_bytes']} bytes), "
            f"writes {st['writes']} ({st['written_bytes']} bytes)")
    sp = layer.get("space")
    if sp:
        text += (f"; file {sp['file_bytes']} bytes: live {sp['live_bytes']}, "
                 f"dead {sp['dead_bytes']}, zero {sp['zero_bytes']}, {sp['extents']} extents")
    rm = layer.get("remote")
    if rm:
        text += (f"; remote {'connected' if rm['connected'] else 'DISCONNECTED'}, "
                 f"{rm['reconnects']} reconnects")
        if "cache" in rm:
            c = rm["cache"]
            text += f"; cache {c['hits']} hits, {c['misses']} misses, {c['dirty']} dirty bytes"
    rb = layer.get("rbd")
    if rb:
        snap = f", snap id {rb['snap_id']}" if rb["snap_id"] is not None else ""
        text += (f"; ceph client.{rb['client']}, image id {rb['image_id']}{snap}, "
                 f"{rb['object_size'] >> 10} KiB objects")
    return text


def _same_secret(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


def _opener(path: str, size: int, stack: list[Layer], below: Layer) -> Callable[[], Any]:
    """A function that checks ``path`` and opens the new top layer there."""
    from lbd.layers.expandable import ExpandableLayer

    def open_new() -> ExpandableLayer:
        for depth, layer in enumerate(stack):
            other = getattr(layer, "path", None)
            if other is not None and _same_file(path, other):
                raise ConfigError(f"{path} is already layer {len(stack) - 1 - depth} of this "
                                  "device")
        return ExpandableLayer(path, size, True, below.identity())

    return open_new


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _layer_error(path: str, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"change file {path}: permission denied"
        return f"change file {path}: {exc.strerror or exc}"
    return str(exc)


def _unlink_quietly(path: str) -> None:
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
