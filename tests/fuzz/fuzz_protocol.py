"""Coverage-guided fuzzing (atheris / libFuzzer) of the sans-I/O protocol code.

Run directly::

    .venv/bin/python tests/fuzz/fuzz_protocol.py nbd -runs=30000 -seed=1 \
        -dict=tests/fuzz/nbd.dict
    .venv/bin/python tests/fuzz/fuzz_protocol.py mgmt -max_total_time=600 \
        -dict=tests/fuzz/mgmt.dict CORPUS_DIR

Targets: ``nbd`` feeds the NBD server handshake (``lbd.protocol``) whole and
split at fuzzer-chosen points; the two runs must give the same replies and
state, the replies must be well-framed option replies, and nothing may
raise.  ``mgmt`` feeds management request lines, the line reader and the
reply parser (``lbd.mgmtproto``): only their documented exceptions may come
out.  ``tests/test_fuzz_atheris.py`` runs both with a bounded number of
inputs; ``docs/reliability.md`` has the figures.
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports():
    from lbd import mgmtproto as M
    from lbd import protocol as P

EXPORT = P.Export("disk", 1 << 20, P.TF_HAS_FLAGS | P.TF_SEND_FLUSH, "a test disk")
PRELUDES = [b"", struct.pack(">I", 3), struct.pack(">IQ", 3, P.IHAVEOPT),
            struct.pack(">I", 1) + struct.pack(">QII", P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)]


def _run(chunks: list[bytes]) -> tuple[bytes, P.ServerHandshake]:
    hs = P.ServerHandshake(lambda n: EXPORT if n == "disk" else None, lambda: [EXPORT])
    hs.start()
    out = b""
    for c in chunks:
        if hs.state != P.NEED_DATA:
            hs.leftover += c
            continue
        hs.receive_data(c)
        out += hs.step()
    return out, hs


def _check_framing(out: bytes, hs: P.ServerHandshake, no_zeroes: bool) -> None:
    if hs.state == P.DONE and out[-134:-124] == struct.pack(">QH", EXPORT.size,
                                                            EXPORT.flags) and not no_zeroes:
        out = out[:-134]
    elif hs.state == P.DONE and not out.endswith(struct.pack(">QII", P.OPT_REPLY_MAGIC,
                                                               P.OPT_GO, P.REP_ACK) + bytes(4)):
        assert out[-10:] == struct.pack(">QH", EXPORT.size, EXPORT.flags), out[-40:]
        out = out[:-10]
    pos = 0
    while pos < len(out):
        magic, _opt, rtype, length = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPT_REPLY_MAGIC, (pos, out)
        assert rtype in (P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT) \
            or rtype >= 1 << 31
        pos += 20 + length
    assert pos == len(out)


def nbd_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    prelude = PRELUDES[fdp.ConsumeIntInRange(0, len(PRELUDES) - 1)]
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 6), 0, 4096))
    body = prelude + fdp.ConsumeBytes(fdp.remaining_bytes())
    whole, hs = _run([body])
    pieces, prev = [], 0
    for c in cuts:
        c = min(c, len(body))
        pieces.append(body[prev:max(c, prev)])
        prev = max(c, prev)
    pieces.append(body[prev:])
    split, hs2 = _run(pieces)
    assert whole == split, "replies depend on how the input was split"
    assert (hs.state, hs.leftover, hs.negotiated, hs.close_reason) == \
        (hs2.state, hs2.leftover, hs2.negotiated, hs2.close_reason)
    if hs.state == P.CLOSED:
        assert hs.close_reason
    if hs.state == P.DONE:
        assert hs.negotiated is not None and body.endswith(hs.leftover)
    no_zeroes = len(body) >= 4 and bool(body[3] & P.FLAG_NO_ZEROES)
    _check_framing(whole, hs, no_zeroes)


def mgmt_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 2)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    if which == 0:
        for line in raw.split(b"\n"):
            try:
                req = M.parse_request(line)
            except M.RequestError as exc:
                assert exc.code in M.ERROR_CODES
                M.error(exc.code, exc.message)
                continue
            if req is not None:
                assert req.command in M.COMMANDS
                again = M.parse_request(M.encode_request(req.command, req.arg, req.token)[:-1]) \
                    if req.arg is None or req.arg.isprintable() else req
                assert again == req, (req, again)
    elif which == 1:
        reader = M.LineReader(64)
        try:
            for i in range(0, len(raw), 7):
                reader.feed(raw[i:i + 7])
                while (line := reader.next_line()) is not None:
                    assert b"\n" not in line and len(line) < 64
        except M.LineTooLong:
            pass
    else:
        parser = M.ReplyParser(limit=512)
        try:
            parser.feed(raw)
            while (r := parser.next_reply()) is not None:
                assert r.kind in ("OK", "TEXT", "ERR")
        except M.ReplyError:
            pass


def _plant_bug() -> None:
    """LBD_FUZZ_PLANT=1: a handshake that loses a byte fed on its own.

    The test suite runs this once to prove the harness finds what it is for.
    """
    receive = P.ServerHandshake.receive_data

    def lossy(self: P.ServerHandshake, data: bytes) -> None:
        receive(self, data if len(data) != 1 else b"")

    P.ServerHandshake.receive_data = lossy  # type: ignore[method-assign]


def main() -> None:
    if os.environ.get("LBD_FUZZ_PLANT"):
        _plant_bug()
    targets = {"nbd": nbd_target, "mgmt": mgmt_target}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(targets)}}} [libFuzzer options]")
    target = targets[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
