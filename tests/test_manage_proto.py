"""The management protocol on bytes alone (lbd.mgmtproto): requests, replies, framing."""

from __future__ import annotations

import pytest

from lbd import mgmtproto as M

# -- requests ----------------------------------------------------------------------------------

REQUESTS = [
    (b"PING", M.Request("PING")),
    (b"ping", M.Request("PING")),
    (b"PING\r", M.Request("PING")),
    (b"PING  ", M.Request("PING")),  # trailing blanks after a command without argument
    (b"DEVICE_INFO_STRINGS", M.Request("DEVICE_INFO_STRINGS")),
    (b"LIVE_ADD_LAYER /tmp/new.lbd", M.Request("LIVE_ADD_LAYER", "/tmp/new.lbd")),
    # the rest of the line, as is: spaces inside and at the end belong to the path
    (b"LIVE_ADD_LAYER /tmp/my disk/new layer.lbd",
     M.Request("LIVE_ADD_LAYER", "/tmp/my disk/new layer.lbd")),
    (b"LIVE_ADD_LAYER /tmp/x ", M.Request("LIVE_ADD_LAYER", "/tmp/x ")),
    # a leading quote: a JSON string, for anything else
    (b'LIVE_ADD_LAYER "/tmp/a\\nb"', M.Request("LIVE_ADD_LAYER", "/tmp/a\nb")),
    (b'LIVE_ADD_LAYER "\\"quoted\\""', M.Request("LIVE_ADD_LAYER", '"quoted"')),
    (b'LIVE_ADD_LAYER " lead"', M.Request("LIVE_ADD_LAYER", " lead")),
    (b"TOKEN s3cret PING", M.Request("PING", None, "s3cret")),
    (b"token s3cret LIVE_ADD_LAYER /a b", M.Request("LIVE_ADD_LAYER", "/a b", "s3cret")),
    # bytes that are not UTF-8 survive the round trip (Linux paths are bytes)
    (b"LIVE_ADD_LAYER /tmp/\xff.lbd", M.Request("LIVE_ADD_LAYER", "/tmp/\udcff.lbd")),
]


@pytest.mark.parametrize(("line", "request_"), REQUESTS)
def test_parse_request(line: bytes, request_: M.Request) -> None:
    assert M.parse_request(line) == request_


@pytest.mark.parametrize(("line", "request_"), REQUESTS)
def test_encode_request_round_trips(line: bytes, request_: M.Request) -> None:
    data = M.encode_request(request_.command, request_.arg, request_.token)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert M.parse_request(data[:-1]) == request_


@pytest.mark.parametrize("arg", ["/plain/path.lbd", "/with space/x", " lead", "trail ", '"q',
                                 "a\nb", "tab\there", "\x7f", "é/ü.lbd", "/tmp/\udcfe"])
def test_encode_arg_round_trips_any_path(arg: str) -> None:
    data = M.encode_request("LIVE_ADD_LAYER", arg)
    req = M.parse_request(data[:-1])
    assert req is not None and req.arg == arg


def test_plain_paths_are_sent_as_is() -> None:
    assert M.encode_request("LIVE_ADD_LAYER", "/a b/c.lbd") == b"LIVE_ADD_LAYER /a b/c.lbd\n"
    assert M.encode_request("PING", token="t0k") == b"TOKEN t0k PING\n"


@pytest.mark.parametrize("line", [b"", b"   ", b"\r"])
def test_blank_lines_are_no_request(line: bytes) -> None:
    assert M.parse_request(line) is None


BAD = [
    (b"FROB", M.UNKNOWN_COMMAND),
    (b"\xff\xfe garbage", M.BAD_REQUEST),
    (b"PING\0", M.BAD_REQUEST),
    (b"PING extra", M.BAD_REQUEST),
    (b"SHUTDOWN now", M.BAD_REQUEST),
    (b"LIVE_ADD_LAYER", M.BAD_REQUEST),
    (b"LIVE_ADD_LAYER ", M.BAD_REQUEST),
    (b'LIVE_ADD_LAYER ""', M.BAD_REQUEST),
    (b'LIVE_ADD_LAYER "unterminated', M.BAD_REQUEST),
    (b"LIVE_ADD_LAYER \"a\" trailing", M.BAD_REQUEST),
    (b"LIVE_ADD_LAYER \"\\u0000\"", M.BAD_REQUEST),
    (b"LIVE_ADD_LAYER 42x", None),  # fine: a relative path called "42x"
    (b"TOKEN", M.BAD_REQUEST),
    (b"TOKEN onlysecret", M.BAD_REQUEST),
    (b" PING", M.BAD_REQUEST),  # no leading blanks: the first word is the command
    (b"GET / HTTP/1.1", M.UNKNOWN_COMMAND),
]


@pytest.mark.parametrize(("line", "code"), BAD)
def test_bad_requests(line: bytes, code: str | None) -> None:
    if code is None:
        assert M.parse_request(line) is not None
        return
    with pytest.raises(M.RequestError) as info:
        M.parse_request(line)
    assert info.value.code == code
    assert "\n" not in info.value.message


def test_token_rules() -> None:
    assert M.token_from_file_text("  abc-123_XYZ\n") == "abc-123_XYZ"
    for bad in ["", "two words", "x" * (M.MAX_TOKEN + 1), "caf\u00e9"]:
        with pytest.raises(ValueError):
            M.token_from_file_text(bad)
    with pytest.raises(ValueError):
        M.encode_request("PING", token="has space")
    with pytest.raises(ValueError):
        M.encode_request("BAD NAME")


# -- lines -------------------------------------------------------------------------------------


def test_line_reader_whole_and_byte_by_byte() -> None:
    data = b"PING\nLIVE_ADD_LAYER /x y\n\nHELP\r\npartial"
    want = [b"PING", b"LIVE_ADD_LAYER /x y", b"", b"HELP\r"]
    r = M.LineReader(100)
    r.feed(data)
    got = []
    while (line := r.next_line()) is not None:
        got.append(line)
    assert got == want and r.pending == len(b"partial")
    r = M.LineReader(100)
    got = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        while (line := r.next_line()) is not None:
            got.append(line)
    assert got == want


def test_line_reader_limit() -> None:
    r = M.LineReader(10)
    r.feed(b"123456789\n")  # exactly the limit, LF included
    assert r.next_line() == b"123456789"
    r.feed(b"12345")
    assert r.next_line() is None
    r.feed(b"67890")
    with pytest.raises(M.LineTooLong):
        r.next_line()
    r = M.LineReader(10)
    r.feed(b"1234567890\n")  # the line feed arrived, but too late
    with pytest.raises(M.LineTooLong):
        r.next_line()


def test_line_reader_does_not_rescan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long line arriving in small pieces costs linear time, not quadratic."""
    r = M.LineReader(1 << 20)
    for _ in range(4096):
        r.feed(b"x" * 100)
        assert r.next_line() is None
    assert r._scanned == r.pending


# -- replies ------------------------------------------------------------------------------------


def replies(data: bytes, step: int | None = None) -> list[M.Reply]:
    p = M.ReplyParser()
    out = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for c in chunks:
        p.feed(c)
        while (rep := p.next_reply()) is not None:
            out.append(rep)
    return out


def test_reply_encodings() -> None:
    assert M.ok(True) == b"OK true\n"
    assert M.ok({"a": [1, "x\ny"]}) == b'OK {"a":[1,"x\\ny"]}\n'
    assert M.text(["one", "two\nthree"]) == b"TEXT 2\none\ntwo three\n"
    assert M.text([]) == b"TEXT 0\n"
    assert M.error(M.BAD_LAYER, "no\nway") == b"ERR BAD_LAYER no way\n"
    with pytest.raises(ValueError):
        M.error("NOPE", "x")


@pytest.mark.parametrize("step", [None, 1, 3])
def test_reply_parser(step: int | None) -> None:
    data = (M.ok(True) + M.text(["a", "", "TEXT 5", "OK not json"]) + M.text([])
            + M.error(M.AUTH, "wrong token; closing") + M.ok({"é": "\udcff"}))
    got = replies(data, step)
    assert [r.kind for r in got] == ["OK", "TEXT", "TEXT", "ERR", "OK"]
    assert got[0].value is True and got[0].ok
    assert got[1].lines == ["a", "", "TEXT 5", "OK not json"]
    assert got[2].lines == []
    assert (got[3].code, got[3].message, got[3].ok) == ("AUTH", "wrong token; closing", False)
    assert got[4].value == {"é": "\udcff"}


@pytest.mark.parametrize("data", [b"HELLO\n", b"OK {nope\n", b"TEXT x\n", b"ERR\n", b"ok true\n"])
def test_reply_parser_rejects_garbage(data: bytes) -> None:
    with pytest.raises(M.ReplyError):
        replies(data)


def test_reply_parser_incomplete_text_waits() -> None:
    p = M.ReplyParser()
    p.feed(b"TEXT 2\nfirst\n")
    assert p.next_reply() is None
    p.feed(b"second\n")
    rep = p.next_reply()
    assert rep is not None and rep.lines == ["first", "second"]


def test_every_command_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "management.md").read_text()
    for name in M.COMMANDS:
        assert f"`{name}" in doc, name
    for code in M.ERROR_CODES:
        assert f"`{code}`" in doc, code
