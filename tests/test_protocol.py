"""The sans-I/O NBD handshake on bytes alone: fed whole and one byte at a time."""

from __future__ import annotations

import struct

import pytest

from lbd import protocol as P

EXPORT = P.Export("disk", 1 << 20, P.TF_HAS_FLAGS | P.TF_SEND_FLUSH, "a test disk")


def server(oldstyle: bool = False) -> P.ServerHandshake:
    return P.ServerHandshake(lambda n: EXPORT if n == "disk" else None, lambda: [EXPORT],
                             oldstyle=oldstyle)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def name(s: str) -> bytes:
    return struct.pack(">I", len(s)) + s.encode()


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == P.OPT_REPLY_MAGIC
        out.append((option, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def drive(hs: P.ServerHandshake, data: bytes, bytewise: bool) -> bytes:
    out = b""
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    for c in chunks:
        hs.receive_data(c)
        out += hs.step()
    return out


def test_greeting() -> None:
    assert server().start() == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                           P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)


@pytest.mark.parametrize("bytewise", [False, True])
def test_go_with_structured_replies_and_contexts(bytewise: bool) -> None:
    hs = server()
    hs.start()
    msg = struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
    msg += opt(P.OPT_STRUCTURED_REPLY)
    msg += opt(P.OPT_SET_META_CONTEXT, name("disk") + struct.pack(">I", 2)
               + name("base:allocation") + name("lbd:allocation-depth"))
    msg += opt(P.OPT_GO, name("disk") + struct.pack(">HHH", 2, P.INFO_NAME, P.INFO_DESCRIPTION))
    msg += b"TRAILING"  # the first request, pipelined
    out = replies(drive(hs, msg, bytewise))
    assert out[0] == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")
    assert out[1] == (P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT,
                      struct.pack(">I", 1) + b"base:allocation")
    assert out[2] == (P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT,
                      struct.pack(">I", 2) + b"lbd:allocation-depth")
    assert out[3] == (P.OPT_SET_META_CONTEXT, P.REP_ACK, b"")
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for o, t, p in out[4:] if t == P.REP_INFO}
    assert infos[P.INFO_EXPORT] == struct.pack(">QH", 1 << 20, EXPORT.flags)
    assert infos[P.INFO_NAME] == b"disk"
    assert infos[P.INFO_DESCRIPTION] == b"a test disk"
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert out[-1] == (P.OPT_GO, P.REP_ACK, b"")
    assert hs.state == P.DONE and hs.negotiated is not None
    assert hs.negotiated.structured
    assert hs.negotiated.contexts == {1: "base:allocation", 2: "lbd:allocation-depth"}
    assert hs.leftover == b"TRAILING"


def test_export_name_without_no_zeroes_pads_124_bytes() -> None:
    hs = server()
    hs.start()
    out = drive(hs, struct.pack(">I", P.FLAG_FIXED_NEWSTYLE) + opt(P.OPT_EXPORT_NAME, b"disk"),
                False)
    assert out == struct.pack(">QH", 1 << 20, EXPORT.flags) + bytes(124)
    assert hs.state == P.DONE


def test_unknown_export() -> None:
    hs = server()
    hs.start()
    out = replies(drive(hs, struct.pack(">I", 1) + opt(P.OPT_GO, name("nope")
                                                        + struct.pack(">H", 0)), False))
    assert out[0][1] == P.REP_ERR_UNKNOWN and hs.state == P.NEED_DATA
    hs2 = server()
    hs2.start()
    drive(hs2, struct.pack(">I", 1) + opt(P.OPT_EXPORT_NAME, b"nope"), False)
    assert hs2.state == P.CLOSED  # EXPORT_NAME has no error reply: hang up


def test_list_abort_unsupported_and_malformed() -> None:
    hs = server()
    hs.start()
    msg = struct.pack(">I", 1) + opt(P.OPT_LIST) + opt(P.OPT_STARTTLS) + opt(99, b"xyz")
    msg += opt(P.OPT_INFO, b"\x00\x00")  # truncated name length
    msg += opt(P.OPT_SET_META_CONTEXT, name("disk") + struct.pack(">I", 0))  # before STRUCTURED
    msg += opt(P.OPT_STRUCTURED_REPLY, b"x")
    msg += opt(P.OPT_ABORT)
    out = replies(drive(hs, msg, False))
    assert out[0] == (P.OPT_LIST, P.REP_SERVER, name("disk") + b"a test disk")
    assert out[1] == (P.OPT_LIST, P.REP_ACK, b"")
    assert out[2][:2] == (P.OPT_STARTTLS, P.REP_ERR_UNSUP)
    assert out[3][:2] == (99, P.REP_ERR_UNSUP)
    assert out[4][:2] == (P.OPT_INFO, P.REP_ERR_INVALID)
    assert out[5][:2] == (P.OPT_SET_META_CONTEXT, P.REP_ERR_INVALID)
    assert out[6][:2] == (P.OPT_STRUCTURED_REPLY, P.REP_ERR_INVALID)
    assert out[7] == (P.OPT_ABORT, P.REP_ACK, b"")
    assert hs.state == P.CLOSED


def test_list_meta_context_namespace_query() -> None:
    hs = server()
    hs.start()
    out = replies(drive(hs, struct.pack(">I", 1) + opt(
        P.OPT_LIST_META_CONTEXT, name("disk") + struct.pack(">I", 1) + name("lbd:")), False))
    assert out == [(P.OPT_LIST_META_CONTEXT, P.REP_META_CONTEXT,
                    struct.pack(">I", 2) + b"lbd:allocation-depth"),
                   (P.OPT_LIST_META_CONTEXT, P.REP_ACK, b"")]


def test_hostile_inputs_close_the_handshake() -> None:
    hs = server()
    hs.start()
    drive(hs, struct.pack(">I", 0x80) , False)
    assert hs.state == P.CLOSED and "client flags" in hs.close_reason
    hs = server()
    hs.start()
    drive(hs, struct.pack(">I", 1) + struct.pack(">QII", 0x1234, 1, 0), False)
    assert hs.state == P.CLOSED and "magic" in hs.close_reason
    hs = server()
    hs.start()
    out = replies(drive(hs, struct.pack(">I", 1) + struct.pack(">QII", P.IHAVEOPT, 7,
                                                                 1 << 30), False))
    assert out[0][1] == P.REP_ERR_TOO_BIG and hs.state == P.CLOSED


def test_oldstyle_greeting() -> None:
    hs = server(oldstyle=True)
    hs._lookup = lambda n: EXPORT  # oldstyle has no names: the one export
    data = hs.start()
    assert len(data) == 152
    magic, old, size, flags = struct.unpack_from(">QQQI", data)
    assert (magic, old, size, flags) == (P.NBDMAGIC, P.OLDSTYLE_MAGIC, 1 << 20, EXPORT.flags)
    assert hs.state == P.DONE


def test_reply_codecs() -> None:
    assert P.simple_reply(7, P.EPERM) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 1, 7)
    hdr = P.read_chunk_header(9, 4096, 512)
    assert struct.unpack(">IHHQIQ", hdr) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                             P.REPLY_TYPE_OFFSET_DATA, 9, 520, 4096)
    chunk = P.block_status_chunk(3, 1, [(4096, 0), (8192, 3)], done=True)
    assert struct.unpack(">IHHQIIIIII", chunk) == (
        P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, 3, 20,
        1, 4096, 0, 8192, 3)
    err = P.error_chunk(5, P.EIO, "boom")
    assert err[-10:] == struct.pack(">IH", P.EIO, 4) + b"boom"
