"""The ``lbd`` command line: one click group, one small adapter into trio."""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import click

from lbd import __version__
from lbd.config import (
    LayerSpec,
    default_data_dir,
    parse_address,
    parse_size,
)
from lbd.errors import ConfigError, LBDError

DEFAULT_NBD_PORT = 10809  # IANA's port for NBD
DEFAULT_MANAGE_HOST = "127.0.0.1"  # the management daemon: loopback unless told otherwise
DEFAULT_MANAGE_PORT = 6666  # the original's
DEFAULT_SIZE = 1 << 30

_LAYER_FLAGS = {
    "flat_ro": ("flat", False),
    "flat_rw": ("flat", True),
    "exp_ro": ("expandable", False),
    "exp_rw": ("expandable", True),
    "nbd_ro": ("nbd", False),
    "nbd_rw": ("nbd", True),
    "nbd_wb": ("nbd", True),
    "rbd_ro": ("rbd", False),
    "rbd_rw": ("rbd", True),
}
_WRITEBACK = {"nbd_wb"}


class _OrderedLayers(click.Command):
    """Keeps the command-line order of the layer flags (-f/-F/-e/-E/-n/-N/-X/-c/-C).

    Layers stack in the order given, the last on top; click collects each
    option's values separately, so the parser's record of the order in which
    options appeared is kept here.
    """

    def make_parser(self, ctx: click.Context) -> Any:
        parser = super().make_parser(ctx)
        parse = parser.parse_args

        def parse_args(args: list[str]) -> Any:
            opts, largs, order = parse(args)
            ctx.meta["lbd.order"] = [p.name for p in order]
            return opts, largs, order

        parser.parse_args = parse_args
        return parser


def _layer_specs(ctx: click.Context, params: dict[str, Any]) -> list[LayerSpec]:
    queues = {name: list(params.get(name) or ()) for name in _LAYER_FLAGS}
    specs = []
    for name in ctx.meta.get("lbd.order", []):
        if queues.get(name):
            kind, writable = _LAYER_FLAGS[name]
            specs.append(LayerSpec(kind, queues[name].pop(0), writable,
                                   writeback=name in _WRITEBACK))
    return specs


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="lbd: %(message)s"
                        if verbose < 2 else "lbd: %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lbd")
def main() -> None:
    """LBD, a Layered Block Device server.

    A device is a stack of layers (flat base images, expandable change files)
    over an implicit null layer that reads as zeros; reads come from the
    topmost layer holding each sector, writes go to the top layer.  It is
    served over NBD to the Linux kernel's nbd-client and every other NBD
    client.
    """


@main.command(cls=_OrderedLayers)
@click.option("-s", "--size", "size_text", metavar="SIZE",
              help="Device size in bytes; k/m/g/t suffixes (powers of two).")
@click.option("-b", "--blocks", type=int, metavar="N", help="Device size in 512-byte blocks.")
@click.option("-f", "flat_ro", multiple=True, metavar="FILE",
              help="Flat image or block device, read-only.")
@click.option("-F", "flat_rw", multiple=True, metavar="FILE",
              help="Flat image or block device, writable.")
@click.option("-e", "exp_ro", multiple=True, metavar="FILE",
              help="Expandable change file, read-only.")
@click.option("-E", "exp_rw", multiple=True, metavar="FILE",
              help="Expandable change file, writable (created if missing).")
@click.option("-n", "nbd_ro", multiple=True, metavar="HOST:PORT|URI",
              help="Remote NBD export as a layer, read-only (HOST:PORT, [IPv6]:PORT, "
                   "nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH).")
@click.option("-N", "nbd_rw", multiple=True, metavar="HOST:PORT|URI",
              help="Remote NBD export as a layer, writable (write-through).")
@click.option("-X", "nbd_wb", multiple=True, metavar="HOST:PORT|URI",
              help="Remote NBD export, writable, with a write-back cache (this server must "
                   "be its only writer).")
@click.option("--nbd-cache", "nbd_cache", metavar="SIZE", default=None,
              help="Memory cache per NBD layer: remote reads for -n (off unless given), "
                   "reads and writes for -X (default 64m).")
@click.option("--nbd-timeout", "nbd_timeout", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, metavar="SECONDS",
              help="An NBD layer request without a reply (the remote unreachable) this long "
                   "fails with EIO.")
@click.option("--nbd-keepalive", "nbd_keepalive", type=click.FloatRange(min=0), default=5.0,
              show_default=True, metavar="SECONDS",
              help="Probe an NBD layer's idle connection this often, so a remote that is "
                   "shutting down or gone is noticed at once (0: never).")
@click.option("-c", "rbd_ro", multiple=True, metavar="rbd:POOL/IMAGE[@SNAP]",
              help="Ceph RBD image or snapshot, read-only (docs/rbd.md).")
@click.option("-C", "rbd_rw", multiple=True, metavar="rbd:POOL/IMAGE",
              help="Ceph RBD image, writable.")
@click.option("--ceph-conf", metavar="FILE",
              help="ceph.conf for RBD layers (default: $CEPH_CONF, /etc/ceph/ceph.conf).")
@click.option("--ceph-id", metavar="USER",
              help="Ceph client id for RBD layers, without 'client.' (default: admin).")
@click.option("--ceph-keyring", metavar="FILE",
              help="Keyring for RBD layers (default: the one ceph.conf names).")
@click.option("--ceph-timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              metavar="SECONDS",
              help="Connecting to Ceph, and every RBD operation, fails after this long.")
@click.option("-l", "--listen", "listen", multiple=True, metavar="[HOST:]PORT",
              help=f"NBD TCP listener (default port {DEFAULT_NBD_PORT}; a bare port listens "
                   "on all addresses). Repeatable.")
@click.option("--unix", "unix_paths", multiple=True, metavar="PATH",
              help="NBD listener on a Unix socket. Repeatable.")
@click.option("-x", "--export-name", default="", show_default="\"\"",
              help="The export name clients ask for.")
@click.option("--description", default="", help="Export description shown to clients.")
@click.option("-r", "--readonly", is_flag=True, help="Serve read-only even if the top is "
              "writable.")
@click.option("--oldstyle", is_flag=True,
              help="Oldstyle handshake for very old clients (no export names, no options).")
@click.option("--force", is_flag=True,
              help="Open change files even if they were created on another base.")
@click.option("-a", "--manage", "manage", default=f"{DEFAULT_MANAGE_HOST}:{DEFAULT_MANAGE_PORT}",
              show_default=True, metavar="[HOST:]PORT|none",
              help="Management daemon address (lbd ctl, docs/management.md); a bare port is "
                   "on 127.0.0.1; 'none' turns it off.")
@click.option("--manage-token", metavar="FILE",
              help="Every management request must carry the secret in FILE.")
@click.option("--manage-timeout", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True, metavar="SECONDS",
              help="A management client that sends no complete request for this long is "
                   "disconnected.")
@click.option("--mount", "mount", metavar="MOUNTPOINT",
              help="Also show the device as one file through FUSE at MOUNTPOINT, an empty "
                   "directory or a regular file (docs/fuse.md).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: every request).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def serve(ctx: click.Context, size_text: str | None, blocks: int | None,
          listen: tuple[str, ...], unix_paths: tuple[str, ...], export_name: str,
          description: str, readonly: bool, oldstyle: bool, force: bool, manage: str,
          manage_token: str | None, manage_timeout: float, nbd_cache: str | None,
          nbd_timeout: float, nbd_keepalive: float, ceph_conf: str | None, ceph_id: str | None,
          ceph_keyring: str | None, ceph_timeout: float, verbose: int, quiet: bool,
          mount: str | None = None, **layer_flags: tuple[str, ...]) -> None:
    """Serve a layered device over NBD.

    Layers stack in command-line order, the last one on top; only the top
    may be writable:

    \b
      lbd serve -s 1G -f base.img -E changes.lbd
      lbd serve -b 2097152 -f base.img -e day1.lbd -E day2.lbd -l 10809
      lbd serve -s 20G -n golden.example:10809 -E local.lbd

    With no layer flags, serves a writable 1 GiB device backed by a change
    file in the data directory ($XDG_DATA_HOME/lbd), to try LBD at once.

    Stop it with Ctrl-C, SIGTERM or `lbd ctl shutdown`: it stops accepting,
    finishes the requests in flight, flushes and exits 0.  The management
    daemon (`lbd ctl`, on 127.0.0.1:6666 unless -a says otherwise) also shows
    the stack and adds layers while clients run.
    """
    _setup_logging(verbose, quiet)
    specs = _layer_specs(ctx, layer_flags)
    try:
        if size_text is not None and blocks is not None:
            raise ConfigError("-s and -b both give the size; use one")
        if size_text is not None:
            size = parse_size(size_text)
        elif blocks is not None:
            if blocks <= 0:
                raise ConfigError(f"-b: {blocks} is not a positive number of blocks")
            size = blocks * 512
        elif specs:
            raise ConfigError("the device size is required: -s SIZE or -b BLOCKS")
        else:
            size = DEFAULT_SIZE
        if any(s.kind == "nbd" for s in specs):
            cache = parse_size(nbd_cache, "--nbd-cache") if nbd_cache else 0
            specs = [replace(s, cache=cache, timeout=nbd_timeout,
                             keepalive=nbd_keepalive) if s.kind == "nbd" else s
                     for s in specs]
        if any(s.kind == "rbd" for s in specs):
            from lbd.layers.rbd import CephOptions

            ceph = CephOptions(ceph_conf, ceph_id, ceph_keyring, ceph_timeout)
            specs = [replace(s, ceph=ceph) if s.kind == "rbd" else s for s in specs]
        if not specs:
            data_dir = default_data_dir()
            os.makedirs(data_dir, exist_ok=True)
            specs = [LayerSpec("expandable", os.path.join(data_dir, "default.lbd"), True)]
            logging.getLogger("lbd").info(
                "no layers given: serving the default device, a writable %d MiB change file "
                "at %s", size >> 20, specs[0].param)
        tcp = [parse_address(a, "-l", None) for a in listen]
        if not tcp and not unix_paths and ctx.command.name != "mount":
            tcp = [(None, DEFAULT_NBD_PORT)]
        manage_addr = None if manage.strip().lower() in ("none", "off") else \
            parse_address(manage, "-a", DEFAULT_MANAGE_HOST)
        from lbd.serve import ServeOptions, run

        opts = ServeOptions(size=size, specs=specs, tcp=tcp, unix=list(unix_paths),
                            export_name=export_name, description=description,
                            readonly=readonly, oldstyle=oldstyle, force=force,
                            manage=manage_addr, manage_token=manage_token,
                            manage_timeout=manage_timeout, mount=mount)
        code = run(opts)
    except LBDError as exc:
        _die(exc)
    sys.exit(code)


def _die(exc: LBDError) -> None:
    click.echo(f"lbd: error: {exc}", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


# `lbd mount`: serve's options without the NBD ones, the management daemon
# off unless -a is given, and the mountpoint as an argument.
_NBD_ONLY = {"listen", "unix_paths", "description", "oldstyle", "mount"}


def _mount_params() -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for p in serve.params:
        if p.name in _NBD_ONLY:
            continue
        if p.name == "manage":
            p = copy.copy(p)
            p.default = "none"
            assert isinstance(p, click.Option)
            p.help = ("Management daemon address (lbd ctl, docs/management.md); a bare port "
                      "is on 127.0.0.1; off unless given.")
        elif p.name == "export_name":
            p = copy.copy(p)
            assert isinstance(p, click.Option)
            p.help = "The device file's name in a directory mountpoint (default: device)."
            p.show_default = False
        params.append(p)
    params.append(click.Argument(["mountpoint"]))
    return params


def _mount(mountpoint: str, **params: Any) -> None:
    """Show a layered device as one file through FUSE (no NBD server).

    MOUNTPOINT is an empty directory (the device appears in it as a file
    named after the export, or `device`) or an existing regular file (the
    device is mounted over it).  Layer flags as for `lbd serve`:

    \b
      lbd mount -s 1G -f base.img -E changes.lbd /mnt/lbd
      losetup -f --show /mnt/lbd/device

    Ctrl-C, SIGTERM, `fusermount3 -u MOUNTPOINT` or `lbd ctl shutdown` (with
    -a) stop it: requests in flight finish, the device is flushed and
    closed, then unmounted.  `lbd serve --mount` runs this beside the NBD
    server, on the same device.
    """
    assert serve.callback is not None
    serve.callback(listen=(), unix_paths=(), description="", oldstyle=False,
                   mount=mountpoint, **params)


main.add_command(_OrderedLayers("mount", callback=_mount, params=_mount_params(),
                                help=_mount.__doc__,
                                short_help="Show the device as one file through FUSE."))

from lbd.ctl import ctl  # noqa: E402  (the ctl group is its own module)

main.add_command(ctl)

# the offline tools (docs/tools.md), also installed as lbd-inspect, lbd-merge, lbd-compact
from lbd.tools.compact import main as _compact  # noqa: E402
from lbd.tools.inspect import main as _inspect  # noqa: E402
from lbd.tools.merge import main as _merge  # noqa: E402

main.add_command(_inspect, "inspect")
main.add_command(_merge, "merge")
main.add_command(_compact, "compact")
