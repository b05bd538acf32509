"""``lbd serve --oldstyle``: the pre-2011 handshake, for very old clients.

libnbd still speaks oldstyle (it recognises the magic), so nbdinfo and nbdsh
are used as real clients; a raw-socket client checks the exact bytes of the
oldstyle greeting and a few simple-reply requests.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

from support import nbdsh, random_file, require, run

MiB = 1 << 20
SIZE = 16 * MiB

NBDMAGIC = 0x4E42444D41474943
OLDSTYLE_MAGIC = 0x00420281861253
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH = 1, 2, 4
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class OldstyleClient:
    """A minimal oldstyle NBD client on a Unix socket."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(path)
        greeting = recv_exact(self.s, 152)
        magic, cliserv, self.size, self.flags = struct.unpack(">QQQI", greeting[:28])
        assert magic == NBDMAGIC, hex(magic)
        assert cliserv == OLDSTYLE_MAGIC, hex(cliserv)
        assert greeting[28:] == bytes(124)
        self.handle = 0

    def request(self, cmd: int, offset: int = 0, length: int = 0,
                payload: bytes = b"") -> tuple[int, bytes]:
        self.handle += 1
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset,
                                   length) + payload)
        magic, error, handle = struct.unpack(">IIQ", recv_exact(self.s, 16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert handle == self.handle
        data = recv_exact(self.s, length) if cmd == CMD_READ and error == 0 else b""
        return error, data

    def disconnect(self) -> None:
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        assert self.s.recv(1) == b""  # the server hangs up
        self.s.close()


def test_oldstyle_nbdinfo(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=61)
    srv = lbd_server(["-s", "16M", "-f", str(base), "--oldstyle"])
    require("nbdinfo")
    info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    assert info["protocol"] == "oldstyle"
    e = info["exports"][0]
    assert e["export-size"] == SIZE
    assert e["is_read_only"] is True
    assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(SIZE)


def test_oldstyle_nbdsh_read_write(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=62)
    data = base.read_bytes()
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd"),
                      "--oldstyle"])
    out = nbdsh(srv.uri, f"""
assert h.get_protocol() == 'oldstyle', h.get_protocol()
assert h.get_size() == {SIZE}
assert not h.is_read_only()
assert h.can_flush() and h.can_trim() and h.can_zero()
assert h.pread(4096, 8192) == {data[8192:12288]!r}
h.pwrite(b'old' * 1000, 1000)
h.flush()
assert h.pread(3000, 1000) == b'old' * 1000
h.trim(65536, {1 * MiB})
assert h.pread(65536, {1 * MiB}) == bytes(65536)
print('ok')
""")
    assert out.strip() == "ok"


def test_oldstyle_raw_client(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=63)
    data = base.read_bytes()
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd"),
                      "--oldstyle"])
    c = OldstyleClient(srv.sock)
    assert c.size == SIZE
    assert c.flags >> 16 == 0  # the high half is reserved
    assert c.flags & TF_HAS_FLAGS and c.flags & TF_SEND_FLUSH
    assert not c.flags & TF_READ_ONLY
    assert c.request(CMD_READ, 512, 4096) == (0, data[512:4608])
    assert c.request(CMD_WRITE, 4096, 1024, b"\x42" * 1024) == (0, b"")
    assert c.request(CMD_FLUSH) == (0, b"")
    assert c.request(CMD_READ, 4000, 1200) == (0, data[4000:4096] + b"\x42" * 1024 +
                                               data[5120:5200])
    assert c.request(CMD_READ, SIZE, 512)[0] == 22  # EINVAL past the end, simple reply
    assert c.request(CMD_READ, 0, 16) == (0, data[:16])  # and the connection goes on
    c.disconnect()


def test_oldstyle_raw_client_read_only(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=64)
    srv = lbd_server(["-s", "16M", "-f", str(base), "--oldstyle"])
    c = OldstyleClient(srv.sock)
    assert c.size == SIZE
    assert c.flags & TF_READ_ONLY
    assert c.request(CMD_WRITE, 0, 512, b"x" * 512)[0] == 1  # EPERM
    c.disconnect()


def test_oldstyle_with_export_name(lbd_server, tmp_path: Path) -> None:
    """Oldstyle has no export names: a server given -x still serves its one
    export to oldstyle clients."""
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd"), "--oldstyle"],
                     export="named")
    c = OldstyleClient(srv.sock)
    assert c.size == SIZE
    c.disconnect()
    require("nbdinfo")
    out = run(["nbdinfo", "--size", f"nbd+unix:///?socket={srv.sock}"]).stdout
    assert out.strip() == str(SIZE)
