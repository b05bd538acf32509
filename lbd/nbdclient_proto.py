"""The client side of the NBD protocol, sans I/O (doc/proto.md of the NBD project).

Used by the NBD layer (``layers/nbdremote.py``), which drives it with the bytes
its socket receives; nothing here does I/O.  Constants and codecs come from
:mod:`lbd.protocol`, which the server side uses too.

Two objects:

- :class:`ClientHandshake` negotiates one export: fixed newstyle (plain
  newstyle and oldstyle servers are understood too), structured replies,
  the ``base:allocation`` meta context, ``NBD_OPT_GO`` with a request for
  block sizes, and ``NBD_OPT_EXPORT_NAME`` when the server does not know GO::

      hs = ClientHandshake("export")
      while hs.state == NEED_DATA:
          hs.receive_data(recv())
          send(hs.step())          # may raise HandshakeError / RemoteProtocolError
      hs.negotiated, hs.leftover

- :class:`ClientTransmission` encodes requests and turns reply bytes into
  events, simple and structured replies alike.  Read payloads are not copied
  into events: a :class:`ReplyData` event says where ``length`` bytes belong,
  and the driver moves them with :meth:`ClientTransmission.take` (what is
  buffered) and reads the rest straight from its socket into the destination,
  reporting it with :meth:`ClientTransmission.skip_payload`.

Errors split by blame, as in h11: :class:`RemoteProtocolError` (the server
broke the protocol: drop the connection), :class:`HandshakeError` (the server
refused us, e.g. no such export), :class:`LocalProtocolError` (the driver
misused this API).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from lbd import protocol as P
from lbd.errors import LBDError

NEED_DATA = P.NEED_DATA
DONE = P.DONE

DEFAULT_MAX_BLOCK = 32 * 1024 * 1024  # what a client may assume without INFO_BLOCK_SIZE

_GREETING = struct.Struct(">QQ")
_OPT_REPLY = struct.Struct(">QIII")
_SIMPLE = P.SIMPLE_REPLY  # magic, error, handle
_STRUCT = P.STRUCTURED_HEADER  # magic, flags, type, handle, length
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_DESC = struct.Struct(">II")
_SIMPLE_MAGIC = P.SIMPLE_REPLY_MAGIC
_STRUCTURED_MAGIC = P.STRUCTURED_REPLY_MAGIC


class RemoteProtocolError(LBDError):
    """The server sent something the protocol does not allow; drop the connection."""


class LocalProtocolError(LBDError):
    """The driver misused this module (a bug in LBD, not in the server)."""


class HandshakeError(LBDError):
    """The server refused the handshake (unknown export, TLS required, ...)."""


# -- what was negotiated ----------------------------------------------------------


@dataclass
class RemoteExport:
    """An export as the server described it, and what the handshake agreed."""

    name: str
    size: int
    flags: int  # transmission flags
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    structured: bool = False
    contexts: dict[str, int] = field(default_factory=dict)  # name -> context id
    style: str = "fixed-newstyle"  # or "newstyle", "oldstyle"
    used_go: bool = False

    @property
    def readonly(self) -> bool:
        return bool(self.flags & P.TF_READ_ONLY)

    def can(self, flag: int) -> bool:
        return bool(self.flags & P.TF_HAS_FLAGS and self.flags & flag)

    @property
    def allocation_context(self) -> int | None:
        return self.contexts.get(P.CONTEXT_BASE_ALLOCATION)


# -- handshake ---------------------------------------------------------------------

_GREETING_PHASE = "greeting"
_OPTION_PHASE = "option"
_EXPORT_NAME_PHASE = "export-name"


def _string(s: str) -> bytes:
    b = s.encode()
    return _U32.pack(len(b)) + b


def option(opt: int, data: bytes = b"") -> bytes:
    """An option request: ``IHAVEOPT``, option, length, data."""
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def go_request(export_name: str, infos: tuple[int, ...] = (P.INFO_BLOCK_SIZE,),
               opt: int = P.OPT_GO) -> bytes:
    return option(opt, _string(export_name) + struct.pack(f">H{len(infos)}H", len(infos),
                                                          *infos))


def meta_context_request(export_name: str, queries: tuple[str, ...],
                         opt: int = P.OPT_SET_META_CONTEXT) -> bytes:
    body = _string(export_name) + _U32.pack(len(queries)) + b"".join(
        _string(q) for q in queries)
    return option(opt, body)


_REPLY_NAMES = {P.REP_ERR_UNSUP: "unsupported", P.REP_ERR_POLICY: "refused by policy",
                P.REP_ERR_INVALID: "invalid", P.REP_ERR_PLATFORM: "unsupported on the platform",
                P.REP_ERR_TLS_REQD: "TLS required", P.REP_ERR_UNKNOWN: "unknown export",
                P.REP_ERR_SHUTDOWN: "server shutting down",
                P.REP_ERR_BLOCK_SIZE_REQD: "block size negotiation required",
                P.REP_ERR_TOO_BIG: "too big"}


class ClientHandshake:
    """The client side of the handshake, for one export.

    ``structured`` asks for structured replies; ``contexts`` are the meta
    contexts to set (only with structured replies; the server may refuse
    any of them, which is not an error).
    """

    def __init__(self, export_name: str = "", *, structured: bool = True,
                 contexts: tuple[str, ...] = (P.CONTEXT_BASE_ALLOCATION,)) -> None:
        self.export_name = export_name
        self.want_structured = structured
        self.want_contexts = contexts
        self.state = NEED_DATA
        self.negotiated: RemoteExport | None = None
        self.leftover = b""
        self._buf = bytearray()
        self._phase = _GREETING_PHASE
        self._no_zeroes = False
        self._awaiting = 0  # the option whose replies come next
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._info: dict[int, bytes] = {}
        self._style = "fixed-newstyle"

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def step(self) -> bytes:
        """Handle everything received so far; return the bytes to send."""
        out = bytearray()
        while self.state == NEED_DATA:
            if self._phase == _GREETING_PHASE:
                if not self._greeting(out):
                    break
            elif self._phase == _OPTION_PHASE:
                if not self._option_reply(out):
                    break
            elif not self._export_name_reply():
                break
        if self.state == DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return bytes(out)

    # -- phases ------------------------------------------------------------------

    def _greeting(self, out: bytearray) -> bool:
        if len(self._buf) < 16:
            return False
        magic, second = _GREETING.unpack_from(self._buf)
        if magic != P.NBDMAGIC:
            raise RemoteProtocolError(f"not an NBD server (greeting magic {magic:#x})")
        if second == P.OLDSTYLE_MAGIC:
            if len(self._buf) < 152:
                return False
            size, flags = struct.unpack_from(">QI", self._buf, 16)
            del self._buf[:152]
            if self.export_name:
                raise HandshakeError(f"the server speaks the oldstyle handshake, which has no "
                                     f"export names; it cannot serve {self.export_name!r}")
            self._style = "oldstyle"
            self._done(size, flags & 0xFFFF)
            return True
        if second != P.IHAVEOPT:
            raise RemoteProtocolError(f"unknown handshake (second magic {second:#x})")
        if len(self._buf) < 18:
            return False
        (hflags,) = struct.unpack_from(">H", self._buf, 16)
        del self._buf[:18]
        self._no_zeroes = bool(hflags & P.FLAG_NO_ZEROES)
        cflags = (P.FLAG_FIXED_NEWSTYLE if hflags & P.FLAG_FIXED_NEWSTYLE else 0) | (
            P.FLAG_NO_ZEROES if self._no_zeroes else 0)
        out += _U32.pack(cflags)
        if not hflags & P.FLAG_FIXED_NEWSTYLE:
            # plain newstyle: options have no replies; only EXPORT_NAME is safe
            self._style = "newstyle"
            self._send_export_name(out)
        elif self.want_structured:
            self._send(out, P.OPT_STRUCTURED_REPLY, option(P.OPT_STRUCTURED_REPLY))
        else:
            self._send_go(out)
        return True

    def _send(self, out: bytearray, opt: int, data: bytes) -> None:
        out += data
        self._awaiting = opt
        self._phase = _OPTION_PHASE

    def _send_go(self, out: bytearray) -> None:
        self._info = {}
        self._send(out, P.OPT_GO, go_request(self.export_name))

    def _send_export_name(self, out: bytearray) -> None:
        out += option(P.OPT_EXPORT_NAME, self.export_name.encode())
        self._contexts = {}  # only GO is sure to carry them over
        self._phase = _EXPORT_NAME_PHASE

    def _option_reply(self, out: bytearray) -> bool:
        if len(self._buf) < 20:
            return False
        magic, opt, rtype, length = _OPT_REPLY.unpack_from(self._buf)
        if magic != P.OPT_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
        if opt != self._awaiting:
            raise RemoteProtocolError(f"a reply to option {opt} while waiting for "
                                      f"option {self._awaiting}")
        if length > P.MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option reply of {length} bytes is too long")
        if len(self._buf) < 20 + length:
            return False
        data = bytes(self._buf[20:20 + length])
        del self._buf[:20 + length]
        if opt == P.OPT_STRUCTURED_REPLY:
            self._structured_reply(out, rtype)
        elif opt == P.OPT_SET_META_CONTEXT:
            self._meta_reply(out, rtype, data)
        else:
            self._go_reply(out, rtype, data)
        return True

    def _structured_reply(self, out: bytearray, rtype: int) -> None:
        if rtype == P.REP_ACK:
            self._structured = True
        elif not rtype & (1 << 31):
            raise RemoteProtocolError(f"unexpected reply {rtype} to STRUCTURED_REPLY")
        if self._structured and self.want_contexts:
            self._send(out, P.OPT_SET_META_CONTEXT,
                       meta_context_request(self.export_name, self.want_contexts))
        else:
            self._send_go(out)

    def _meta_reply(self, out: bytearray, rtype: int, data: bytes) -> None:
        if rtype == P.REP_META_CONTEXT:
            if len(data) < 4:
                raise RemoteProtocolError("short META_CONTEXT reply")
            (cid,) = _U32.unpack_from(data)
            self._contexts[data[4:].decode(errors="replace")] = cid
            return
        if rtype != P.REP_ACK:
            if not rtype & (1 << 31):
                raise RemoteProtocolError(f"unexpected reply {rtype} to SET_META_CONTEXT")
            self._contexts = {}  # refused: go on without block status
        self._send_go(out)

    def _go_reply(self, out: bytearray, rtype: int, data: bytes) -> None:
        if rtype == P.REP_INFO:
            if len(data) < 2:
                raise RemoteProtocolError("short INFO reply")
            (kind,) = struct.unpack_from(">H", data)
            self._info[kind] = data[2:]
            return
        if rtype == P.REP_ACK:
            export = self._info.get(P.INFO_EXPORT)
            if export is None or len(export) != 10:
                raise RemoteProtocolError("GO succeeded without describing the export")
            size, flags = struct.unpack(">QH", export)
            self._done(size, flags, used_go=True)
            return
        if rtype == P.REP_ERR_UNSUP:
            self._send_export_name(out)  # an older server: the one-way option
            return
        if not rtype & (1 << 31):
            raise RemoteProtocolError(f"unexpected reply {rtype} to GO")
        message = data.decode(errors="replace").strip()
        what = _REPLY_NAMES.get(rtype, f"error {rtype & 0x7FFFFFFF}")
        if rtype == P.REP_ERR_UNKNOWN:
            raise HandshakeError(f"the server has no export named {self.export_name!r}"
                                 + (f" ({message})" if message else ""))
        raise HandshakeError(f"the server refused export {self.export_name!r}: {what}"
                             + (f" ({message})" if message else ""))

    def _export_name_reply(self) -> bool:
        need = 10 if self._no_zeroes else 134
        if len(self._buf) < need:
            return False
        size, flags = struct.unpack_from(">QH", self._buf)
        del self._buf[:need]
        self._done(size, flags)
        return True

    def _done(self, size: int, flags: int, used_go: bool = False) -> None:
        export = RemoteExport(self.export_name, size, flags, style=self._style,
                              structured=self._structured, used_go=used_go,
                              contexts=dict(self._contexts) if self._structured else {})
        block = self._info.get(P.INFO_BLOCK_SIZE) if used_go else None
        if block is not None and len(block) == 12:
            mn, pref, mx = struct.unpack(">III", block)
            if mn and mx >= mn:
                export.min_block, export.preferred_block, export.max_block = mn, pref, mx
        self.negotiated = export
        self.state = DONE

    def eof_message(self) -> str:
        """Why the server probably hung up, for an EOF during the handshake."""
        if self._phase == _EXPORT_NAME_PHASE:
            return (f"the server closed the connection after EXPORT_NAME: it has no export "
                    f"named {self.export_name!r} (or refused us)")
        return "the server closed the connection during the handshake"


# -- transmission -----------------------------------------------------------------------


@dataclass(slots=True)
class ReplyData:
    """``length`` bytes for device ``offset`` follow; move them with take/skip_payload."""

    handle: int
    offset: int
    length: int


@dataclass(slots=True)
class ReplyHole:
    """``[offset, offset + length)`` of a read reads as zeros."""

    handle: int
    offset: int
    length: int


@dataclass(slots=True)
class ReplyBlockStatus:
    handle: int
    context_id: int
    descriptors: list[tuple[int, int]]  # (length, flags)


@dataclass(slots=True)
class ReplyError:
    handle: int
    error: int  # an NBD error number (lbd.protocol.EIO, ...)
    message: str
    offset: int | None = None


@dataclass(slots=True)
class ReplyDone:
    """The request is complete; ``error`` is its first error, 0 for success."""

    handle: int
    error: int


Event = ReplyData | ReplyHole | ReplyBlockStatus | ReplyError | ReplyDone


class _Pending:
    __slots__ = ("cmd", "covered", "error", "length", "offset")

    def __init__(self, cmd: int, offset: int, length: int) -> None:
        self.cmd, self.offset, self.length = cmd, offset, length
        self.covered = 0
        self.error = 0


class ClientTransmission:
    """Requests out, reply events in, for one negotiated connection."""

    def __init__(self, structured: bool) -> None:
        self.structured = structured
        self._pending: dict[int, _Pending] = {}
        self._buf = bytearray()
        self._pos = 0
        self._payload_left = 0  # bytes of a read payload the driver still owes
        self._after_payload: list[Event] = []  # events due once the payload is moved
        self._events: list[Event] = []

    # -- requests ---------------------------------------------------------------

    def request(self, cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
        """The 28-byte request header; a WRITE's payload is sent after it."""
        if handle in self._pending:
            raise LocalProtocolError(f"handle {handle} is already in flight")
        if cmd != P.CMD_DISC:
            self._pending[handle] = _Pending(cmd, offset, length)
        return P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- replies ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def payload_left(self) -> int:
        """Payload bytes of the last :class:`ReplyData` not yet moved."""
        return self._payload_left

    def take(self, dest: memoryview | bytearray) -> int:
        """Copy buffered payload bytes into ``dest``; returns how many."""
        pos = self._pos
        n = min(len(dest), self._payload_left, len(self._buf) - pos)
        if n:
            with memoryview(self._buf) as buf:  # released at once: _buf may grow later
                dest[:n] = buf[pos:pos + n]
            self._pos = pos + n
            self._payload_left -= n
        return n

    def skip_payload(self, n: int) -> None:
        """The driver read ``n`` payload bytes straight from its socket."""
        if n > self._payload_left or (n and self.buffered):
            raise LocalProtocolError("payload read around buffered bytes or past its end")
        self._payload_left -= n

    def read_reply(self) -> tuple[int, int] | None:
        """The common reply, without events: all of a READ's data in one piece.

        When the next reply is a successful simple reply to a READ, or a
        structured OFFSET_DATA chunk with the DONE flag covering all of its
        READ, returns ``(handle, length)``: the request is finished and its
        payload (``length`` bytes, for the READ's whole range) is to be
        moved with :meth:`take` / :meth:`skip_payload` as after a
        :class:`ReplyData`.  None otherwise (use :meth:`next_event`).
        """
        if self._payload_left or self._after_payload or self._events:
            return None
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if have < _SIMPLE.size:
            return None
        magic = _U32.unpack_from(buf, pos)[0]
        if magic == _STRUCTURED_MAGIC:
            if have < _STRUCT.size + 8:
                return None
            _, flags, rtype, handle, length = _STRUCT.unpack_from(buf, pos)
            if rtype != P.REPLY_TYPE_OFFSET_DATA or not flags & P.REPLY_FLAG_DONE:
                return None
            req = self._pending.get(handle)
            if (req is None or req.cmd != P.CMD_READ or req.covered
                    or length - 8 != req.length
                    or _U64.unpack_from(buf, pos + _STRUCT.size)[0] != req.offset):
                return None
        elif magic == _SIMPLE_MAGIC and not self.structured:
            _, error, handle = _SIMPLE.unpack_from(buf, pos)
            req = self._pending.get(handle)
            if error or req is None or req.cmd != P.CMD_READ:
                return None
        else:
            return None
        del self._pending[handle]
        n = req.length
        self._pos = pos + (_STRUCT.size + 8 if magic == _STRUCTURED_MAGIC else _SIMPLE.size)
        self._payload_left = n
        return handle, n

    def next_event(self) -> Event | None:
        """The next event, or None until more data arrives."""
        if self._payload_left:
            raise LocalProtocolError("move the read payload (take/skip_payload) first")
        if self._after_payload:
            return self._after_payload.pop(0)
        if self._events:
            return self._events.pop(0)
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if have < 4:
            return None
        (magic,) = _U32.unpack_from(buf, pos)
        if magic == P.SIMPLE_REPLY_MAGIC:
            if have < _SIMPLE.size:
                return None
            _, error, handle = _SIMPLE.unpack_from(buf, pos)
            req = self._request_for(handle)
            self._pos = pos + _SIMPLE.size
            if req.cmd == P.CMD_READ and not error:
                if self.structured:
                    raise RemoteProtocolError(
                        f"a simple reply with data to READ {handle} after structured "
                        "replies were negotiated")
                del self._pending[handle]
                self._payload_left = req.length
                self._after_payload.append(ReplyDone(handle, 0))
                return ReplyData(handle, req.offset, req.length)
            del self._pending[handle]
            return ReplyDone(handle, error)
        if magic != P.STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        if not self.structured:
            raise RemoteProtocolError("a structured reply without structured replies")
        if have < _STRUCT.size:
            return None
        _, flags, rtype, handle, length = _STRUCT.unpack_from(buf, pos)
        req = self._request_for(handle)
        body = pos + _STRUCT.size
        done = bool(flags & P.REPLY_FLAG_DONE)
        if rtype == P.REPLY_TYPE_OFFSET_DATA:
            if req.cmd != P.CMD_READ or length < 9:
                raise RemoteProtocolError(f"bad OFFSET_DATA chunk for handle {handle}")
            if have < _STRUCT.size + 8:
                return None
            (offset,) = _U64.unpack_from(buf, body)
            n = length - 8
            self._check_range(req, handle, offset, n)
            self._pos = body + 8
            self._payload_left = n
            req.covered += n
            if done:
                self._after_payload.append(self._finish(handle, req))
            return ReplyData(handle, offset, n)
        if have < _STRUCT.size + length:
            return None
        self._pos = body + length
        data = memoryview(buf)[body:body + length]
        events: list[Event] = []
        if rtype == P.REPLY_TYPE_NONE:
            if length or not done:
                raise RemoteProtocolError(f"bad NONE chunk for handle {handle}")
        elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != P.CMD_READ or length != 12:
                raise RemoteProtocolError(f"bad OFFSET_HOLE chunk for handle {handle}")
            offset, n = struct.unpack_from(">QI", data)
            self._check_range(req, handle, offset, n)
            req.covered += n
            events.append(ReplyHole(handle, offset, n))
        elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != P.CMD_BLOCK_STATUS or length < 4 or (length - 4) % 8:
                raise RemoteProtocolError(f"bad BLOCK_STATUS chunk for handle {handle}")
            (cid,) = _U32.unpack_from(data)
            descs = [_DESC.unpack_from(data, 4 + 8 * i) for i in range((length - 4) // 8)]
            events.append(ReplyBlockStatus(handle, cid, descs))
        elif rtype & 0x8000:  # an error chunk (known or not)
            if length < 6:
                raise RemoteProtocolError(f"short error chunk for handle {handle}")
            error, mlen = struct.unpack_from(">IH", data)
            extra = 8 if rtype == P.REPLY_TYPE_ERROR_OFFSET else 0
            if 6 + mlen + extra > length:
                raise RemoteProtocolError(f"bad error chunk for handle {handle}")
            message = bytes(data[6:6 + mlen]).decode(errors="replace")
            offset = _U64.unpack_from(data, 6 + mlen)[0] if extra else None
            if not error:
                error = P.EIO  # an error chunk must carry an error; never report success
            req.error = req.error or error
            events.append(ReplyError(handle, error, message, offset))
        else:
            raise RemoteProtocolError(f"unknown reply chunk type {rtype} for handle {handle}")
        if done:
            events.append(self._finish(handle, req))
        data.release()
        if not events:
            raise RemoteProtocolError(f"empty chunk without DONE for handle {handle}")
        self._events = events[1:]
        return events[0]

    def _request_for(self, handle: int) -> _Pending:
        req = self._pending.get(handle)
        if req is None:
            raise RemoteProtocolError(f"a reply for handle {handle}, which is not in flight")
        return req

    @staticmethod
    def _check_range(req: _Pending, handle: int, offset: int, n: int) -> None:
        if offset < req.offset or offset + n > req.offset + req.length:
            raise RemoteProtocolError(
                f"reply chunk [{offset}, {offset + n}) is outside READ {handle} "
                f"[{req.offset}, {req.offset + req.length})")

    def _finish(self, handle: int, req: _Pending) -> ReplyDone:
        del self._pending[handle]
        if req.cmd == P.CMD_READ and not req.error and req.covered != req.length:
            raise RemoteProtocolError(f"READ {handle} finished with {req.covered} of "
                                      f"{req.length} bytes answered")
        return ReplyDone(handle, req.error)

    def fail_all(self) -> list[int]:
        """Forget every request in flight (the connection is gone); their handles."""
        handles = list(self._pending)
        self._pending.clear()
        return handles
