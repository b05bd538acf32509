"""``lbd ctl``, the management client: output, messages and exit codes."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from support import LBD, lbd_exe, mgmt, random_file, run

from lbd import ctl as C

MiB = 1 << 20
SIZE = 16 * MiB


def ctl(srv: LBD | None, *args: str, address: str | None = None, cwd: Path | None = None,
        check: bool = True):  # type: ignore[no-untyped-def]
    addr = address or (srv.manage_address if srv else "127.0.0.1:1")
    import os
    import subprocess

    from support import TOOL_PATH

    p = subprocess.run([lbd_exe(), "ctl", "-a", addr, *args], capture_output=True, text=True,
                       timeout=60, cwd=cwd, env={**os.environ, "PATH": TOOL_PATH})
    if check and p.returncode != 0:
        raise AssertionError(f"lbd ctl {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def start(lbd_server, tmp_path: Path, *extra: str) -> LBD:  # type: ignore[no-untyped-def]
    base = random_file(tmp_path / "base.img", SIZE, seed=11)
    return lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c1.lbd"), *extra],
                      manage=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ping(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    p = ctl(srv, "ping")
    assert p.stdout == f"{srv.manage_address}: alive\n" and p.stderr == ""
    # a bare port means loopback
    assert ctl(None, "ping", address=str(srv.manage_port)).returncode == 0


def test_connection_refused(tmp_path: Path) -> None:
    port = free_port()
    p = ctl(None, "ping", address=f"127.0.0.1:{port}", check=False)
    assert p.returncode == C.EXIT_CONNECT == 3
    assert p.stderr == (f"lbd ctl: cannot connect to 127.0.0.1:{port}: connection refused "
                        f"(is lbd serve running with its management daemon at "
                        f"127.0.0.1:{port}?)\n")
    assert p.stdout == ""


def test_bad_address_is_a_usage_error() -> None:
    p = ctl(None, "ping", address="nowhere:port", check=False)
    assert p.returncode == 2 and "-a" in p.stderr and "Traceback" not in p.stderr


def test_info_text_and_json(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    text = ctl(srv, "info").stdout.splitlines()
    assert text == mgmt(srv, "DEVICE_INFO_STRINGS").lines
    assert text[0] == "device size: 32768 blocks (16777216 bytes / 0.015625 GB)"
    assert text[-1].startswith("restart: lbd serve -s 16777216 -f ")
    info = json.loads(ctl(srv, "info", "--json").stdout)
    assert [x["type"] for x in info["layers"]] == ["expandable", "flat", "null"]
    assert info["command"][:2] == ["lbd", "serve"]


def test_clients_and_flush(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    assert ctl(srv, "clients").stdout == ""
    assert json.loads(ctl(srv, "clients", "--json").stdout) == []
    assert ctl(srv, "flush").stdout == f"{srv.manage_address}: flushed\n"


def test_add_layer_relative_to_the_callers_directory(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    p = ctl(srv, "add-layer", "day2.lbd", cwd=sub)
    assert p.stdout.splitlines() == [
        f"layer 3: {sub / 'day2.lbd'} (created), writable top",
        f"layer 2: {tmp_path / 'c1.lbd'}, now read-only",
        f"restart with: lbd serve -s 16777216 -f {tmp_path / 'base.img'} -e "
        f"{tmp_path / 'c1.lbd'} -E {sub / 'day2.lbd'} --unix {srv.sock} -a 127.0.0.1:0",
    ]
    assert (sub / "day2.lbd").exists()
    r = json.loads(ctl(srv, "add-layer", "--json", str(tmp_path / "day3.lbd")).stdout)
    assert r["layer"]["index"] == 4 and r["flushed"] is True and r["writable"] is True


def test_add_layer_refused_exits_1(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    p = ctl(srv, "add-layer", str(tmp_path), check=False)
    assert p.returncode == C.EXIT_REFUSED == 1
    assert p.stderr == f"lbd ctl: add-layer: change file {tmp_path}: is a directory (BAD_LAYER)\n"
    assert p.stdout == ""


def test_shutdown_wait(lbd_server, tmp_path: Path) -> None:
    srv = start(lbd_server, tmp_path)
    p = ctl(srv, "shutdown", "--wait")
    assert p.stdout == f"{srv.manage_address}: shutting down\n{srv.manage_address}: stopped\n"
    assert srv.wait(30) == 0
    assert ctl(srv, "ping", check=False).returncode == 3


def test_token(lbd_server, tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("abc123\n")
    srv = start(lbd_server, tmp_path, "--manage-token", str(tok))
    p = ctl(srv, "ping", check=False)
    assert p.returncode == 1
    assert "requires a token" in p.stderr and "(AUTH)" in p.stderr
    assert ctl(srv, "--token", str(tok), "ping").returncode == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    p = ctl(srv, "--token", str(wrong), "ping", check=False)
    assert p.returncode == 1 and "wrong token" in p.stderr
    p = ctl(srv, "--token", str(tmp_path / "missing"), "ping", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def fake_daemon(answer: bytes) -> tuple[int, threading.Thread]:
    """A listener that reads one request and answers ``answer`` (then closes)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.recv(1000)
            conn.sendall(answer)
        lsock.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


def test_invalid_reply_exits_4() -> None:
    port, t = fake_daemon(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    p = ctl(None, "ping", address=f"127.0.0.1:{port}", check=False)
    t.join(10)
    assert p.returncode == C.EXIT_PROTOCOL == 4
    assert "sent an invalid reply to PING" in p.stderr


def test_closed_without_reply_exits_3() -> None:
    port, t = fake_daemon(b"")
    p = ctl(None, "info", address=f"127.0.0.1:{port}", check=False)
    t.join(10)
    assert p.returncode == 3
    assert "closed the connection without replying to DEVICE_INFO_STRINGS" in p.stderr


def test_help_lists_the_commands() -> None:
    out = run([lbd_exe(), "ctl", "--help"]).stdout
    for cmd in ("ping", "shutdown", "info", "add-layer", "clients", "flush"):
        assert cmd in out
    assert "Exit codes" in out
