"""Requests at and past the limits, misbehaving clients, odd sizes, many clients.

Nothing a client sends may stop the server or disturb another client: a bad
request gets an error reply and its connection goes on; a protocol violation
closes that one connection.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

from support import nbdsh, random_file, require, run

MiB = 1 << 20
KiB = 1 << 10

PRELUDE = """
import json
def err_of(fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        return e.args[1]
    return None
"""


def sh_json(uri: str, script: str) -> object:
    require("nbdsh")
    out = run(["nbdsh", "-c", PRELUDE, "-c", "h.set_strict_mode(0)", "-u", uri,
               "-c", script]).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_max_size_requests_and_beyond(lbd_server, tmp_path: Path) -> None:
    """32 MiB (the advertised maximum) works; one sector more is refused with
    EOVERFLOW, and the refused write's payload is skipped, not parsed."""
    srv = lbd_server(["-s", "64M", "-E", str(tmp_path / "c.lbd")])
    res = sh_json(srv.uri, f"""
assert h.get_block_size(nbd.SIZE_MAXIMUM) == {32 * MiB}
big = bytes(range(256)) * ({32 * MiB} // 256)
h.pwrite(big, {16 * MiB})
r = [h.pread({32 * MiB}, {16 * MiB}) == big,
     err_of(h.pwrite, b'\\x77' * ({32 * MiB} + 512), 0),
     err_of(h.pread, {32 * MiB} + 512, 0),
     h.pread(4096, 0) == bytes(4096),  # nothing of the refused write landed
     h.pread(512, {16 * MiB}) == big[:512]]
h.pwrite(b'odd' * 7000001, 3)  # 21 MB, unaligned at both ends
r.append(h.pread(21000003, 3) == b'odd' * 7000001)
r.append(h.pread(3, 0) == bytes(3))
print(json.dumps(r))
""")
    assert res == [True, 75, 75, True, True, True, True]


def test_invalid_requests_get_einval(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    res = sh_json(srv.uri, """
r = [err_of(h.pread, 0, 0), err_of(h.pwrite, b'', 0), err_of(h.zero, 0, 0),
     err_of(h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE),  # a flag READ does not take
     err_of(h.pwrite, b'x' * 512, 0, nbd.CMD_FLAG_REQ_ONE),
     err_of(h.trim, 512, 0, nbd.CMD_FLAG_FAST_ZERO)]
h.pwrite(b'still fine', 0)
r.append(h.pread(10, 0).decode())
print(json.dumps(r))
""")
    assert res == [22, 22, 22, 22, 22, 22, "still fine"]


def test_df_and_structured_reads(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", 16 * MiB, seed=81)
    data = base.read_bytes()
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    (tmp_path / "want.bin").write_bytes(data[1000:101000])
    res = sh_json(srv.uri, f"""
assert h.can_df()
want = open({str(tmp_path / "want.bin")!r}, 'rb').read()
chunks = []
def cb(buf, off, status, err):
    chunks.append([len(buf), off, status])
    return 0
got = h.pread_structured(100000, 1000, cb, nbd.CMD_FLAG_DF)
print(json.dumps([got == want, chunks, h.pread(100000, 1000, nbd.CMD_FLAG_DF) == want]))
""")
    got_ok, chunks, df_ok = res  # type: ignore[misc]
    assert got_ok and df_ok
    assert sum(c[0] for c in chunks) == 100000
    assert chunks[0][1] == 1000


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def newstyle_go(s: socket.socket) -> None:
    """Fixed-newstyle handshake with NBD_OPT_EXPORT_NAME "" (no zeroes)."""
    hello = s.recv(18)
    assert hello[:8] == b"NBDMAGIC" and hello[8:16] == b"IHAVEOPT"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "server closed during EXPORT_NAME"
        reply += chunk


def server_alive(uri: str) -> None:
    assert run(["nbdinfo", "--size", uri]).stdout.strip()


def test_misbehaving_clients_do_not_hurt_the_server(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    require("nbdinfo", "nbdsh")
    # a well-behaved client, connected throughout
    good = raw_connect(srv.sock)
    newstyle_go(good)
    # 1. garbage instead of a handshake
    s = raw_connect(srv.sock)
    s.recv(18)
    s.sendall(os.urandom(4096))
    s.close()
    # 2. hang up in the middle of the handshake
    s = raw_connect(srv.sock)
    s.recv(5)
    s.close()
    # 3. a request with a bad magic: that connection is closed
    s = raw_connect(srv.sock)
    newstyle_go(s)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert s.recv(16) == b""
    s.close()
    # 4. half a request header, then gone
    s = raw_connect(srv.sock)
    newstyle_go(s)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536)[:13])
    s.close()
    # 5. a write whose payload never fully arrives
    s = raw_connect(srv.sock)
    newstyle_go(s)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 65536) + b"x" * 1000)
    s.close()
    # the server still serves, the half write did not land, the first client works
    server_alive(srv.uri)
    out = nbdsh(srv.uri, "print(h.pread(65536, 0) == bytes(65536))")
    assert out.strip() == "True"
    good.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 99, 0, 512))
    reply = b""
    while len(reply) < 16 + 512:
        chunk = good.recv(16 + 512 - len(reply))
        assert chunk
        reply += chunk
    assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 99)
    good.close()


def test_many_connections_at_once(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    require("nbdsh")
    out = run(["nbdsh", "-n", "-c", f"""
hs = []
for i in range(64):
    h = nbd.NBD()
    h.connect_uri({srv.uri!r})
    hs.append(h)
for i, h in enumerate(hs):
    h.pwrite(bytes([i]) * 4096, i * 4096)
for i, h in enumerate(hs):
    other = hs[(i + 1) % len(hs)]
    assert other.pread(4096, i * 4096) == bytes([i]) * 4096, i
for h in hs:
    h.shutdown()
print('ok')
"""]).stdout
    assert out.strip() == "ok"
    server_alive(srv.uri)


def test_odd_device_size(lbd_server, tmp_path: Path) -> None:
    """A size that is a multiple of 512 but not of 4096, over a flat image."""
    size = 16 * MiB + 1536
    base = random_file(tmp_path / "base.img", size, seed=82)
    srv = lbd_server(["-b", str(size // 512), "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    require("nbdinfo", "qemu-io", "nbdcopy")
    assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(size)
    p = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5e {size - 1024} 1024",
             "-c", f"read -P 0x5e {size - 1024} 1024", srv.uri])
    assert "verification failed" not in p.stdout
    nbdsh(srv.uri, f"h.pwrite(b'end', {size - 3})")
    m = json.loads(run(["nbdinfo", "--map=lbd:allocation-depth", "--json", srv.uri]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in m] == [
        (0, size - 1024, 2), (size - 1024, 1024, 1)]
    run(["nbdcopy", srv.uri, str(tmp_path / "out.img")])
    want = bytearray(base.read_bytes())
    want[size - 1024:] = b"\x5e" * 1024
    want[size - 3:] = b"end"
    assert (tmp_path / "out.img").read_bytes() == want


def test_large_sparse_device_64bit_offsets(lbd_server, tmp_path: Path) -> None:
    """A 64 GiB device (change file only): offsets past 4 GiB, block status
    answered in pieces, holes skipped by nbdcopy."""
    gib = 1 << 30
    size = 64 * gib
    srv = lbd_server(["-s", "64G", "-E", str(tmp_path / "c.lbd")])
    nbdsh(srv.uri, f"""
h.pwrite(b'a' * 4096, {4 * gib - 2048})  # across the 4 GiB line
h.pwrite(b'b' * 65536, {63 * gib})
h.zero({gib}, {10 * gib})
h.pwrite(b'c' * 512, {size - 512})
assert h.pread(4096, {4 * gib - 2048}) == b'a' * 4096
assert h.pread(512, {size - 512}) == b'c' * 512
""")
    require("nbdinfo", "nbdcopy", "qemu-img")

    def nbdmap(*opt: str) -> list[tuple[int, int, int]]:
        m = json.loads(run(["nbdinfo", *opt, "--json", srv.uri]).stdout)
        return [(e["offset"], e["length"], e["type"]) for e in m]

    assert nbdmap("--map") == [
        (0, 4 * gib - 2048, 3), (4 * gib - 2048, 4096, 0),
        (4 * gib + 2048, 59 * gib - 2048, 3), (63 * gib, 65536, 0),
        (63 * gib + 65536, gib - 65536 - 512, 3), (size - 512, 512, 0)]
    assert nbdmap("--map=lbd:allocation-depth") == [
        (0, 4 * gib - 2048, 0), (4 * gib - 2048, 4096, 1), (4 * gib + 2048, 6 * gib - 2048, 0),
        (10 * gib, gib, 1), (11 * gib, 52 * gib, 0), (63 * gib, 65536, 1),
        (63 * gib + 65536, gib - 65536 - 512, 0), (size - 512, 512, 1)]
    qm = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri]).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in qm if e["data"]] == [
        (4 * gib - 2048, 4096, True), (63 * gib, 65536, True), (size - 512, 512, True)]
    run(["nbdcopy", srv.uri, "null:"], timeout=60)
