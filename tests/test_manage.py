"""The management daemon over real sockets, against a running ``lbd serve``.

Every request (PING, SHUTDOWN, DEVICE_INFO_STRINGS, DEVICE_INFO, CLIENTS,
FLUSH, HELP, LIVE_ADD_LAYER and its refusals), the token, the address
options, and clients that misbehave: idle, garbage, a 10 MB line, vanishing
mid-request, never reading replies, too many of them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    LBD,
    TOOL_PATH,
    MgmtConn,
    lbd_exe,
    mgmt,
    nbdsh,
    random_file,
    require,
    run,
)

from lbd import mgmtproto as M

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB


def serve(lbd_server, tmp_path: Path, *flags: str, **kw: Any) -> LBD:  # type: ignore[no-untyped-def]
    return lbd_server(["-s", "16M", *flags], manage=True, **kw)


def stack(tmp_path: Path) -> tuple[Path, Path]:
    base = random_file(tmp_path / "base.img", SIZE, seed=7)
    return base, tmp_path / "c1.lbd"


def layers(info: dict[str, Any]) -> list[tuple[int, str, bool, str]]:
    return [(x["index"], x["type"], x["writable"], x["param"]) for x in info["layers"]]


def layer_args(info: dict[str, Any]) -> list[str]:
    """The layer flags (and size) of DEVICE_INFO's restart command line."""
    argv = info["command"]
    assert argv[:4] == ["lbd", "serve", "-s", str(info["size"])]
    out = []
    i = 4
    while i < len(argv):
        if argv[i] in ("-f", "-F", "-e", "-E"):
            out += argv[i:i + 2]
        i += 2 if argv[i].startswith("-") and i + 1 < len(argv) and \
            not argv[i + 1].startswith("-") else 1
    return out


def ok(reply: M.Reply) -> Any:
    assert reply.kind == "OK", f"{reply.kind} {reply.code} {reply.message}"
    return reply.value


def refused(reply: M.Reply, code: str) -> str:
    assert (reply.kind, reply.code) == ("ERR", code), reply
    return reply.message


def pread_sha(uri: str, offset: int, length: int) -> str:
    out = nbdsh(uri, f"import hashlib; print(hashlib.sha256(h.pread({length}, {offset}))"
                     ".hexdigest())")
    return out.strip()


def file_sha(path: Path, offset: int, length: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


# -- PING, HELP, framing ------------------------------------------------------------------------


def test_ping_is_exactly_ok_true(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    with socket.create_connection(("127.0.0.1", srv.manage_port), timeout=10) as s:
        s.sendall(b"PING\n")
        assert s.recv(100) == b"OK true\n"
        s.sendall(b"ping\r\n")  # what nc -C or a telnet sends
        assert s.recv(100) == b"OK true\n"


def test_pipelined_requests_are_answered_in_order(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    with MgmtConn(srv.manage_address) as c:
        c.send(b"PING\n\nHELP\nFROB\nCLIENTS\nDEVICE_INFO_STRINGS\nPING\n")
        kinds = [c.reply() for _ in range(6)]
    assert [r.kind for r in kinds] == ["OK", "TEXT", "ERR", "OK", "TEXT", "OK"]
    help_text = "\n".join(kinds[1].lines)
    for name in M.COMMANDS:
        assert name in help_text
    assert kinds[2].code == M.UNKNOWN_COMMAND
    assert kinds[3].value == []
    assert kinds[4].lines[0].startswith("device size:")


# -- DEVICE_INFO_STRINGS / DEVICE_INFO / CLIENTS / FLUSH -------------------------------------


def test_device_info_strings(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1), "--description", "a test",
                tcp=True, export="disk")
    require("qemu-io")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", srv.uri])
    reply = mgmt(srv, "DEVICE_INFO_STRINGS")
    assert reply.kind == "TEXT"
    lines = reply.lines
    assert lines[0] == "device size: 32768 blocks (16777216 bytes / 0.015625 GB)"
    assert lines[1] == (f"server type: NBDServer (nbd://127.0.0.1:{srv.port}/disk, "
                        f"nbd+unix:///disk?socket={srv.sock})")
    assert lines[2] == f"management port: {srv.manage_port} (127.0.0.1:{srv.manage_port})"
    assert lines[3] == "layers:"
    assert lines[4] == f"    2: type=        expandable, writable= true, param={c1}"
    assert re.fullmatch(r"       reads \d+ \(\d+ bytes\), writes 1 \(1048576 bytes\); "
                        r"file \d+ bytes: live 1048576, dead 0, zero 0, 1 extents", lines[5])
    assert lines[6] == f"    1: type=              flat, writable=false, param={base}"
    assert re.fullmatch(r"       reads \d+ \(\d+ bytes\), writes 0 \(0 bytes\)", lines[7])
    assert lines[8] == "    0: type=              null, writable=false, param=null"
    assert lines[9] == "clients: 0"
    restart = lines[10]
    assert restart.startswith("restart: ")
    assert shlex.split(restart[len("restart: "):]) == [
        "lbd", "serve", "-s", str(SIZE), "-f", str(base), "-E", str(c1),
        "-l", "127.0.0.1:0", "--unix", srv.sock, "-x", "disk", "--description", "a test",
        "-a", "127.0.0.1:0"]
    assert len(lines) == 11


def test_device_info_json_stats_and_clients(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    require("nbdsh")
    # a client that stays connected while we look
    holder = subprocess.Popen(
        ["nbdsh", "-u", srv.uri, "-c",
         "import sys; h.pwrite(b'\\x11' * 65536, 0); h.flush(); print('ready', flush=True); "
         "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": TOOL_PATH})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        info = ok(mgmt(srv, "DEVICE_INFO"))
        clients = ok(mgmt(srv, "CLIENTS"))
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert info["size"] == SIZE and info["blocks"] == SIZE // 512 and info["block_size"] == 512
    assert info["writable"] is True and info["state"] == "running"
    assert info["pid"] == srv.proc.pid
    assert info["frontends"] == [{"type": "nbd", "server": "NBDServer", "export": "",
                                  "description": "", "readonly": False, "oldstyle": False,
                                  "addresses": [f"nbd+unix:///?socket={srv.sock}"]}]
    assert info["management"]["addresses"] == [srv.manage_address]
    assert info["management"]["token"] is False
    assert layers(info) == [(2, "expandable", True, str(c1)), (1, "flat", False, str(base)),
                            (0, "null", False, "null")]
    top = info["layers"][0]
    assert top["stats"]["writes"] == 1 and top["stats"]["written_bytes"] == 64 * KiB
    assert top["space"]["live_bytes"] == 64 * KiB and len(top["uuid"]) == 32
    assert info["layers"][1]["stats"]["written_bytes"] == 0
    assert len(info["clients"]) == 1 and info["clients"] == clients
    client = clients[0]
    assert client["peer"] == "unix" and client["readonly"] is False
    assert client["requests"] >= 2  # the write and the flush
    assert info["command"] == ["lbd", "serve", "-s", str(SIZE), "-f", str(base), "-E", str(c1),
                               "--unix", srv.sock, "-a", "127.0.0.1:0"]
    assert info["command_line"] == shlex.join(info["command"])
    json.dumps(info)  # all of it is JSON


def test_flush(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", srv.uri])
    assert ok(mgmt(srv, "FLUSH")) is True
    assert "FLUSH" in srv.log()


# -- SHUTDOWN -----------------------------------------------------------------------------------


def test_shutdown_replies_then_stops_gracefully(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    require("nbdsh", "qemu-io")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 2M", srv.uri])  # no flush
    # an NBD client connected (idle) during the shutdown does not hold it up
    holder = subprocess.Popen(["nbdsh", "-u", srv.uri, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "PATH": TOOL_PATH})
    try:
        deadline = time.monotonic() + 20
        while not ok(mgmt(srv, "CLIENTS")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with MgmtConn(srv.manage_address) as c:
            c.send(b"SHUTDOWN\n")
            assert c.sock.recv(100) == b"OK true\n"
            assert c.at_eof()  # and the daemon hangs up
        assert srv.wait(30) == 0
    finally:
        holder.kill()
        holder.wait()
    log = srv.log()
    assert "SHUTDOWN requested" in log and "stopped cleanly" in log
    assert not os.path.exists(srv.sock)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.manage_port), timeout=5)
    # everything was flushed and closed cleanly: the change file reopens as it was
    again = serve(lbd_server, tmp_path, "-f", str(base), "-e", str(c1))
    out = nbdsh(again.uri, "print(h.pread(2 * 1048576, 1048576) == b'\\x77' * 2 * 1048576, "
                           f"h.pread(65536, 0) == open({str(base)!r}, 'rb').read(65536))")
    assert out.split() == ["True", "True"]


SHUTDOWN_MID_WRITES = """
import socket
N = 64
bufs = [nbd.Buffer.from_bytearray(bytearray([0x5c]) * 262144) for _ in range(N)]
cookies = [h.aio_pwrite(bufs[i], i * 262144) for i in range(N)]
state = {{}}
def collect():
    for i, c in enumerate(cookies):
        if i not in state:
            try:
                if h.aio_command_completed(c):
                    state[i] = "ok"
            except nbd.Error as e:
                state[i] = e.errno
while len(state) < 4:
    h.poll(-1)
    collect()
s = socket.create_connection(("127.0.0.1", {port}))
s.sendall(b"SHUTDOWN\\n")
assert s.recv(100) == b"OK true\\n"
while len(state) < N and not (h.aio_is_dead() or h.aio_is_closed()):
    try:
        h.poll(-1)
    except nbd.Error:
        pass
    collect()
collect()
print(" ".join(str(i) for i, v in sorted(state.items()) if v == "ok"))
print(sorted(set(v for v in state.values() if v != "ok")))
"""


def test_shutdown_while_writes_are_in_flight(lbd_server, tmp_path: Path) -> None:
    """Writes the server took are finished and answered; every answered one is kept."""
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    out = nbdsh(srv.uri, SHUTDOWN_MID_WRITES.format(port=srv.manage_port)).splitlines()
    done = [int(i) for i in out[0].split()]
    # requests sent after the stop are refused with ESHUTDOWN; any the server
    # never read fail with ENOTCONN on the client
    assert len(done) >= 4 and set(ast.literal_eval(out[1])) <= {"ESHUTDOWN", "ENOTCONN"}
    assert srv.wait(30) == 0
    taken = re.search(r"conn \d+ \(unix\): closed after (\d+) requests", srv.log())
    assert taken is not None and int(taken.group(1)) == len(done)  # all it served, it answered
    again = serve(lbd_server, tmp_path, "-f", str(base), "-e", str(c1))
    check = "; ".join(f"assert h.pread(262144, {i * 262144}) == b'\\x5c' * 262144"
                      for i in done)
    nbdsh(again.uri, check)


def test_requests_while_stopping(lbd_server, tmp_path: Path) -> None:
    """Two SHUTDOWNs at once: both answered, one stop."""
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    with MgmtConn(srv.manage_address) as a, MgmtConn(srv.manage_address) as b:
        a.send(b"SHUTDOWN\n")
        b.send(b"SHUTDOWN\n")
        assert ok(a.reply()) is True
        assert ok(b.reply()) is True
    assert srv.wait(30) == 0
    assert srv.log().count("SHUTDOWN requested") == 1


# -- LIVE_ADD_LAYER -------------------------------------------------------------------------------


ADD_AND_WRITE = """
import socket, json
def ctl(line):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.sendall(line.encode() + b"\\n")
    data = b""
    while not data.endswith(b"\\n"):
        data += s.recv(65536)
    s.close()
    return data.decode()
a = b"\\xaa" * 65536
b = b"\\xbb" * 65536
h.pwrite(a, 0)
h.pwrite(a, 131072)
reply = ctl("LIVE_ADD_LAYER {path}")
assert reply.startswith("OK "), reply
h.pwrite(b, 65536)
h.pwrite(b, 131072)
assert h.pread(196608, 0) == a + b + b
print("ok")
"""


def test_live_add_layer_splits_writes_at_the_switch(lbd_server, tmp_path: Path) -> None:
    """One connection writes, the layer is added, it writes on: each write in its layer."""
    base, c1 = stack(tmp_path)
    c2 = tmp_path / "c2.lbd"
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    out = nbdsh(srv.uri, ADD_AND_WRITE.format(port=srv.manage_port, path=c2))
    assert out.strip() == "ok"
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert layers(info) == [(3, "expandable", True, str(c2)), (2, "expandable", False, str(c1)),
                            (1, "flat", False, str(base)), (0, "null", False, "null")]
    assert info["layers"][0]["space"]["live_bytes"] == 128 * KiB
    assert info["layers"][1]["space"]["live_bytes"] == 128 * KiB
    assert layer_args(info) == ["-f", str(base), "-e", str(c1), "-E", str(c2)]
    assert ok(mgmt(srv, "SHUTDOWN")) is True
    assert srv.wait(30) == 0
    base_sha = file_sha(base, 65536, 65536)
    # the old layer alone: the writes before the switch, nothing after it
    old = lbd_server(["-s", "16M", "-f", str(base), "-e", str(c1)])
    out = nbdsh(old.uri, "print(h.pread(65536, 0) == b'\\xaa' * 65536, "
                         "h.pread(65536, 131072) == b'\\xaa' * 65536)")
    assert out.split() == ["True", "True"]
    assert pread_sha(old.uri, 65536, 65536) == base_sha
    old.stop()
    # the whole stack, from the restart command line
    full = lbd_server(["-s", "16M", *layer_args(info)])
    out = nbdsh(full.uri, "print(h.pread(196608, 0) == b'\\xaa' * 65536 + b'\\xbb' * 131072)")
    assert out.strip() == "True"


def test_live_add_layer_makes_a_read_only_device_writable(lbd_server, tmp_path: Path) -> None:
    base, _ = stack(tmp_path)
    new = tmp_path / "new.lbd"
    srv = serve(lbd_server, tmp_path, "-f", str(base))
    assert ok(mgmt(srv, "DEVICE_INFO"))["writable"] is False
    require("nbdsh")
    # a connection made before the switch stays read-only
    before = subprocess.Popen(
        ["nbdsh", "-u", srv.uri, "-c",
         "import sys\nprint(h.is_read_only(), flush=True)\nsys.stdin.readline()\n"
         "try:\n    h.pwrite(b'x' * 512, 0)\n    print('wrote')\n"
         "except nbd.Error as e:\n    print('refused', e.errno)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": TOOL_PATH})
    assert before.stdout is not None and before.stdout.readline().strip() == "True"
    r = ok(mgmt(srv, "LIVE_ADD_LAYER", str(new)))
    assert r["writable"] is True and r["layer"]["created"] is True
    assert r["previous"]["type"] == "flat" and r["previous"]["writable"] is False
    out, _ = before.communicate("\n", timeout=30)
    assert "refused" in out and "wrote" not in out
    # a new connection is writable
    out = nbdsh(srv.uri, "print(h.is_read_only()); h.pwrite(b'\\x42' * 4096, 8192); "
                         "print(h.pread(4096, 8192) == b'\\x42' * 4096)")
    assert out.split() == ["False", "True"]
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert layer_args(info) == ["-f", str(base), "-E", str(new)]
    srv.stop()
    again = lbd_server(["-s", "16M", *layer_args(info)])
    out = nbdsh(again.uri, "print(h.pread(4096, 8192) == b'\\x42' * 4096)")
    assert out.strip() == "True"


def test_live_add_layer_keeps_an_explicit_readonly(lbd_server, tmp_path: Path) -> None:
    """-r means clients never write: the new layer is committed-on-top but not exported rw."""
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1), "-r")
    r = ok(mgmt(srv, "LIVE_ADD_LAYER", str(tmp_path / "c2.lbd")))
    assert r["writable"] is False and r["layer"]["writable"] is True
    assert "--readonly" in r["command"]
    assert nbdsh(srv.uri, "print(h.is_read_only())").strip() == "True"


def test_live_add_layer_on_a_writable_image(lbd_server, tmp_path: Path) -> None:
    """-F img becomes -f img; the new layer records the image as it is at the switch."""
    img = random_file(tmp_path / "img.raw", SIZE, seed=3)
    new = tmp_path / "new.lbd"
    bad_first = tmp_path / "no-such-dir" / "x.lbd"
    srv = serve(lbd_server, tmp_path, "-F", str(img))
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 64k", srv.uri])
    # a refused attempt first (it takes the image's fingerprint), then more writes
    refused(mgmt(srv, "LIVE_ADD_LAYER", str(bad_first)), M.BAD_LAYER)
    # the fingerprint samples 64 KiB every 1 MiB: write where it looks
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x02 0 16M", srv.uri])
    ok(mgmt(srv, "LIVE_ADD_LAYER", str(new)))
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x03 1M 64k", srv.uri])
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert layer_args(info) == ["-f", str(img), "-E", str(new)]
    assert info["layers"][1]["writable"] is False
    srv.stop()
    assert file_sha(img, 1 * MiB, 64 * KiB) == file_sha(img, 0, 64 * KiB)  # all 0x02 there
    # restarts without --force: the recorded parent matches the image
    again = lbd_server(["-s", "16M", *layer_args(info)])
    out = nbdsh(again.uri, "print(h.pread(65536, 0) == b'\\x02' * 65536, "
                           "h.pread(65536, 1048576) == b'\\x03' * 65536)")
    assert out.split() == ["True", "True"]


def test_live_add_layer_several_times_and_concurrently(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    paths = [tmp_path / f"n{i}.lbd" for i in range(4)]
    conns = [MgmtConn(srv.manage_address) for _ in paths]
    try:
        for c, p in zip(conns, paths):
            c.send(M.encode_request("LIVE_ADD_LAYER", str(p)))
        replies = [ok(c.reply()) for c in conns]
    finally:
        for c in conns:
            c.close()
    assert sorted(r["layer"]["index"] for r in replies) == [3, 4, 5, 6]
    info = ok(mgmt(srv, "DEVICE_INFO"))
    got = layers(info)
    assert [x[1:3] for x in got] == [("expandable", True)] + [("expandable", False)] * 4 + [
        ("flat", False), ("null", False)]
    assert {x[3] for x in got[:4]} == {str(p) for p in paths}
    assert layer_args(info)[-2] == "-E" and layer_args(info).count("-e") == 4
    srv.stop()
    # each new layer was created on top of the one below it: the stack reopens as is
    again = lbd_server(["-s", "16M", *layer_args(info)])
    assert again.proc.poll() is None


def test_live_add_layer_with_spaces_in_the_path(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    d = tmp_path / "my disks"
    d.mkdir()
    new = d / " new layer.lbd"  # a leading space: sent as a JSON string
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    r = ok(mgmt(srv, "LIVE_ADD_LAYER", str(new)))
    assert r["layer"]["param"] == str(new) and new.exists()
    # by hand, as the rest of the line
    with socket.create_connection(("127.0.0.1", srv.manage_port), timeout=10) as s:
        s.sendall(f"LIVE_ADD_LAYER {d}/second one.lbd\n".encode())
        assert s.recv(4).startswith(b"OK")
    assert (d / "second one.lbd").exists()
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert f"{d}/second one.lbd" in shlex.split(info["command_line"])


def test_relative_paths_are_relative_to_the_server(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))  # cwd is tmp_path
    r = ok(mgmt(srv, "LIVE_ADD_LAYER", "rel.lbd"))
    assert r["layer"]["param"] == str(tmp_path / "rel.lbd")


def other_device_file(tmp_path: Path) -> Path:
    """A change file of a different (32 MiB) device."""
    p = tmp_path / "other-size.lbd"
    s = LBD(["-s", "32M", "-E", str(p)], cwd=tmp_path)
    assert s.stop() == 0
    return p


def other_base_file(tmp_path: Path) -> Path:
    """A change file of a 16 MiB device, created on another base image."""
    other = random_file(tmp_path / "other-base.img", SIZE, seed=99)
    p = tmp_path / "other-base.lbd"
    s = LBD(["-s", "16M", "-f", str(other), "-E", str(p)], cwd=tmp_path)
    assert s.stop() == 0
    return p


def test_live_add_layer_refusals_change_nothing(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    wrong_size = other_device_file(tmp_path)
    wrong_base = other_base_file(tmp_path)
    not_lbd = tmp_path / "notes.txt"
    not_lbd.write_text("not a change file\n" * 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # size 0, like an empty file: it used to be unlinked and replaced
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 64k", srv.uri])
    before = ok(mgmt(srv, "DEVICE_INFO"))
    snapshots = {p: p.read_bytes() for p in (wrong_size, wrong_base, not_lbd)}
    cases = [
        (str(tmp_path), "is a directory"),
        ("/sys/lbd-test.lbd", "permission denied"),  # even root cannot create files in /sys
        (str(tmp_path / "missing-dir" / "x.lbd"), "does not exist"),
        (str(wrong_size), "belongs to a device of 33554432 bytes"),
        (str(wrong_base), "was created on top of"),
        (str(not_lbd), "not an LBD change file"),
        (str(fifo), "not a regular file"),
        (str(c1), "already layer 2"),
        (str(base), "already layer 1"),
    ]
    for path, why in cases:
        message = refused(mgmt(srv, "LIVE_ADD_LAYER", path), M.BAD_LAYER)
        assert why in message, (path, message)
    after = ok(mgmt(srv, "DEVICE_INFO"))
    assert layers(after) == layers(before)
    assert after["command"] == before["command"]
    assert {p: p.read_bytes() for p in snapshots} == snapshots
    assert not (tmp_path / "missing-dir").exists()
    assert fifo.is_fifo()
    # still the same writable device
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x67 64k 64k", "-c", "read -P 0x66 0 64k",
         srv.uri])
    assert ok(mgmt(srv, "DEVICE_INFO"))["layers"][0]["space"]["live_bytes"] == 128 * KiB


def test_live_add_layer_reuses_a_matching_file(lbd_server, tmp_path: Path) -> None:
    """An existing change file made on the current top (e.g. pre-created) is opened."""
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    empty = tmp_path / "empty.lbd"
    empty.touch()  # an empty file is an empty layer
    r = ok(mgmt(srv, "LIVE_ADD_LAYER", str(empty)))
    assert r["layer"]["param"] == str(empty)


# -- the token ------------------------------------------------------------------------------------


def test_token(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    tok = tmp_path / "token"
    tok.write_text("  s3cr3t-T0ken\n")
    tok.chmod(0o600)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1),
                "--manage-token", str(tok))
    with MgmtConn(srv.manage_address) as c:
        assert "requires a token" in refused(c.request("PING"), M.AUTH)
        assert ok(c.request("PING", token="s3cr3t-T0ken")) is True  # same connection goes on
        c.send(b"TOKEN s3cr3t-T0ken DEVICE_INFO_STRINGS\n")
        assert "token required" in c.reply().lines[2]
        assert "wrong" in refused(c.request("PING", token="guess"), M.AUTH)
        assert c.at_eof()  # a wrong token ends the connection
    info = ok(mgmt(srv, "DEVICE_INFO", token="s3cr3t-T0ken"))
    assert info["management"]["token"] is True
    assert info["command"][-2:] == ["--manage-token", str(tok)]
    assert "s3cr3t" not in srv.log() and "s3cr3t" not in json.dumps(info)


@pytest.mark.parametrize("content", [None, "", "two words\n"])
def test_bad_token_file_stops_serve_before_opening_anything(tmp_path: Path,
                                                            content: str | None) -> None:
    tok = tmp_path / "token"
    if content is not None:
        tok.write_text(content)
    c1 = tmp_path / "c1.lbd"
    p = run([lbd_exe(), "serve", "-s", "16M", "-E", str(c1), "--unix", str(tmp_path / "s"),
             "-a", "127.0.0.1:0", "--manage-token", str(tok)], check=False, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "--manage-token" in p.stderr and "Traceback" not in p.stderr
    assert not c1.exists()


# -- addresses ---------------------------------------------------------------------------------


def test_manage_none_and_bare_port(lbd_server, tmp_path: Path) -> None:
    base, _ = stack(tmp_path)
    off = lbd_server(["-s", "16M", "-f", str(base), "-a", "none"])
    assert "management" not in off.log()
    bare = lbd_server(["-s", "16M", "-f", str(base), "-a", "0"])  # a bare port: loopback
    deadline = time.monotonic() + 10
    while "management daemon listening at" not in bare.log():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "management daemon listening at 127.0.0.1:" in bare.log()
    assert "WARNING" not in bare.log() and "not on a loopback" not in bare.log()


def test_port_in_use_is_a_clean_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = run([lbd_exe(), "serve", "-s", "16M", "-E", str(tmp_path / "c.lbd"), "--unix",
                 str(tmp_path / "s"), "-a", f"127.0.0.1:{port}"], check=False, timeout=30)
    assert p.returncode == 2, p.stderr
    assert f"cannot listen for management on 127.0.0.1:{port}" in p.stderr
    assert "Traceback" not in p.stderr


async def test_non_loopback_address_warns(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Without really exposing anything: the check says 'not loopback' for 127.0.0.1."""
    import trio
    from lbd.frontends import manage

    assert manage.is_loopback("127.0.0.1") and manage.is_loopback("::1")
    assert manage.is_loopback("127.1.2.3") and manage.is_loopback("localhost")
    assert not manage.is_loopback("0.0.0.0") and not manage.is_loopback("192.168.1.1")
    assert not manage.is_loopback("::")
    monkeypatch.setattr(manage, "is_loopback", lambda host: False)
    mgr = manage.Manager(None, token=None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.serve_tcp, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "not on a loopback address" in warnings[0].getMessage()
    assert "--manage-token" in warnings[0].getMessage()


# -- hostile clients --------------------------------------------------------------------------


def eventually(check: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def timed_ping(srv: LBD) -> float:
    t0 = time.monotonic()
    assert ok(mgmt(srv, "PING")) is True
    return time.monotonic() - t0


def test_idle_and_half_line_clients_do_not_block_others(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    idle = [socket.create_connection(("127.0.0.1", srv.manage_port)) for _ in range(5)]
    half = socket.create_connection(("127.0.0.1", srv.manage_port))
    half.sendall(b"LIVE_ADD_LAY")
    try:
        for _ in range(5):
            assert timed_ping(srv) < 1.0
        # and state-changing requests too
        ok(mgmt(srv, "LIVE_ADD_LAYER", str(tmp_path / "c2.lbd")))
    finally:
        for s in [*idle, half]:
            s.close()
    assert timed_ping(srv) < 1.0


def test_garbage_gets_errors_and_the_connection_goes_on(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    import random

    rng = random.Random(5)
    junk = b"".join(rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b"") + b"\n"
                    for _ in range(50))
    with MgmtConn(srv.manage_address) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused(c.reply(), M.UNKNOWN_COMMAND)
        assert refused(c.reply(), M.BAD_REQUEST)  # "Host: x": not even a command word
        c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n")  # a TLS hello, cut short
        assert c.reply().code == M.BAD_REQUEST
        c.send(junk)
        errs = 0
        for line in junk.split(b"\n")[:-1]:
            if line.strip(b" \r"):
                rep = c.reply()
                assert rep.kind == "ERR" and rep.code in (M.BAD_REQUEST, M.UNKNOWN_COMMAND)
                errs += 1
        assert errs > 40
        assert ok(c.request("PING")) is True
    assert timed_ping(srv) < 1.0
    assert srv.proc.poll() is None


def test_a_10mb_line_is_cut_off(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    hostile = socket.create_connection(("127.0.0.1", srv.manage_port), timeout=30)
    sent = [0]
    outcome: list[str] = []

    def flood() -> None:
        chunk = b"A" * 65536
        try:
            while sent[0] < 10 * MiB:
                hostile.sendall(chunk)
                sent[0] += len(chunk)
            hostile.sendall(b"\n")
            outcome.append("all sent")
        except OSError as exc:  # reset or broken pipe: the daemon hung up
            outcome.append(type(exc).__name__)

    t = threading.Thread(target=flood)
    t.start()
    try:
        assert timed_ping(srv) < 2.0
        t.join(60)
        assert not t.is_alive()
        data = b""
        try:
            while chunk := hostile.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        # the reply arrives unless the reset overtook it; either way the line was refused
        assert data in (b"", f"ERR TOO_LONG request line longer than {M.MAX_REQUEST_LINE} "
                             "bytes; closing\n".encode()), data[:200]
        assert outcome
    finally:
        hostile.close()
    assert "request line" in srv.log() or "no line feed" in srv.log()
    assert timed_ping(srv) < 1.0
    # the flood's connection is gone (the others' too, once the daemon sees them close)
    eventually(lambda: ok(mgmt(srv, "DEVICE_INFO"))["management"]["connections"] == 1)


def test_clients_vanishing_mid_request(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    for payload in [b"DEVICE_INFO_STR", b"DEVICE_INFO\n", b"DEVICE_INFO_STRINGS\n" * 200,
                    b"LIVE_ADD_LAYER " + str(tmp_path).encode()]:
        for reset in (False, True):
            s = socket.create_connection(("127.0.0.1", srv.manage_port))
            s.sendall(payload)
            if reset:  # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    assert timed_ping(srv) < 1.0
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert len(info["layers"]) == 3  # the directory was (if at all) refused
    assert "Traceback" not in srv.log() and "internal error" not in srv.log()


def test_a_client_that_never_reads_does_not_block_others(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    greedy = socket.create_connection(("127.0.0.1", srv.manage_port))
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.setblocking(False)
    try:
        # requests whose replies pile up unread, until the kernel buffers are full
        req = b"DEVICE_INFO_STRINGS\n" * 500
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                greedy.send(req)
            except BlockingIOError:
                break
        time.sleep(0.2)
        for _ in range(3):
            assert timed_ping(srv) < 1.0
    finally:
        greedy.close()
    assert timed_ping(srv) < 1.0


def test_idle_timeout(lbd_server, tmp_path: Path) -> None:
    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1), "--manage-timeout", "0.5")
    with MgmtConn(srv.manage_address) as idle, MgmtConn(srv.manage_address) as slow:
        t0 = time.monotonic()
        slow.send(b"PI")  # a request never finished
        rep = idle.reply()
        assert refused(rep, M.TIMEOUT).startswith("no complete request in 0.5 s")
        assert idle.at_eof()
        assert 0.4 < time.monotonic() - t0 < 5
        assert slow.reply().code == M.TIMEOUT and slow.at_eof()
    # an active client is not cut off: the timeout counts from its last reply
    with MgmtConn(srv.manage_address) as busy:
        for _ in range(4):
            assert ok(busy.request("PING")) is True
            time.sleep(0.3)
    info = ok(mgmt(srv, "DEVICE_INFO"))
    assert info["management"]["idle_timeout"] == 0.5
    assert info["command"][-2:] == ["--manage-timeout", "0.5"]


def test_too_many_connections(lbd_server, tmp_path: Path) -> None:
    from lbd.frontends.manage import MAX_CONNECTIONS

    base, c1 = stack(tmp_path)
    srv = serve(lbd_server, tmp_path, "-f", str(base), "-E", str(c1))
    held = [MgmtConn(srv.manage_address) for _ in range(MAX_CONNECTIONS)]
    try:
        assert ok(held[-1].request("PING")) is True  # all of them are served
        with MgmtConn(srv.manage_address) as extra:
            assert refused(extra.reply(), M.BUSY).startswith("too many")
            assert extra.at_eof()
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the daemon notices the close, then has room again
            with MgmtConn(srv.manage_address) as again:
                again.send(b"PING\n")
                rep = again.reply()
            if rep.ok or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ok(rep) is True
    finally:
        for c in held:
            c.close()
