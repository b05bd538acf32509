"""The NBD wire protocol, sans I/O (doc/proto.md of the NBD project).

Pure encoding and decoding: no sockets, no trio.  The server frontend drives
:class:`ServerHandshake` with bytes, unpacks requests with :data:`REQUEST`
and encodes replies with the ``*_reply`` / ``*_chunk`` functions.  The
constants and codecs are shared with NBD clients (the tests' raw-socket
clients today, the NBD-client layer later), so nothing here assumes a side.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# -- constants ---------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMDF_FUA = 1 << 0
CMDF_NO_HOLE = 1 << 1
CMDF_DF = 1 << 2
CMDF_REQ_ONE = 1 << 3
CMDF_FAST_ZERO = 1 << 4

# structured reply types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# block status flags (base:allocation)
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# NBD error numbers
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_DEPTH = "lbd:allocation-depth"
META_CONTEXTS = {CONTEXT_BASE_ALLOCATION: 1, CONTEXT_DEPTH: 2}

MAX_OPTION_LENGTH = 64 * 1024  # longer option payloads are refused
MAX_STRING = 4096  # NBD strings (names, descriptions) are at most 4096 bytes

_Q = struct.Struct(">Q")
_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_HEADER = struct.Struct(">IHHQI")
_OFFSET = struct.Struct(">Q")


# -- exports -------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    flags: int  # transmission flags, TF_HAS_FLAGS included
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


@dataclass
class Negotiated:
    """The outcome of a handshake: the export and what was agreed."""

    export: Export
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)  # id -> name
    no_zeroes: bool = False


# -- server handshake ------------------------------------------------------------

NEED_DATA = "need-data"
DONE = "done"
CLOSED = "closed"


class ServerHandshake:
    """The server side of the fixed-newstyle (or oldstyle) handshake.

    Use::

        hs = ServerHandshake(lookup, list_exports)
        send(hs.start())
        while hs.state == NEED_DATA:
            hs.receive_data(await recv())
            send(hs.step())
        # hs.state is DONE (hs.negotiated, hs.leftover) or CLOSED

    ``lookup(name)`` returns the :class:`Export` for a name or None.
    """

    def __init__(self, lookup: Callable[[str], Export | None],
                 list_exports: Callable[[], list[Export]], *, oldstyle: bool = False) -> None:
        self._lookup = lookup
        self._list = list_exports
        self.oldstyle = oldstyle
        self.state = NEED_DATA
        self.negotiated: Negotiated | None = None
        self.close_reason = ""
        self._buf = bytearray()
        self._have_flags = False
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[int, str] = {}
        self.leftover = b""

    def start(self) -> bytes:
        if self.oldstyle:
            export = self._lookup("")
            if export is None:
                self._close("no default export for an oldstyle client")
                return b""
            self.state = DONE
            self.negotiated = Negotiated(export)
            return (struct.pack(">QQQI", NBDMAGIC, OLDSTYLE_MAGIC, export.size,
                                export.flags & 0xFFFF) + bytes(124))
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def _close(self, why: str) -> None:
        self.state = CLOSED
        self.close_reason = why

    def step(self) -> bytes:
        """Handle every complete message received so far; return the replies."""
        out = bytearray()
        while self.state == NEED_DATA:
            if not self._have_flags:
                if len(self._buf) < 4:
                    break
                (cflags,) = struct.unpack_from(">I", self._buf)
                del self._buf[:4]
                if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
                    self._close(f"unknown client flags {cflags:#x}")
                    break
                self._have_flags = True
                self._no_zeroes = bool(cflags & FLAG_NO_ZEROES)
                continue
            if len(self._buf) < 16:
                break
            magic, opt, length = _OPT_HEADER.unpack_from(self._buf)
            if magic != IHAVEOPT:
                self._close("bad option magic")
                break
            if length > MAX_OPTION_LENGTH:
                # we cannot skip what we will not buffer: refuse and hang up
                # (EXPORT_NAME has no replies: the client expects none)
                if opt != OPT_EXPORT_NAME:
                    out += _opt_reply(opt, REP_ERR_TOO_BIG, b"option too long")
                self._close(f"option {opt} of {length} bytes is too long")
                break
            if len(self._buf) < 16 + length:
                break
            data = bytes(self._buf[16:16 + length])
            del self._buf[:16 + length]
            out += self._option(opt, data)
        if self.state != NEED_DATA:  # what follows belongs to the transmission phase
            self.leftover += bytes(self._buf)
            self._buf.clear()
        return bytes(out)

    def _option(self, opt: int, data: bytes) -> bytes:
        if opt == OPT_EXPORT_NAME:
            export = self._lookup(data.decode(errors="replace"))
            if export is None:
                self._close(f"unknown export {data[:64]!r}")
                return b""
            self._finish(export)
            return (struct.pack(">QH", export.size, export.flags & 0xFFFF)
                    + (b"" if self._no_zeroes else bytes(124)))
        if opt == OPT_ABORT:
            self._close("client aborted")
            return _opt_reply(opt, REP_ACK)
        if opt == OPT_LIST:
            if data:
                return _opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")
            out = bytearray()
            for e in self._list():
                name = e.name.encode()
                out += _opt_reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name
                                  + e.description.encode())
            return bytes(out + _opt_reply(opt, REP_ACK))
        if opt in (OPT_INFO, OPT_GO):
            return self._info_go(opt, data)
        if opt == OPT_STRUCTURED_REPLY:
            if data:
                return _opt_reply(opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
            self._structured = True
            return _opt_reply(opt, REP_ACK)
        if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._meta_context(opt, data)
        if opt == OPT_STARTTLS:
            return _opt_reply(opt, REP_ERR_UNSUP, b"TLS is not supported")
        return _opt_reply(opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())

    def _info_go(self, opt: int, data: bytes) -> bytes:
        try:
            name, rest = _take_string(data)
            if len(rest) < 2:
                raise ValueError
            (nreq,) = struct.unpack_from(">H", rest)
            if len(rest) != 2 + 2 * nreq:
                raise ValueError
            requests = struct.unpack_from(f">{nreq}H", rest, 2)
        except (ValueError, struct.error):
            return _opt_reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")
        export = self._lookup(name)
        if export is None:
            return _opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
        out = bytearray()
        out += _opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size,
                                                     export.flags & 0xFFFF))
        for r in dict.fromkeys(requests):
            if r == INFO_NAME:
                out += _opt_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME)
                                  + export.name.encode())
            elif r == INFO_DESCRIPTION and export.description:
                out += _opt_reply(opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                                  + export.description.encode())
        # block sizes are always sent: clients that did not ask may ignore them
        out += _opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, export.min_block,
                                                     export.preferred_block, export.max_block))
        out += _opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._finish(export)
        return bytes(out)

    def _meta_context(self, opt: int, data: bytes) -> bytes:
        if opt == OPT_SET_META_CONTEXT and not self._structured:
            return _opt_reply(opt, REP_ERR_INVALID, b"negotiate structured replies first")
        try:
            name, rest = _take_string(data)
            (nq,) = struct.unpack_from(">I", rest)
            rest = rest[4:]
            queries = []
            for _ in range(nq):
                q, rest = _take_string(rest)
                queries.append(q)
            if rest:
                raise ValueError
        except (ValueError, struct.error):
            return _opt_reply(opt, REP_ERR_INVALID, b"malformed meta context request")
        if self._lookup(name) is None:
            return _opt_reply(opt, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
        chosen: dict[int, str] = {}
        if not queries and opt == OPT_LIST_META_CONTEXT:
            chosen = {i: n for n, i in META_CONTEXTS.items()}
        for q in queries:
            for ctx, cid in META_CONTEXTS.items():
                ns = ctx.split(":", 1)[0] + ":"
                if q == ctx or (opt == OPT_LIST_META_CONTEXT and q == ns):
                    chosen[cid] = ctx
        out = bytearray()
        for cid, ctx in sorted(chosen.items()):
            out += _opt_reply(opt, REP_META_CONTEXT, struct.pack(">I", cid) + ctx.encode())
        if opt == OPT_SET_META_CONTEXT:
            self._contexts = chosen
        return bytes(out + _opt_reply(opt, REP_ACK))

    def _finish(self, export: Export) -> None:
        self.state = DONE
        self.negotiated = Negotiated(export, self._structured,
                                     dict(self._contexts) if self._structured else {},
                                     self._no_zeroes)


def _take_string(data: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_STRING or 4 + n > len(data):
        raise ValueError("bad string length")
    return data[4:4 + n].decode(), data[4 + n:]


def _opt_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


# -- transmission ----------------------------------------------------------------


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, rtype: int, length: int, done: bool = True) -> bytes:
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                  rtype, handle, length)


READ_CHUNK = struct.Struct(">IHHQIQ")  # a chunk header with the offset of OFFSET_DATA


def read_chunk_header(handle: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk; ``length`` data bytes follow."""
    return READ_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                            handle, length + 8, offset)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return chunk_header(handle, REPLY_TYPE_ERROR, 6 + len(msg)) + struct.pack(
        ">IH", error, len(msg)) + msg


def none_chunk(handle: int) -> bytes:
    return chunk_header(handle, REPLY_TYPE_NONE, 0)


def block_status_chunk(handle: int, context_id: int, descriptors: list[tuple[int, int]],
                       done: bool) -> bytes:
    body = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in descriptors)
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, len(body), done) + body
