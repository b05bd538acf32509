"""LBD over TCP (``-l 127.0.0.1:0``) with real clients, next to its Unix socket."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support import nbdsh, random_file, require, run

MiB = 1 << 20
SIZE = 16 * MiB


def test_tcp_nbdinfo(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=71)
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")], tcp=True)
    assert srv.port and srv.port > 0
    assert srv.tcp_uri == f"nbd://127.0.0.1:{srv.port}/"
    require("nbdinfo")
    info = json.loads(run(["nbdinfo", "--json", srv.tcp_uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    e = info["exports"][0]
    assert e["export-size"] == SIZE
    assert e["is_read_only"] is False
    assert sorted(e["contexts"]) == ["base:allocation", "lbd:allocation-depth"]
    assert run(["nbdinfo", "--size", srv.tcp_uri]).stdout.strip() == str(SIZE)


def test_tcp_export_name(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")], tcp=True, export="tcpdisk")
    info = json.loads(run(["nbdinfo", "--json", srv.tcp_uri]).stdout)
    assert info["exports"][0]["export-name"] == "tcpdisk"
    p = run(["nbdinfo", f"nbd://127.0.0.1:{srv.port}/other"], check=False)
    assert p.returncode != 0


def test_tcp_and_unix_see_the_same_device(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")], tcp=True)
    nbdsh(srv.tcp_uri, "h.pwrite(b'tcp!' * 1024, 65536)\nh.flush()")
    out = nbdsh(srv.uri, "print(h.pread(4096, 65536) == b'tcp!' * 1024)")
    assert out.strip() == "True"
    nbdsh(srv.uri, "h.pwrite(b'unix' * 1024, 0)\nh.flush()")
    out = nbdsh(srv.tcp_uri, "print(h.pread(4096, 0) == b'unix' * 1024)")
    assert out.strip() == "True"


def test_tcp_qemu_io(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")], tcp=True)
    require("qemu-io")
    p = run(["qemu-io", "-f", "raw", "-c", "write -P 0xc3 1M 2M", "-c", "read -P 0xc3 1M 2M",
             "-c", "read -P 0 0 1M", srv.tcp_uri])
    assert "verification failed" not in p.stdout, p.stdout


def test_tcp_nbdcopy_multi_conn(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", SIZE, seed=72)
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")], tcp=True)
    require("nbdcopy")
    src = random_file(tmp_path / "src.img", 4 * MiB, seed=73)
    with open(src, "r+b") as f:
        f.truncate(SIZE)
        os.pwrite(f.fileno(), b"\x01" * 4096, SIZE - 4096)
    run(["nbdcopy", "-C", "4", str(src), srv.tcp_uri])
    run(["nbdcopy", "-C", "4", srv.tcp_uri, str(tmp_path / "out.img")])
    assert (tmp_path / "out.img").read_bytes() == src.read_bytes()


def test_two_unix_sockets_and_tcp(lbd_server, tmp_path: Path) -> None:
    """Several listeners at once (--unix twice, -l): one device behind all."""
    import tempfile

    d = tempfile.mkdtemp(prefix="lbdt-")
    second = os.path.join(d, "second.sock")
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd"), "--unix", second], tcp=True)
    nbdsh(f"nbd+unix:///?socket={second}", "h.pwrite(b'2nd!' * 128, 0)")
    for uri in (srv.uri, srv.tcp_uri, f"nbd+unix:///?socket={second}"):
        assert nbdsh(uri, "print(h.pread(512, 0) == b'2nd!' * 128)").strip() == "True", uri
    assert srv.stop() == 0
    assert not os.path.exists(second)  # removed at exit
    os.rmdir(d)
