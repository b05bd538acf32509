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
