"""Flow control of the NBD server's reply queue."""

from __future__ import annotations

from pathlib import Path

from support import make_file, nbdsh


def test_more_reply_data_than_the_high_water_mark_on_one_connection(
        tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    """Regression: partly sent replies were under-counted, so after ~64 MiB of
    reads on one connection the server stopped reading requests for good."""
    base = make_file(tmp_path / "base.img", 32 << 20, b"\x5a")
    srv = lbd_server(["-s", "32M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    out = nbdsh(srv.uri, """
total = 0
for i in range(3 * 128):  # 3 passes over 32 MiB in 256 KiB reads: 96 MiB of replies
    buf = h.pread(262144, (i % 128) * 262144)
    assert buf == b"\\x5a" * 262144, i
    total += len(buf)
print(total)
""")
    assert int(out) == 96 << 20


def test_a_client_that_never_reads_its_replies_cannot_hold_shutdown(
        tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    import socket
    import struct
    import time

    base = make_file(tmp_path / "base.img", 64 << 20, b"\x11")
    srv = lbd_server(["-s", "64M", "-f", str(base)], extra_env={"LBD_SHUTDOWN_GRACE": "2"})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(srv.sock)
    greeting = b""
    while len(greeting) < 18:
        greeting += s.recv(18 - len(greeting))
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
    reply = b""
    while len(reply) < 10:
        reply += s.recv(10 - len(reply))
    # 256 MiB of reads whose replies are never read
    s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 64) << 20, 1 << 20)
                       for i in range(256)))
    time.sleep(0.5)
    t0 = time.monotonic()
    assert srv.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 15
    assert "closing them" in srv.log()
    s.close()


def test_requests_sent_after_a_stop_get_eshutdown_then_the_connection_closes(
        tmp_path: Path, lbd_server) -> None:  # type: ignore[no-untyped-def]
    """At SIGTERM the server answers what it already read, refuses new requests
    with NBD_ESHUTDOWN (it keeps reading, so a client still sending never gets
    EPIPE and loses replies), and closes once the client is quiet."""
    import os
    import signal
    import socket
    import struct
    import time

    def recv_exact(s: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            assert chunk, f"server closed after {len(data)} of {n} bytes"
            data += chunk
        return data

    base = make_file(tmp_path / "base.img", 16 << 20, b"\x22")
    srv = lbd_server(["-s", "16M", "-f", str(base)])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(srv.sock)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
    recv_exact(s, 10)  # size and flags: EXPORT_NAME "" with NO_ZEROES
    read = struct.Struct(">IHHQQI")
    reply = struct.Struct(">IIQ")
    s.sendall(read.pack(0x25609513, 0, 0, 1, 0, 4096))
    assert reply.unpack(recv_exact(s, 16)) == (0x67446698, 0, 1)
    assert recv_exact(s, 4096) == b"\x22" * 4096

    os.kill(srv.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while "shutting down" not in srv.log():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)
    s.sendall(read.pack(0x25609513, 0, 0, 2, 4096, 4096))
    assert reply.unpack(recv_exact(s, 16)) == (0x67446698, 108, 2)  # NBD_ESHUTDOWN
    assert s.recv(1) == b""  # then it closes: the client was quiet
    assert srv.wait(30) == 0
    assert "1 more refused: shutting down" in srv.log()
    s.close()
