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
