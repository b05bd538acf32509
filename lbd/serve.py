"""``lbd serve``: open the stack, run the frontends, stop gracefully.

Start-up order: open every layer (bottom-up), then the listeners; each
listener reports itself started before the next starts, so "listening on"
means a client can connect.  Shutdown (SIGINT, SIGTERM, or a manager's
SHUTDOWN) runs the other way: stop accepting, let requests in flight finish,
flush, close the layers, exit 0.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from lbd.config import LayerSpec, build_device, format_address
from lbd.device import Device
from lbd.errors import ConfigError
from lbd.frontends.manage import Manager, read_token_file
from lbd.frontends.nbd import NBDServer

if TYPE_CHECKING:
    from lbd.frontends.fuse import FuseFrontend

log = logging.getLogger("lbd")


@dataclass
class ServeOptions:
    size: int
    specs: list[LayerSpec]
    tcp: list[tuple[str | None, int]] = field(default_factory=list)
    unix: list[str] = field(default_factory=list)
    export_name: str = ""
    description: str = ""
    readonly: bool = False
    oldstyle: bool = False
    force: bool = False
    manage: tuple[str | None, int] | None = None  # management daemon address; None: off
    manage_token: str | None = None  # a file holding the management daemon's secret
    manage_timeout: float = 60.0  # seconds a management client may take per request
    mount: str | None = None  # FUSE mountpoint (docs/fuse.md); None: no FUSE frontend


class Service:
    """A running device and its frontends: what the manager talks to."""

    def __init__(self, opts: ServeOptions, device: Device, *, token: str | None = None
                 ) -> None:
        self.opts = opts
        self.device = device
        self.nbd = NBDServer(device, export_name=opts.export_name,
                             description=opts.description, readonly=opts.readonly,
                             oldstyle=opts.oldstyle)
        self.stop_requested = trio.Event()
        self.fuse: FuseFrontend | None = None
        if opts.mount is not None:
            from lbd.frontends.fuse import FuseFrontend

            self.fuse = FuseFrontend(device, opts.mount, export_name=opts.export_name,
                                     readonly=opts.readonly)
            self.fuse.may_spin = lambda: not self.nbd.connections  # never delay NBD clients
        self.manager: Manager | None = None
        if opts.manage is not None:
            self.manager = Manager(self, token=token, idle_timeout=opts.manage_timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            for host, port in self.opts.tcp:
                try:
                    bound = await nursery.start(self.nbd.serve_tcp, host, port)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {format_address(host, port)}: "
                                      f"{exc.strerror or exc}") from None
                log.info("listening on %s", format_address(host, bound))
            for path in self.opts.unix:
                try:
                    await nursery.start(self.nbd.serve_unix, path)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on unix socket {path}: "
                                      f"{exc.strerror or exc}") from None
                log.info("listening on unix socket %s", path)
            for uri in self.nbd.addresses:
                log.info("export %s", uri)
            for line in connect_hints(self.nbd.addresses, self.opts.export_name):
                log.info("%s", line)
            if self.fuse is not None:
                await nursery.start(self._fuse)
            if self.manager is not None and self.opts.manage is not None:
                host, port = self.opts.manage
                try:
                    await nursery.start(self.manager.serve_tcp, host, port)
                except OSError as exc:
                    raise ConfigError(f"cannot listen for management on "
                                      f"{format_address(host, port)}: "
                                      f"{exc.strerror or exc}") from None
            task_status.started()
            await self.stop_requested.wait()
            log.info("shutting down: finishing requests in flight")
            async with trio.open_nursery() as stopping:  # both frontends drain at once
                if self.fuse is not None:
                    stopping.start_soon(self.fuse.shutdown)
                stopping.start_soon(self.nbd.shutdown)
            nursery.cancel_scope.cancel()

    async def _fuse(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        assert self.fuse is not None
        try:
            await self.fuse.run(task_status=task_status)
        finally:
            if not self.opts.tcp and not self.opts.unix:  # FUSE was the only frontend
                self.stop_requested.set()

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            if _early_signals:  # arrived while the layers were being opened
                log.info("%s received during start-up", signal.Signals(_early_signals[0]).name)
                self.stop_requested.set()
            async for signum in signals:
                log.info("%s received", signal.Signals(signum).name)
                self.stop_requested.set()


def connect_hints(addresses: list[str], export: str) -> list[str]:
    """The client command lines for the first address, for the start-up log."""
    if not addresses:
        return []
    uri = addresses[0]
    hints = [f"try:  nbdinfo '{uri}'"]
    if uri.startswith("nbd://"):
        hostport = uri[len("nbd://"):].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        if host in ("0.0.0.0", "[::]"):
            host = "localhost"
        name = f" -N '{export}'" if export else ""
        hints.append(f"      nbd-client {host} {port} /dev/nbd0{name}   "
                     "(Linux kernel client; modprobe nbd first)")
    else:
        sock = uri.split("socket=", 1)[1]
        hints.append(f"      nbd-client -unix {sock} /dev/nbd0 -N '{export}'   "
                     "(Linux kernel client; modprobe nbd first)")
    return hints


def describe_stack(device: Device) -> str:
    lines = []
    for depth, layer in enumerate(device.layers):
        lines.append(f"  {len(device.layers) - 1 - depth}: {layer.kind:<10} "
                     f"{'rw' if layer.writable else 'ro'}  {layer.describe()}")
    return "\n".join(lines)


def _first_config_error(group: BaseExceptionGroup) -> ConfigError | None:
    for exc in group.exceptions:
        if isinstance(exc, ConfigError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_config_error(exc)
            if found:
                return found
    return None


_early_signals: list[int] = []


def _remember_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def run(opts: ServeOptions) -> int:
    # SIGINT/SIGTERM before the event loop listens for them must still end
    # in a clean stop, not in death by the default action.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _remember_signal)
    token = None
    if opts.manage is not None and opts.manage_token:
        token = read_token_file(opts.manage_token)  # before any file is opened
    if opts.mount is not None:
        from lbd.frontends.fuse import check_mountpoint

        check_mountpoint(opts.mount)  # before any file is opened
    device = build_device(opts.size, opts.specs, force=opts.force)
    log.info("device of %d bytes (%d blocks), layers top first:\n%s", opts.size,
             opts.size // 512, describe_stack(device))
    try:
        service = Service(opts, device, token=token)
    except BaseException:
        device.close()
        raise
    try:
        trio.run(service.run)
    except BaseExceptionGroup as group:
        raise _first_config_error(group) or group from None
    finally:
        try:
            device.close()
        finally:
            if service.fuse is not None:
                service.fuse.unmount()  # after the last flush: stop, drain, flush, close, unmount
    log.info("stopped cleanly")
    return 0
