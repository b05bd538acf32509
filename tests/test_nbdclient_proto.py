"""The sans-I/O NBD client on bytes alone: against LBD's own server handshake,
against hand-made bytes of older servers, and reply parsing whole and byte by byte.

The real servers (nbdkit, qemu-nbd, nbd-server, lbd) are in test_nbd_layer*.py.
"""

from __future__ import annotations

import struct

import pytest

from lbd import nbdclient_proto as C
from lbd import protocol as P

EXPORT = P.Export("disk", 1 << 20, P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_READ_ONLY,
                  "a test disk", min_block=1, preferred_block=4096, max_block=1 << 20)


def opt_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", P.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def converse(client: C.ClientHandshake, server: P.ServerHandshake, bytewise: bool) -> None:
    """Run both handshakes against each other until the client is done."""
    to_client = server.start()
    while client.state == C.NEED_DATA:
        assert to_client, "the conversation stalled"
        chunks = [to_client[i:i + 1] for i in range(len(to_client))] if bytewise \
            else [to_client]
        to_server = b""
        for c in chunks:
            client.receive_data(c)
            to_server += client.step()
        server.receive_data(to_server)
        to_client = server.step()


def lbd_server(export: P.Export = EXPORT) -> P.ServerHandshake:
    return P.ServerHandshake(lambda n: export if n == export.name else None, lambda: [export])


@pytest.mark.parametrize("bytewise", [False, True])
def test_handshake_with_lbds_server_go_structured_context(bytewise: bool) -> None:
    client = C.ClientHandshake("disk")
    server = lbd_server()
    converse(client, server, bytewise)
    neg = client.negotiated
    assert neg is not None and client.state == C.DONE
    assert (neg.size, neg.flags, neg.structured, neg.used_go) == (
        1 << 20, EXPORT.flags, True, True)
    assert neg.readonly and neg.can(P.TF_SEND_FLUSH) and not neg.can(P.TF_SEND_TRIM)
    assert neg.contexts == {"base:allocation": 1} and neg.allocation_context == 1
    assert (neg.min_block, neg.preferred_block, neg.max_block) == (1, 4096, 1 << 20)
    # the server agrees on what was negotiated
    assert server.state == P.DONE and server.negotiated is not None
    assert server.negotiated.structured and server.negotiated.contexts == {1: "base:allocation"}
    assert server.negotiated.no_zeroes


def test_handshake_without_structured_replies() -> None:
    client = C.ClientHandshake("disk", structured=False)
    server = lbd_server()
    converse(client, server, False)
    assert client.negotiated is not None and not client.negotiated.structured
    assert client.negotiated.contexts == {}
    assert server.negotiated is not None and not server.negotiated.structured


def test_unknown_export_is_a_clear_error() -> None:
    client = C.ClientHandshake("nope")
    with pytest.raises(C.HandshakeError, match="no export named 'nope'"):
        converse(client, lbd_server(), False)


def test_go_unsupported_falls_back_to_export_name_with_zero_padding() -> None:
    """An older fixed-newstyle server: no structured replies, no GO, no NO_ZEROES."""
    client = C.ClientHandshake("old")
    client.receive_data(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE))
    out = client.step()
    assert out[:4] == struct.pack(">I", P.FLAG_FIXED_NEWSTYLE)  # no NO_ZEROES: not offered
    assert struct.unpack_from(">QII", out, 4) == (P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
    client.receive_data(opt_reply(P.OPT_STRUCTURED_REPLY, P.REP_ERR_UNSUP))
    out = client.step()
    magic, opt, _ = struct.unpack_from(">QII", out)
    assert (magic, opt) == (P.IHAVEOPT, P.OPT_GO)
    assert out[16:16 + 4 + 3] == struct.pack(">I", 3) + b"old"
    client.receive_data(opt_reply(P.OPT_GO, P.REP_ERR_UNSUP, b"what is GO?"))
    out = client.step()
    assert out == struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 3) + b"old"
    assert client.state == C.NEED_DATA
    client.receive_data(struct.pack(">QH", 4096, P.TF_HAS_FLAGS | P.TF_SEND_FLUSH))
    client.receive_data(bytes(124) + b"REPLY")
    assert client.step() == b""
    neg = client.negotiated
    assert neg is not None and (neg.size, neg.structured, neg.used_go) == (4096, False, False)
    assert neg.max_block == C.DEFAULT_MAX_BLOCK
    assert client.leftover == b"REPLY"


def test_refused_meta_context_goes_on_without_block_status() -> None:
    client = C.ClientHandshake("")
    client.receive_data(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                    P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    client.step()
    client.receive_data(opt_reply(P.OPT_STRUCTURED_REPLY, P.REP_ACK))
    out = client.step()
    assert struct.unpack_from(">QI", out)[1] == P.OPT_SET_META_CONTEXT
    client.receive_data(opt_reply(P.OPT_SET_META_CONTEXT, P.REP_ERR_UNSUP))
    out = client.step()
    assert struct.unpack_from(">QI", out)[1] == P.OPT_GO
    client.receive_data(opt_reply(P.OPT_GO, P.REP_INFO, struct.pack(">HQH", 0, 1 << 30, 1)))
    client.receive_data(opt_reply(P.OPT_GO, P.REP_INFO, struct.pack(">HIII", 3, 512, 4096,
                                                                     1 << 16)))
    client.receive_data(opt_reply(P.OPT_GO, P.REP_ACK))
    client.step()
    neg = client.negotiated
    assert neg is not None and neg.structured and neg.contexts == {}
    assert neg.allocation_context is None
    assert (neg.min_block, neg.max_block) == (512, 1 << 16)


def test_plain_newstyle_and_oldstyle_servers() -> None:
    client = C.ClientHandshake("x")
    client.receive_data(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_NO_ZEROES))
    out = client.step()
    assert out == struct.pack(">I", P.FLAG_NO_ZEROES) + struct.pack(
        ">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 1) + b"x"
    client.receive_data(struct.pack(">QH", 1024, 1))
    client.step()
    assert client.negotiated is not None and client.negotiated.style == "newstyle"
    assert client.negotiated.size == 1024

    old = P.ServerHandshake(lambda n: EXPORT, lambda: [EXPORT], oldstyle=True)
    client = C.ClientHandshake("")
    client.receive_data(old.start())
    assert client.step() == b""  # oldstyle: nothing to say
    assert client.negotiated is not None and client.negotiated.style == "oldstyle"
    assert client.negotiated.size == EXPORT.size
    named = C.ClientHandshake("disk")
    named.receive_data(old.start())
    with pytest.raises(C.HandshakeError, match="oldstyle"):
        named.step()


def test_hostile_greetings() -> None:
    client = C.ClientHandshake("")
    client.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(C.RemoteProtocolError, match="not an NBD server"):
        client.step()
    client = C.ClientHandshake("")
    client.receive_data(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, 3))
    client.step()
    client.receive_data(opt_reply(P.OPT_GO, P.REP_ACK))  # a reply to an option not asked
    with pytest.raises(C.RemoteProtocolError, match="option"):
        client.step()
    client = C.ClientHandshake("")
    client.receive_data(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, 3))
    client.step()
    client.receive_data(opt_reply(P.OPT_STRUCTURED_REPLY, P.REP_ERR_POLICY))
    client.step()  # structured refused: go on with GO
    client.receive_data(opt_reply(P.OPT_GO, P.REP_ERR_TLS_REQD, b"use TLS"))
    with pytest.raises(C.HandshakeError, match="TLS required"):
        client.step()


# -- transmission ------------------------------------------------------------------


def events(t: C.ClientTransmission, data: bytes, bytewise: bool,
           sink: bytearray | None = None) -> list[object]:
    """Feed ``data``, collect events; read payloads land in ``sink`` at their offset."""
    out: list[object] = []
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    current: C.ReplyData | None = None
    pos = 0
    for c in chunks:
        t.receive_data(c)
        while True:
            if t.payload_left:
                assert current is not None and sink is not None
                n = t.take(memoryview(sink)[current.offset + pos:current.offset
                                            + current.length])
                pos += n
                if t.payload_left:
                    break
                continue
            ev = t.next_event()
            if ev is None:
                break
            out.append(ev)
            if isinstance(ev, C.ReplyData):
                current, pos = ev, 0
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_simple_replies(bytewise: bool) -> None:
    t = C.ClientTransmission(structured=False)
    hdr = t.request(P.CMD_READ, 1, 512, 8)
    assert struct.unpack(">IHHQQI", hdr) == (P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 512, 8)
    t.request(P.CMD_WRITE, 2, 0, 512, P.CMDF_FUA)
    t.request(P.CMD_READ, 3, 0, 4)
    sink = bytearray(1024)
    data = (P.simple_reply(2, P.ENOSPC) + P.simple_reply(1) + b"ABCDEFGH"
            + P.simple_reply(3, P.EIO))
    got = events(t, data, bytewise, sink)
    assert got == [C.ReplyDone(2, P.ENOSPC), C.ReplyData(1, 512, 8), C.ReplyDone(1, 0),
                   C.ReplyDone(3, P.EIO)]  # an error reply to READ has no payload
    assert sink[512:520] == b"ABCDEFGH" and t.in_flight == 0


@pytest.mark.parametrize("bytewise", [False, True])
def test_structured_replies(bytewise: bool) -> None:
    t = C.ClientTransmission(structured=True)
    t.request(P.CMD_READ, 10, 4096, 16)
    t.request(P.CMD_BLOCK_STATUS, 11, 0, 1 << 20)
    t.request(P.CMD_READ, 12, 0, 8)
    t.request(P.CMD_FLUSH, 13, 0, 0)
    sink = bytearray(8192)
    data = b"".join([
        P.chunk_header(10, P.REPLY_TYPE_OFFSET_DATA, 8 + 8, done=False)
        + struct.pack(">Q", 4096 + 8) + b"datadata",
        P.block_status_chunk(11, 1, [(4096, 0), (8192, 3)], done=True),
        P.chunk_header(10, P.REPLY_TYPE_OFFSET_HOLE, 12, done=True)
        + struct.pack(">QI", 4096, 8),
        P.error_chunk(12, P.EIO, "disk on fire"),
        P.none_chunk(13),
    ])
    got = events(t, data, bytewise, sink)
    assert got == [C.ReplyData(10, 4104, 8), C.ReplyBlockStatus(11, 1, [(4096, 0), (8192, 3)]),
                   C.ReplyDone(11, 0), C.ReplyHole(10, 4096, 8), C.ReplyDone(10, 0),
                   C.ReplyError(12, P.EIO, "disk on fire"), C.ReplyDone(12, P.EIO),
                   C.ReplyDone(13, 0)]
    assert sink[4104:4112] == b"datadata"
    assert t.in_flight == 0


def test_a_final_data_chunk_and_direct_payload_reads() -> None:
    """The driver reads part of a payload itself (from its socket): skip_payload."""
    t = C.ClientTransmission(structured=True)
    t.request(P.CMD_READ, 5, 0, 1000)
    t.receive_data(P.read_chunk_header(5, 0, 1000) + b"x" * 100)
    ev = t.next_event()
    assert ev == C.ReplyData(5, 0, 1000)
    dest = bytearray(1000)
    assert t.take(memoryview(dest)) == 100 and t.payload_left == 900
    with pytest.raises(C.LocalProtocolError):
        t.next_event()
    dest[100:] = b"y" * 900  # as if received straight into dest
    t.skip_payload(900)
    assert t.next_event() == C.ReplyDone(5, 0)
    assert t.next_event() is None


@pytest.mark.parametrize("reply, match", [
    (P.simple_reply(99), "not in flight"),
    (b"\x00\x00\x00\x00" + bytes(12), "bad reply magic"),
    (P.chunk_header(1, P.REPLY_TYPE_OFFSET_DATA, 16) + struct.pack(">Q", 1 << 20) + bytes(8),
     "outside READ"),
    (P.chunk_header(1, P.REPLY_TYPE_OFFSET_HOLE, 12) + struct.pack(">QI", 0, 100),
     "finished with 100 of 512"),
    (P.chunk_header(1, 77, 0), "unknown reply chunk type"),
    (P.chunk_header(1, P.REPLY_TYPE_BLOCK_STATUS, 4) + bytes(4), "bad BLOCK_STATUS"),
    (P.simple_reply(1), "simple reply with data"),
])
def test_protocol_violations(reply: bytes, match: str) -> None:
    t = C.ClientTransmission(structured=True)
    t.request(P.CMD_READ, 1, 0, 512)
    t.receive_data(reply)
    with pytest.raises(C.RemoteProtocolError, match=match):
        while t.next_event() is not None:
            pass


def test_structured_reply_without_negotiation_and_handle_reuse() -> None:
    t = C.ClientTransmission(structured=False)
    t.request(P.CMD_FLUSH, 1, 0, 0)
    with pytest.raises(C.LocalProtocolError):
        t.request(P.CMD_READ, 1, 0, 512)
    t.receive_data(P.none_chunk(1))
    with pytest.raises(C.RemoteProtocolError, match="without structured"):
        t.next_event()
    t2 = C.ClientTransmission(structured=True)
    t2.request(P.CMD_WRITE, 1, 0, 512)
    t2.request(P.CMD_WRITE, 2, 512, 512)
    assert sorted(t2.fail_all()) == [1, 2] and t2.in_flight == 0


def test_read_reply_takes_whole_read_replies_without_events() -> None:
    """read_reply: a whole READ in one final chunk (or a simple reply); else None."""
    t = C.ClientTransmission(structured=True)
    t.request(P.CMD_READ, 1, 4096, 8)
    t.request(P.CMD_READ, 2, 0, 16)
    t.request(P.CMD_READ, 3, 512, 8)
    t.request(P.CMD_FLUSH, 4, 0, 0)
    t.receive_data(P.read_chunk_header(1, 4096, 8)[:20])
    assert t.read_reply() is None  # the offset has not come yet
    t.receive_data(P.read_chunk_header(1, 4096, 8)[20:] + b"ABCDEFGH")
    assert t.read_reply() == (1, 8)
    dest = bytearray(8)
    assert t.take(dest) == 8 and dest == b"ABCDEFGH" and t.payload_left == 0
    # a chunk covering part of its READ: the events way
    t.receive_data(P.chunk_header(2, P.REPLY_TYPE_OFFSET_DATA, 8 + 8, done=False)
                   + struct.pack(">Q", 8) + b"12345678")
    assert t.read_reply() is None
    assert t.next_event() == C.ReplyData(2, 8, 8)
    assert t.take(bytearray(8)) == 8
    t.receive_data(P.chunk_header(2, P.REPLY_TYPE_OFFSET_HOLE, 12, done=True)
                   + struct.pack(">QI", 0, 8))
    assert t.read_reply() is None
    assert t.next_event() == C.ReplyHole(2, 0, 8)
    assert t.next_event() == C.ReplyDone(2, 0)
    # an error, and a reply that is not to a READ: events
    t.receive_data(P.error_chunk(3, P.EIO, "bad") + P.none_chunk(4))
    assert t.read_reply() is None
    assert t.next_event() == C.ReplyError(3, P.EIO, "bad")
    assert t.next_event() == C.ReplyDone(3, P.EIO)
    assert t.read_reply() is None
    assert t.next_event() == C.ReplyDone(4, 0)
    assert t.in_flight == 0


def test_read_reply_with_simple_replies() -> None:
    t = C.ClientTransmission(structured=False)
    t.request(P.CMD_READ, 7, 0, 4)
    t.request(P.CMD_READ, 8, 0, 4)
    t.receive_data(P.simple_reply(7) + b"wxyz" + P.simple_reply(8, P.EIO))
    assert t.read_reply() == (7, 4)
    assert t.read_reply() is None  # the payload is still to be taken
    dest = bytearray(4)
    assert t.take(dest) == 4 and dest == b"wxyz"
    assert t.read_reply() is None  # an error reply: the events way
    assert t.next_event() == C.ReplyDone(8, P.EIO)
    assert t.in_flight == 0
