"""``lbd ctl``: the management daemon's client (protocol: docs/management.md).

Exit codes: 0 done; 1 the daemon refused the request (an ERR reply); 2 a
usage problem (bad option, unreadable token file); 3 no connection (refused,
unreachable, timed out, closed before the reply); 4 a reply that does not
follow the protocol.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import click

from lbd import mgmtproto as M
from lbd.config import format_address, parse_address
from lbd.errors import ConfigError, LBDError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_PROTOCOL = 4
DEFAULT_TIMEOUT = 120.0


class CtlError(LBDError):
    """A failure of ``lbd ctl``, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ErrorReply(CtlError):
    def __init__(self, reply: M.Reply, what: str) -> None:
        super().__init__(f"{what}: {reply.message} ({reply.code})", EXIT_REFUSED)
        self.reply = reply


class Client:
    """One connection to a management daemon; requests are sent one at a time.

    Resource handling: use as a context manager, or call :meth:`close`.
    """

    def __init__(self, host: str, port: int, *, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = format_address(host, port)
        self.token = token
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            raise CtlError(f"cannot connect to {self.address}: connection refused (is lbd "
                           f"serve running with its management daemon at {self.address}?)",
                           EXIT_CONNECT) from None
        except TimeoutError:
            raise CtlError(f"cannot connect to {self.address}: timed out", EXIT_CONNECT) \
                from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {self.address}: {exc.strerror or exc}",
                           EXIT_CONNECT) from None
        self.parser = M.ReplyParser()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, command: str, arg: str | None = None) -> M.Reply:
        """Send one request and return its reply (OK, TEXT or ERR)."""
        data = M.encode_request(command, arg, self.token)
        try:
            self.sock.sendall(data)
            while True:
                reply = self.parser.next_reply()
                if reply is not None:
                    return reply
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise CtlError(f"{self.address} closed the connection without replying "
                                   f"to {command}", EXIT_CONNECT)
                self.parser.feed(chunk)
        except TimeoutError:
            raise CtlError(f"no reply from {self.address} to {command}: timed out",
                           EXIT_CONNECT) from None
        except M.ReplyError as exc:
            raise CtlError(f"{self.address} sent an invalid reply to {command}: {exc}",
                           EXIT_PROTOCOL) from None
        except OSError as exc:
            raise CtlError(f"connection to {self.address} lost: {exc.strerror or exc}",
                           EXIT_CONNECT) from None

    def call(self, command: str, arg: str | None = None, what: str | None = None) -> M.Reply:
        """:meth:`request`, raising :class:`ErrorReply` for an ERR reply."""
        reply = self.request(command, arg)
        if not reply.ok:
            raise ErrorReply(reply, what or command)
        return reply


# -- the command line -------------------------------------------------------------------------


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return M.token_from_file_text(f.read(M.MAX_TOKEN + 4096))
    except OSError as exc:
        raise ConfigError(f"--token {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token {path}: {exc}") from None


def _client(ctx: click.Context) -> Client:
    o = ctx.obj
    host, port = parse_address(o["address"], "-a", M.DEFAULT_HOST)
    return Client(host or M.DEFAULT_HOST, port, token=_token(o["token"]), timeout=o["timeout"])


def _run(ctx: click.Context, fn: Any) -> None:
    try:
        with _client(ctx) as client:
            fn(client)
    except LBDError as exc:
        click.echo(f"lbd ctl: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-a", "--address", default=f"{M.DEFAULT_HOST}:{M.DEFAULT_PORT}", show_default=True,
              envvar="LBD_MANAGE", metavar="[HOST:]PORT",
              help="The management daemon (lbd serve -a); a bare port is on 127.0.0.1. "
                   "Environment: LBD_MANAGE.")
@click.option("--token", type=click.Path(dir_okay=False), envvar="LBD_MANAGE_TOKEN",
              metavar="FILE", help="Send the secret in FILE (lbd serve --manage-token). "
                                   "Environment: LBD_MANAGE_TOKEN.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=DEFAULT_TIMEOUT,
              show_default=True, metavar="SECONDS", help="Give up after this long.")
@click.pass_context
def ctl(ctx: click.Context, address: str, token: str | None, timeout: float) -> None:
    """Talk to a running `lbd serve`: its management daemon.

    \b
    Exit codes: 0 done, 1 the daemon refused the request, 2 usage error,
    3 no connection (refused, timed out, closed), 4 invalid reply.
    """
    ctx.obj = {"address": address, "token": token, "timeout": timeout}


@ctl.command()
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that the daemon answers."""
    def go(c: Client) -> None:
        c.call("PING", what="ping")
        click.echo(f"{c.address}: alive")
    _run(ctx, go)


@ctl.command()
@click.option("--wait", is_flag=True, help="Wait until the server has stopped listening.")
@click.pass_context
def shutdown(ctx: click.Context, wait: bool) -> None:
    """Stop the device gracefully; the server exits 0.

    In-flight requests finish and everything is flushed first.
    """
    def go(c: Client) -> None:
        c.call("SHUTDOWN", what="shutdown")
        click.echo(f"{c.address}: shutting down")
        if wait:
            host, port = parse_address(ctx.obj["address"], "-a", M.DEFAULT_HOST)
            _wait_gone(host or M.DEFAULT_HOST, port, ctx.obj["timeout"], c.address)
            click.echo(f"{c.address}: stopped")
    _run(ctx, go)


def _wait_gone(host: str, port: int, timeout: float, address: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection((host, port), timeout=1)
        except OSError:
            return
        s.close()
        time.sleep(0.05)
    raise CtlError(f"{address} still accepts connections after {timeout:g} s", EXIT_CONNECT)


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="The machine-readable form (DEVICE_INFO).")
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Show the device: size, frontends, layers top first, statistics, clients.

    The last line is the `lbd serve` command line that reopens the current
    stack (it changes with add-layer).
    """
    def go(c: Client) -> None:
        if as_json:
            reply = c.call("DEVICE_INFO", what="info")
            click.echo(json.dumps(reply.value, indent=2))
        else:
            reply = c.call("DEVICE_INFO_STRINGS", what="info")
            for line in reply.lines:
                click.echo(line)
    _run(ctx, go)


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
@click.pass_context
def clients(ctx: click.Context, as_json: bool) -> None:
    """List the connected NBD clients."""
    def go(c: Client) -> None:
        reply = c.call("CLIENTS", what="clients")
        if as_json:
            click.echo(json.dumps(reply.value, indent=2))
            return
        for cl in reply.value:
            click.echo(f"conn {cl['id']} {cl['peer']}: export {cl['export']!r}, "
                       f"{'read-only' if cl['readonly'] else 'writable'}, "
                       f"{cl['requests']} requests")
    _run(ctx, go)


@ctl.command()
@click.pass_context
def flush(ctx: click.Context) -> None:
    """Make every acknowledged write durable."""
    def go(c: Client) -> None:
        c.call("FLUSH", what="flush")
        click.echo(f"{c.address}: flushed")
    _run(ctx, go)


@ctl.command("add-layer")
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
@click.pass_context
def add_layer(ctx: click.Context, file: str, as_json: bool) -> None:
    """Commit the top layer and put a new writable change file FILE on top.

    Clients keep running: writes acknowledged before the switch are in the
    old top (now read-only), later ones in FILE (created if missing).  FILE
    is sent as an absolute path, so it is relative to this directory.
    """
    def go(c: Client) -> None:
        reply = c.call("LIVE_ADD_LAYER", os.path.abspath(file), what="add-layer")
        r = reply.value
        if as_json:
            click.echo(json.dumps(r, indent=2))
        else:
            new, old = r["layer"], r["previous"]
            click.echo(f"layer {new['index']}: {new['param']} "
                       f"({'created' if new['created'] else 'existing file'}), writable top")
            click.echo(f"layer {old['index']}: {old['param']}, now read-only")
            click.echo(f"restart with: {r['command_line']}")
        if not r["flushed"]:
            raise CtlError(f"the layer was added, but flushing the old top failed: "
                           f"{r['flush_error']}", EXIT_REFUSED)
    _run(ctx, go)


def _bytes(text: str, what: str) -> int:
    """``4096``, ``1m``, ``2G``: a byte count (suffixes are powers of two), 0 allowed."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{text!r} is not a byte count (k/m/g/t suffixes)",
                                 param_hint=what)
    return int(m.group(1)) << (10 * " kmgtp".index(m.group(2).lower() or " "))


@ctl.command()
@click.argument("offset")
@click.argument("length")
@click.pass_context
def trim(ctx: click.Context, offset: str, length: str) -> None:
    """Discard LENGTH bytes at OFFSET: they read as zeros from then on.

    The top layer releases the space (a change file records the range as
    zeros; a writable flat image punches a hole).  Both must be multiples of
    512; k/m/g/t suffixes are powers of two.  This is how a device mounted
    with `lbd mount` is trimmed: FUSE (pyfuse3) has no fallocate.
    """
    off = _bytes(offset, "OFFSET")
    n = _bytes(length, "LENGTH")

    def go(c: Client) -> None:
        c.call("TRIM", f"{off} {n}", what="trim")
        click.echo(f"{c.address}: trimmed {n} bytes at {off}")
    _run(ctx, go)
