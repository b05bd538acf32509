"""Property-based fuzzing (hypothesis) of the sans-I/O protocol code.

The NBD handshake (``lbd/protocol.py``) and the management protocol
(``lbd/mgmtproto.py``) get generated and mutated input: option streams with
valid, malformed and hostile options, random bytes, any chunking.  The
properties: nothing raises but the documented exceptions; the result does
not depend on how the bytes were split; every option fully received gets
its replies, in order, well formed, ending in an ACK or an error; encodings
round-trip.  The coverage-guided counterpart is ``tests/fuzz`` (atheris).

``LBD_LONG_TESTS=1`` runs 20 times as many examples (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbd import mgmtproto as M
from lbd import protocol as P

LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
EXAMPLES = 20000 if LONG else 1000
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

EXPORT = P.Export("disk", 1 << 20, P.TF_HAS_FLAGS | P.TF_SEND_FLUSH, "a test disk")


def new_server(oldstyle: bool = False) -> P.ServerHandshake:
    return P.ServerHandshake(lambda n: EXPORT if n == "disk" else None, lambda: [EXPORT],
                             oldstyle=oldstyle)


# -- strategies -----------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
names = st.sampled_from(["disk", "", "nope", "dis", "disk\0", "é" * 3]) | st.text(max_size=20)


@st.composite
def nbd_string(draw: st.DrawFn) -> bytes:
    s = draw(names).encode("utf-8", "surrogatepass")
    n = draw(st.sampled_from([len(s)] * 6 + [len(s) + 1, max(len(s) - 1, 0), 2**32 - 1, 4097]))
    return struct.pack(">I", n) + s


@st.composite
def option_data(draw: st.DrawFn, opt: int) -> bytes:
    if opt in (P.OPT_INFO, P.OPT_GO):
        reqs = draw(st.lists(st.integers(0, 6), max_size=5))
        n = draw(st.sampled_from([len(reqs)] * 4 + [len(reqs) + 1, 0xFFFF]))
        return draw(nbd_string()) + struct.pack(">H", n) + struct.pack(f">{len(reqs)}H", *reqs)
    if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
        qs = draw(st.lists(st.sampled_from(["base:allocation", "base:", "lbd:",
                                            "lbd:allocation-depth", "x:y", ""]), max_size=4))
        n = draw(st.sampled_from([len(qs)] * 4 + [len(qs) + 1, 2**32 - 1]))
        body = draw(nbd_string()) + struct.pack(">I", n)
        for q in qs:
            body += struct.pack(">I", len(q)) + q.encode()
        return body
    if opt == P.OPT_EXPORT_NAME:
        return draw(names).encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([b""] * 4 + [b"x", b"\0" * 8]))


@st.composite
def option(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([*range(13), 2**31, 2**32 - 1]) | u32)
    data = draw(option_data(opt) | st.binary(max_size=40))
    magic = draw(st.sampled_from([P.IHAVEOPT] * 20 + [0, P.NBDMAGIC]))
    length = draw(st.sampled_from([len(data)] * 12 + [len(data) + 3, max(0, len(data) - 1),
                                                      P.MAX_OPTION_LENGTH + 1, 2**32 - 1]))
    return struct.pack(">QII", magic, opt, length) + data


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([1, 3, 3, 3, 0, 2]) | u32)
    body = b"".join(draw(st.lists(option(), max_size=8)))
    tail = draw(st.binary(max_size=64))
    return struct.pack(">I", flags) + body + tail


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def drive(data_chunks: list[bytes]) -> tuple[P.ServerHandshake, bytes]:
    hs = new_server()
    hs.start()
    out = b""
    for c in data_chunks:
        if hs.state != P.NEED_DATA:
            hs.leftover += c  # what the frontend does: the rest is transmission data
            continue
        hs.receive_data(c)
        out += hs.step()
    return hs, out


# -- the model: how the stream frames into options -------------------------------------------


def frame(data: bytes) -> tuple[list[tuple[int, bytes]], str, int]:
    """The options a correct server processes, how it ends, and where.

    Returns (options fully received before the end, "need"/"closed"/"done"/
    "too-big", offset of the first byte not consumed).
    """
    if len(data) < 4:
        return [], "need", 0
    (flags,) = struct.unpack_from(">I", data)
    if flags & ~3:
        return [], "closed", 4
    pos, opts = 4, []
    while True:
        if len(data) - pos < 16:
            return opts, "need", pos
        magic, opt, length = struct.unpack_from(">QII", data, pos)
        if magic != P.IHAVEOPT:
            return opts, "closed", pos + 16
        if length > P.MAX_OPTION_LENGTH:
            return [*opts, (opt, b"")], "too-big", pos + 16
        if len(data) - pos - 16 < length:
            return opts, "need", pos
        opts.append((opt, data[pos + 16:pos + 16 + length]))
        pos += 16 + length


def parse_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    replies, pos = [], 0
    while pos < len(out):
        assert len(out) - pos >= 20, f"truncated option reply at {pos}: {out[pos:]!r}"
        magic, opt, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPT_REPLY_MAGIC, f"bad reply magic at {pos}"
        assert len(out) - pos - 20 >= length, "reply shorter than its length"
        replies.append((opt, rtype, out[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return replies


# -- NBD handshake properties ----------------------------------------------------------------


@fuzz
@given(handshake_stream(), st.lists(st.integers(0, 10**6), max_size=12))
def test_handshake_is_chunking_invariant_and_well_formed(data: bytes, cuts: list[int]) -> None:
    whole, out = drive([data])
    parts, out2 = drive(splits(data, cuts))
    bytewise, out3 = drive([data[i:i + 1] for i in range(min(len(data), 600))]
                           + [data[600:]])
    for other, o in ((parts, out2), (bytewise, out3)):
        assert o == out
        assert (other.state, other.close_reason, other.leftover, other.negotiated) == \
            (whole.state, whole.close_reason, whole.leftover, whole.negotiated)
    check_against_framing(data, whole, out)


def check_against_framing(data: bytes, hs: P.ServerHandshake, out: bytes) -> None:
    opts, end, _ = frame(data)
    if hs.state == P.DONE:
        assert hs.negotiated is not None and hs.negotiated.export == EXPORT
    # the option that finished the handshake (GO or EXPORT_NAME) is the last one processed
    # (after a successful GO, what follows is transmission-phase data: leftover)
    consumed = len(data) - len(hs.leftover) if hs.state == P.DONE else -1
    done_at = None
    offset = 4
    for i, (opt, body) in enumerate(opts):
        offset += 16 + len(body)
        if opt == P.OPT_ABORT:
            done_at = i
            break
        if opt == P.OPT_EXPORT_NAME:
            done_at = i
            break
        if opt == P.OPT_GO and offset == consumed:
            done_at = i
            break
    if end in ("closed", "too-big") and done_at is None:
        # (an option that ended the handshake before the bad framing wins)
        assert hs.state == P.CLOSED and hs.close_reason
    processed = opts if done_at is None else opts[:done_at + 1]
    if processed and processed[-1][0] == P.OPT_EXPORT_NAME:
        name_ok = processed[-1][1] == b"disk"
        assert hs.state == (P.DONE if name_ok else P.CLOSED)
        tail = 10 if data[3] & P.FLAG_NO_ZEROES else 134
        if name_ok:
            assert out[-tail:][:8] == struct.pack(">Q", EXPORT.size)
            out = out[:-tail]
        processed = processed[:-1]
    replies = parse_replies(out)
    # every processed option got a group of replies carrying its code, ending in ACK or error
    pos = 0
    for opt, _body in processed:
        group = []
        while pos < len(replies) and replies[pos][0] == opt:
            group.append(replies[pos])
            pos += 1
            if group[-1][1] == P.REP_ACK or group[-1][1] >= 1 << 31:
                break
        assert group, f"option {opt} got no reply"
        assert group[-1][1] == P.REP_ACK or group[-1][1] >= 1 << 31, group
        for _o, rtype, _payload in group[:-1]:
            assert rtype in (P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT), group
        assert all(len(p) <= 2 * P.MAX_STRING + 64 for _o, _t, p in group)
    assert pos == len(replies), f"replies left over: {replies[pos:]}"
    if hs.state == P.DONE:
        assert data.endswith(hs.leftover)


@fuzz
@given(st.binary(max_size=300), st.lists(st.integers(0, 10**6), max_size=8))
def test_handshake_random_bytes(data: bytes, cuts: list[int]) -> None:
    whole, out = drive([data])
    parts, out2 = drive(splits(data, cuts))
    assert out == out2 and whole.state == parts.state and whole.leftover == parts.leftover
    parse_replies(out)


@fuzz
@given(st.binary(max_size=200))
def test_handshake_after_done_and_closed_ignores_input(data: bytes) -> None:
    hs = new_server()
    hs.start()
    hs.receive_data(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_ABORT, 0))
    hs.step()
    assert hs.state == P.CLOSED
    hs.receive_data(data)
    assert hs.step() == b"" and hs.state == P.CLOSED


# -- management protocol properties -----------------------------------------------------------

# argument text as it can arrive from a command line: any str but lone surrogates
# other than surrogateescape's (bytes that are not UTF-8)
arg_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60) | \
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
tokens = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                 max_size=M.MAX_TOKEN)


@fuzz
@given(st.binary(max_size=200))
def test_parse_request_random_bytes(line: bytes) -> None:
    try:
        req = M.parse_request(line)
    except M.RequestError as exc:
        assert exc.code in M.ERROR_CODES and exc.message
        M.error(exc.code, exc.message)  # the reply to it encodes
        return
    if req is not None:
        assert req.command in M.COMMANDS
        assert (req.arg is None) == (M.COMMANDS[req.command].arg is None)


@fuzz
@given(st.sampled_from(sorted(M.COMMANDS)), arg_text, st.none() | tokens,
       st.sampled_from([str.upper, str.lower, str.title]))
def test_request_round_trip(command: str, arg: str, token: str | None, case) -> None:  # type: ignore[no-untyped-def]
    takes_arg = M.COMMANDS[command].arg is not None
    line = M.encode_request(case(command), arg if takes_arg else None, token)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    if takes_arg and (arg == "" or "\0" in arg):
        try:
            M.parse_request(line[:-1])
        except M.RequestError as exc:
            assert exc.code == M.BAD_REQUEST
            return
        raise AssertionError(f"an empty or NUL argument was accepted: {arg!r}")
    req = M.parse_request(line[:-1])
    assert req == M.Request(command, arg if takes_arg else None, token)


@fuzz
@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=10),
       st.lists(st.integers(0, 10**6), max_size=10), st.integers(8, 64))
def test_line_reader_chunking_and_limit(lines: list[bytes], cuts: list[int], limit: int) -> None:
    data = b"".join(x + b"\n" for x in lines)
    reader = M.LineReader(limit)
    got: list[bytes] = []
    too_long = False
    try:
        for chunk in splits(data, cuts):
            reader.feed(chunk)
            while (line := reader.next_line()) is not None:
                got.append(line)
    except M.LineTooLong:
        too_long = True
    # lines are returned exactly up to the first one over the limit
    first_long = next((i for i, x in enumerate(lines) if len(x) + 1 > limit), None)
    if first_long is None:
        assert not too_long and got == lines
    else:
        assert too_long and got == lines[:first_long]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@fuzz
@given(st.lists(st.one_of(
    json_values.map(lambda v: ("OK", v)),
    st.lists(arg_text, max_size=5).map(lambda v: ("TEXT", v)),
    st.tuples(st.sampled_from(sorted(M.ERROR_CODES)), arg_text).map(lambda v: ("ERR", v))),
    max_size=6), st.lists(st.integers(0, 10**6), max_size=10))
def test_reply_round_trip(replies: list[tuple[str, object]], cuts: list[int]) -> None:
    data = b""
    for kind, v in replies:
        if kind == "OK":
            data += M.ok(v)
        elif kind == "TEXT":
            data += M.text(v)  # type: ignore[arg-type]
        else:
            code, msg = v  # type: ignore[misc]
            data += M.error(code, msg)
    parser = M.ReplyParser()
    got = []
    for chunk in splits(data, cuts):
        parser.feed(chunk)
        while (r := parser.next_reply()) is not None:
            got.append(r)
    assert len(got) == len(replies)
    for r, (kind, v) in zip(got, replies):
        assert r.kind == kind
        if kind == "OK":
            assert json.dumps(r.value, sort_keys=True) == json.dumps(v, sort_keys=True)
        elif kind == "TEXT":
            assert r.lines == [M._one_line(s) for s in v]  # type: ignore[attr-defined]
        else:
            code, msg = v  # type: ignore[misc]
            assert r.code == code and r.message == (M._one_line(msg) or code.lower())


reply_words = st.text(max_size=12) | st.text(st.characters(categories=["N"]), max_size=3)
reply_like = st.lists(st.tuples(st.sampled_from(["OK", "TEXT", "ERR", "", "ok"]), reply_words)
                      .map(lambda t: " ".join(t) + "\n"), max_size=5) \
    .map(lambda xs: "".join(xs).encode("utf-8", "surrogatepass"))


@fuzz
@given(st.binary(max_size=300) | reply_like, st.lists(st.integers(0, 10**6), max_size=6))
def test_reply_parser_random_bytes(data: bytes, cuts: list[int]) -> None:
    """Whatever a daemon sends, a client gets replies or ReplyError, nothing else."""
    parser = M.ReplyParser(limit=256)
    try:
        for chunk in splits(data, cuts):
            parser.feed(chunk)
            while parser.next_reply() is not None:
                pass
    except M.ReplyError:
        pass
