"""The management protocol, without I/O: requests and replies as bytes.

The protocol is specified in docs/management.md; in short, one request per
line and one reply per request::

    request = ["TOKEN" SP secret SP] command [SP argument] LF
    reply   = "OK" SP json LF
            | "TEXT" SP count LF count*(line LF)
            | "ERR" SP code SP message LF

An argument that starts with a double quote is a JSON string (so any path
can be sent); otherwise it is the rest of the line, as is.  The daemon
(:mod:`lbd.frontends.manage`) and the client (:mod:`lbd.ctl`) both use this
module; neither parses the wire format on its own.

Error handling: :class:`RequestError` means the peer sent a request we
reject (it carries the reply's error code); :class:`ReplyError` means a
reply could not be parsed (the client gives up on that connection);
:class:`LineTooLong` means a line exceeded the limit (the connection cannot
be resynchronised and is closed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 6666  # the original's management port
DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST_LINE = 16 * 1024  # a request line, LF included: room for any path
MAX_REPLY_LINE = 64 << 20  # what a client accepts (DEVICE_INFO with many clients)
MAX_TOKEN = 256

# error codes (the second word of an ERR reply)
BAD_REQUEST = "BAD_REQUEST"  # malformed request line or argument
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
AUTH = "AUTH"  # token missing or wrong (wrong: the connection is closed)
TOO_LONG = "TOO_LONG"  # request line over the limit (the connection is closed)
TIMEOUT = "TIMEOUT"  # no complete request in time (the connection is closed)
BUSY = "BUSY"  # too many management connections (the connection is closed)
BAD_LAYER = "BAD_LAYER"  # LIVE_ADD_LAYER refused; nothing was changed
SHUTTING_DOWN = "SHUTTING_DOWN"  # the device is stopping
IO = "IO"  # an I/O error on the device
READ_ONLY = "READ_ONLY"  # a request that writes, on a read-only device
INTERNAL = "INTERNAL"  # a bug in the daemon; see its log
ERROR_CODES = frozenset({BAD_REQUEST, UNKNOWN_COMMAND, AUTH, TOO_LONG, TIMEOUT, BUSY,
                         BAD_LAYER, SHUTTING_DOWN, IO, READ_ONLY, INTERNAL})


@dataclass(frozen=True)
class Command:
    name: str
    arg: str | None  # the argument's name, or None: takes no argument
    help: str


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("PING", None, "is the daemon alive? replies OK true"),
    Command("SHUTDOWN", None, "stop the device gracefully and exit 0 (replies first)"),
    Command("DEVICE_INFO_STRINGS", None, "the configuration, as text"),
    Command("DEVICE_INFO", None, "the configuration, statistics and clients, as JSON"),
    Command("LIVE_ADD_LAYER", "PATH",
            "commit the top layer (read-only) and push a new writable change file"),
    Command("CLIENTS", None, "the connected NBD clients, as JSON"),
    Command("FLUSH", None, "make every acknowledged write durable"),
    Command("TRIM", "OFFSET LENGTH",
            "discard a byte range (multiples of 512): it reads as zeros, durably"),
    Command("HELP", None, "this list, as text"),
]}

_COMMAND_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space


class RequestError(Exception):
    """A request the daemon rejects; ``code`` is one of the ERR codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ReplyError(Exception):
    """A reply that does not follow the protocol."""


class LineTooLong(Exception):
    """More than the limit without a line feed."""


# -- lines --------------------------------------------------------------------------------


class LineReader:
    """Splits a byte stream into lines (without their LF), with a length limit.

    ``feed`` data as it arrives; ``next_line`` returns a complete line or
    None when more data is needed, and raises :class:`LineTooLong` once more
    than ``limit`` bytes (LF included) arrived without a line feed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # no LF in _buf[:_scanned]

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a returned line."""
        return len(self._buf)

    def next_line(self) -> bytes | None:
        nl = self._buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(self._buf)
            if len(self._buf) >= self.limit:
                raise LineTooLong(f"no line feed in the first {self.limit} bytes")
            return None
        if nl + 1 > self.limit:
            raise LineTooLong(f"a line of {nl + 1} bytes; the limit is {self.limit}")
        line = bytes(self._buf[:nl])
        del self._buf[:nl + 1]
        self._scanned = 0
        return line


def _decode(raw: bytes) -> str:
    """Wire bytes -> text; bytes that are not UTF-8 survive (Linux paths are bytes)."""
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    command: str  # upper case
    arg: str | None = None
    token: str | None = None


def encode_arg(arg: str) -> str:
    """An argument as sent: as is when that is unambiguous, else a JSON string."""
    plain = (arg != "" and not arg.startswith('"') and arg == arg.strip()
             and all(c >= " " and c != "\x7f" for c in arg))
    if plain:
        return arg
    return json.dumps(arg, ensure_ascii=False)


def encode_request(command: str, arg: str | None = None, token: str | None = None) -> bytes:
    if not _COMMAND_RE.fullmatch(command):
        raise ValueError(f"not a command name: {command!r}")
    parts = []
    if token is not None:
        parts += ["TOKEN", check_token(token)]
    parts.append(command.upper())
    if arg is not None:
        parts.append(encode_arg(arg))
    return _encode(" ".join(parts)) + b"\n"


def parse_request(line: bytes) -> Request | None:
    """One request line (without its LF); None for a blank line (ignored)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\0" in line:
        raise RequestError(BAD_REQUEST, "NUL byte in the request")
    text = _decode(line)
    if not text.strip():
        return None
    token = None
    word, _, rest = text.partition(" ")
    if word.upper() == "TOKEN":
        token, _, rest = rest.partition(" ")
        if not token or not _TOKEN_RE.fullmatch(token):
            raise RequestError(BAD_REQUEST, "TOKEN needs a secret and a command after it")
        word, _, rest = rest.partition(" ")
    name = word.upper()
    if not _COMMAND_RE.fullmatch(word):
        raise RequestError(BAD_REQUEST, f"not a command: {_show(word)}")
    command = COMMANDS.get(name)
    if command is None:
        raise RequestError(UNKNOWN_COMMAND, f"unknown command {_show(word)} (try HELP)")
    arg: str | None = None
    if command.arg is None:
        if rest.strip():
            raise RequestError(BAD_REQUEST, f"{name} takes no argument")
    else:
        arg = decode_arg(rest)  # the rest of the line, as is: a path may hold spaces
        if not arg:
            raise RequestError(BAD_REQUEST, f"{name} needs an argument: {name} {command.arg}")
    return Request(name, arg, token)


def parse_range(arg: str, size: int) -> tuple[int, int]:
    """``OFFSET LENGTH`` (decimal bytes, multiples of 512, inside ``size``) for TRIM."""
    words = arg.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        raise RequestError(BAD_REQUEST, f"expected OFFSET LENGTH in bytes, not {_show(arg)}")
    offset, length = int(words[0]), int(words[1])
    if offset % 512 or length % 512:
        raise RequestError(BAD_REQUEST, f"OFFSET {offset} and LENGTH {length} must be "
                                        "multiples of 512")
    if length == 0:
        raise RequestError(BAD_REQUEST, "LENGTH must not be 0")
    if offset + length > size:
        raise RequestError(BAD_REQUEST, f"[{offset}, {offset + length}) is beyond the end of "
                                        f"the device ({size} bytes)")
    return offset, length


def decode_arg(raw: str) -> str:
    if not raw.startswith('"'):
        return raw
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise RequestError(BAD_REQUEST, f"an argument starting with a quote must be a JSON "
                                        f"string: {exc}") from None
    if not isinstance(value, str):
        raise RequestError(BAD_REQUEST, "an argument starting with a quote must be a JSON "
                                        "string")
    if "\0" in value:
        raise RequestError(BAD_REQUEST, "NUL character in the argument")
    return value


def _show(word: str, limit: int = 40) -> str:
    return repr(word if len(word) <= limit else word[:limit] + "...")


def check_token(token: str) -> str:
    """A shared secret: 1 to 256 printable ASCII characters, no spaces."""
    if not 0 < len(token) <= MAX_TOKEN or not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"a token is 1 to {MAX_TOKEN} printable ASCII characters without "
                         "spaces")
    return token


def token_from_file_text(text: str) -> str:
    """The secret in a token file: its content without surrounding white space."""
    return check_token(text.strip())


# -- replies ------------------------------------------------------------------------------


def ok(value: Any) -> bytes:
    """``OK <json>``: any JSON value, on one line, ASCII."""
    return b"OK " + json.dumps(value, separators=(",", ":"), sort_keys=False).encode() + b"\n"


def text(lines: list[str]) -> bytes:
    """``TEXT <n>`` and n lines; a line feed inside a line is replaced."""
    clean = [_one_line(s) for s in lines]
    return _encode("".join([f"TEXT {len(clean)}\n", *(s + "\n" for s in clean)]))


def error(code: str, message: str) -> bytes:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code}")
    return _encode(f"ERR {code} {_one_line(message) or code.lower()}\n")


def _one_line(s: str) -> str:
    return s.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


@dataclass
class Reply:
    kind: str  # "OK", "TEXT" or "ERR"
    value: Any = None  # OK: the JSON value
    lines: list[str] = field(default_factory=list)  # TEXT
    code: str = ""  # ERR
    message: str = ""  # ERR

    @property
    def ok(self) -> bool:
        return self.kind != "ERR"


class ReplyParser:
    """Replies out of a byte stream: ``feed``, then ``next_reply`` until None.

    After a :class:`ReplyError` the stream cannot be trusted; close it.
    """

    def __init__(self, limit: int = MAX_REPLY_LINE) -> None:
        self._lines = LineReader(limit)
        self._text: Reply | None = None  # a TEXT reply still collecting lines
        self._want = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._lines.feed(data)

    def next_reply(self) -> Reply | None:
        while True:
            try:
                raw = self._lines.next_line()
            except LineTooLong as exc:
                raise ReplyError(f"reply line too long: {exc}") from None
            if raw is None:
                return None
            line = _decode(raw)
            if self._text is not None:
                self._text.lines.append(line)
                if len(self._text.lines) < self._want:
                    continue
                done, self._text = self._text, None
                return done
            reply = parse_status(line)
            if reply.kind == "TEXT" and reply.value:
                self._text, self._want = reply, reply.value
                continue
            return reply


def parse_status(line: str) -> Reply:
    """The first line of a reply.  (A ``TEXT n`` reply then needs n more lines.)"""
    word, _, rest = line.partition(" ")
    if word == "OK":
        try:
            return Reply("OK", value=json.loads(rest))
        except ValueError as exc:
            raise ReplyError(f"OK reply with invalid JSON: {exc}") from None
    if word == "TEXT":
        if not (rest.isascii() and rest.isdigit()):  # not "²": int() refuses some digits
            raise ReplyError(f"TEXT reply without a line count: {line[:80]!r}")
        return Reply("TEXT", value=int(rest))
    if word == "ERR":
        code, _, message = rest.partition(" ")
        if not code:
            raise ReplyError("ERR reply without a code")
        return Reply("ERR", code=code, message=message)
    raise ReplyError(f"not a reply: {line[:80]!r}")
