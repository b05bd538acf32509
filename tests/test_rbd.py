"""RBD layers (-c / -C) against a real single-node Ceph cluster (tests/ceph_cluster.py).

The seed's use case done with Ceph: one protected golden snapshot, several LBD
servers each with its own change file on top; a writable image as the top
layer; block status; and the failures a user meets (names that do not exist,
the wrong size, a read-only key, an unreachable cluster, a cluster that goes
away mid-I/O and comes back).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ceph_cluster import CephCluster
from lbd.layers.rbd import RBDTarget, parse_target
from support import lbd_exe, nbdsh, require, run

from lbd.errors import ConfigError

MiB = 1 << 20
SIZE = 64 * MiB


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ceph_args(ceph: CephCluster, *extra: str) -> list[str]:
    return ["--ceph-conf", ceph.conf, *extra]


def golden(ceph: CephCluster, size: int = SIZE, data_mib: int = 24) -> tuple[str, bytes]:
    """A new image with ``data_mib`` MiB of random data and a protected snapshot ``v1``."""
    img = name("golden")
    data = os.urandom(data_mib * MiB)
    ceph.create_image(img, size, data=data, snap="v1", protect=True)
    return img, data + bytes(size - len(data))


def serve_fails(tmp_path: Path, *args: str, timeout: float = 60) -> tuple[str, float]:
    """``lbd serve ARGS`` must exit by itself with a clear error; (stderr, seconds)."""
    sock = str(tmp_path / "s.sock")
    t0 = time.monotonic()
    try:
        p = run([lbd_exe(), "serve", *args, "--unix", sock, "-a", "none"], check=False,
                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"lbd serve {' '.join(args)} did not exit in {timeout} s") \
            from None
    took = time.monotonic() - t0
    assert p.returncode == 2, f"lbd serve {' '.join(args)} exited {p.returncode}:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "lbd: error:" in p.stderr, p.stderr
    assert not os.path.exists(sock)
    return p.stderr, took


def pread_all(uri: str, size: int) -> bytes:
    """The whole device through nbdcopy (a real client)."""
    require("nbdcopy")
    out = run(["nbdcopy", uri, "-"], timeout=300, input=b"").stdout
    assert isinstance(out, bytes) and len(out) == size, f"nbdcopy read {len(out)} bytes"
    return out


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("rbd:pool/img@snap", RBDTarget("pool", "img", "snap")),
    ("rbd:pool/img", RBDTarget("pool", "img")),
    ("pool/img@s", RBDTarget("pool", "img", "s")),
    ("img", RBDTarget("rbd", "img")),
    ("rbd:img@s1", RBDTarget("rbd", "img", "s1")),
    ("rbd:p/ns/img@s", RBDTarget("p", "img", "s", "ns")),
])
def test_rbd_names(text: str, want: RBDTarget) -> None:
    assert parse_target(text) == want
    assert parse_target(str(want)) == want


@pytest.mark.parametrize("text", ["rbd:", "rbd:a/b/c/d", "rbd:p/img@", "rbd:p/i@s@t", "a b"])
def test_rbd_bad_names(text: str) -> None:
    with pytest.raises(ConfigError, match="not an RBD image name"):
        parse_target(text, "-c")


# -- the seed's use case --------------------------------------------------------------------


def test_golden_snapshot_shared_by_two_servers(ceph: CephCluster, lbd_server,
                                               tmp_path: Path) -> None:
    """Two servers on one golden snapshot, each with its own change file."""
    img, base = golden(ceph)
    spec = f"rbd:rbd/{img}@v1"
    c1, c2 = tmp_path / "host1.lbd", tmp_path / "host2.lbd"
    a = lbd_server(["-s", "64m", "-c", spec, "-E", str(c1), *ceph_args(ceph)])
    b = lbd_server(["-s", "64m", "-c", spec, "-E", str(c2), *ceph_args(ceph)])
    # both see the snapshot
    assert pread_all(a.uri, SIZE) == base
    # different writes at the same places (one across the end of the data)
    pa, pb = os.urandom(2 * MiB), os.urandom(2 * MiB)
    for srv, p, f in ((a, pa, tmp_path / "pa"), (b, pb, tmp_path / "pb")):
        f.write_bytes(p)
        nbdsh(srv.uri, f"p = open({str(f)!r}, 'rb').read(); h.pwrite(p, {MiB}); "
                       f"h.pwrite(p, {23 * MiB}); h.flush()")
    ea, eb = bytearray(base), bytearray(base)
    for e, p in ((ea, pa), (eb, pb)):
        e[MiB:3 * MiB] = p
        e[23 * MiB:25 * MiB] = p
    assert pread_all(a.uri, SIZE) == bytes(ea), "server A does not see (only) its writes"
    assert pread_all(b.uri, SIZE) == bytes(eb), "server B does not see (only) its writes"
    # the map: the change file at depth 2 over the RBD snapshot at depth 1
    m = run(["nbdinfo", "--map=lbd:allocation-depth", a.uri]).stdout
    assert "2" in m and "1" in m, m
    assert a.stop() == 0 and b.stop() == 0
    # the snapshot is unchanged, and the image head too
    assert sha(ceph.read_image(img, snap="v1")) == sha(base)
    assert sha(ceph.read_image(img)) == sha(base)
    # the writes live in the change files: a restarted server still has them
    a2 = lbd_server(["-s", "64m", "-c", spec, "-e", str(c1), *ceph_args(ceph)])
    assert pread_all(a2.uri, SIZE) == bytes(ea)


def test_change_file_refuses_another_image(ceph: CephCluster, lbd_server,
                                           tmp_path: Path) -> None:
    """-e over the wrong image (or snapshot) is refused unless --force."""
    img, _ = golden(ceph, data_mib=1)
    other, _ = golden(ceph, data_mib=1)
    with ceph.client() as (_, ioctx):
        import rbd

        with rbd.Image(ioctx, img) as im:
            im.create_snap("v2")
    change = tmp_path / "c.lbd"
    s = lbd_server(["-s", "64m", "-c", f"rbd:rbd/{img}@v1", "-E", str(change),
                    *ceph_args(ceph)])
    nbdsh(s.uri, "h.pwrite(b'x' * 4096, 0); h.flush()")
    assert s.stop() == 0
    for wrong in (f"rbd:rbd/{other}@v1", f"rbd:rbd/{img}@v2", f"rbd:rbd/{img}"):
        err, _ = serve_fails(tmp_path, "-s", "64m", "-c", wrong, "-e", str(change),
                             *ceph_args(ceph))
        assert "was created on top of" in err and f"rbd:rbd/{img}@v1" in err, err
        assert "--force" in err, err
    # the same image under its name again is accepted, and --force overrides
    s = lbd_server(["-s", "64m", "-c", f"rbd:{img}@v1", "-e", str(change), *ceph_args(ceph)])
    assert nbdsh(s.uri, "print(h.pread(4, 0))").strip() == "bytearray(b'xxxx')"
    s.stop()
    s = lbd_server(["-s", "64m", "-c", f"rbd:rbd/{other}@v1", "-e", str(change), "--force",
                    *ceph_args(ceph)])
    assert nbdsh(s.uri, "print(h.pread(4, 0))").strip() == "bytearray(b'xxxx')"


# -- a writable image -----------------------------------------------------------------------


def test_writable_image(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    """-C: the image itself is the top layer; qemu-io and nbdsh write, librbd reads back."""
    require("qemu-io")
    img, base = golden(ceph, data_mib=8)
    s = lbd_server(["-s", "64m", "-C", f"rbd:rbd/{img}", *ceph_args(ceph)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0xcd 40M 64k",
         "-c", "read -P 0xab 1M 3M", "-c", "flush", s.uri])
    # unaligned, FUA, zeroes, trim, and a batch of several writes in one receive
    nbdsh(s.uri, """
h.pwrite(b'u' * 1000, 5 * 1024 * 1024 + 100, nbd.CMD_FLAG_FUA)
h.zero(512 * 1024, 2 * 1024 * 1024)  # count, offset
h.trim(4 * 1024 * 1024, 4 * 1024 * 1024)
errors = []
def cb(err):
    if err.value:
        errors.append(err.value)
    return 1
for i in range(16):
    h.aio_pwrite(bytes([i + 1]) * 4096, 48 * 1024 * 1024 + i * 8192, cb)
while h.aio_in_flight() > 0:
    h.poll(-1)
assert not errors, errors
h.flush()
""")
    want = bytearray(base)
    want[MiB:4 * MiB] = b"\xab" * (3 * MiB)
    want[40 * MiB:40 * MiB + 65536] = b"\xcd" * 65536
    want[5 * MiB + 100:5 * MiB + 1100] = b"u" * 1000
    want[2 * MiB:2 * MiB + 512 * 1024] = bytes(512 * 1024)
    for i in range(16):
        want[48 * MiB + i * 8192:48 * MiB + i * 8192 + 4096] = bytes([i + 1]) * 4096
    got = pread_all(s.uri, SIZE)
    # TRIM is advisory: those 4 MiB may read as anything written there or zeros
    trimmed = slice(4 * MiB, 8 * MiB)
    assert got[:trimmed.start] == want[:trimmed.start]
    assert got[trimmed.stop:] == want[trimmed.stop:]
    assert s.stop() == 0
    head = ceph.read_image(img)
    assert head[:trimmed.start] == want[:trimmed.start], "librbd sees other data"
    assert head[trimmed.stop:] == want[trimmed.stop:], "librbd sees other data"
    assert ceph.read_image(img, snap="v1") == base, "the snapshot changed"


def test_writable_image_fio_verify(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    """fio random writes with crc32c verification at queue depth 16 through -C."""
    require("fio")
    img = name("fio")
    ceph.create_image(img, 32 * MiB)
    s = lbd_server(["-s", "32m", "-C", f"rbd:{img}", *ceph_args(ceph)])
    run(["fio", "--name=rbd", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=32m", "--io_size=8m", "--verify=crc32c",
         "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--verify_state_save=0"],
        timeout=300)


def test_block_status_reports_rbd_holes(ceph: CephCluster, lbd_server,
                                        tmp_path: Path) -> None:
    """Objects that exist are data, the rest zero (whole-object granularity)."""
    img = name("sparse")
    ceph.create_image(img, SIZE)
    with ceph.client() as (_, ioctx):
        import rbd

        with rbd.Image(ioctx, img) as im:
            im.write(b"d" * 4096, 8 * MiB + 4096)  # object 2 (4 MiB objects)
            im.write(b"e" * 4096, 40 * MiB)  # object 10
            im.create_snap("s")
    s = lbd_server(["-s", "64m", "-c", f"rbd:{img}@s", *ceph_args(ceph)])
    out = run(["nbdinfo", "--map", "--json", s.uri]).stdout
    import json

    data = [(e["offset"], e["length"]) for e in json.loads(out)
            if not e["type"] & 1]  # type bit 0: hole
    assert data == [(8 * MiB, 4 * MiB), (40 * MiB, 4 * MiB)], out


# -- failures -------------------------------------------------------------------------------


def test_no_such_pool_image_snapshot(ceph: CephCluster, tmp_path: Path) -> None:
    img, _ = golden(ceph, data_mib=1)
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", f"rbd:nopool/{img}@v1", *ceph_args(ceph))
    assert "no pool 'nopool'" in err, err
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", "rbd:rbd/noimage@v1", *ceph_args(ceph))
    assert "no image 'noimage' in pool 'rbd'" in err, err
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", f"rbd:rbd/{img}@v9", *ceph_args(ceph))
    assert f"image '{img}' has no snapshot 'v9'" in err and "v1" in err, err
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", "rbd:rbd/nons/x", *ceph_args(ceph))
    assert "no namespace 'nons'" in err, err
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", "rbd:a/b/c/d", *ceph_args(ceph))
    assert "not an RBD image name" in err, err


def test_wrong_size(ceph: CephCluster, tmp_path: Path) -> None:
    img, _ = golden(ceph, data_mib=1)
    err, _ = serve_fails(tmp_path, "-s", "32m", "-c", f"rbd:{img}@v1", *ceph_args(ceph))
    assert f"{SIZE} bytes but the device is {32 * MiB} bytes" in err, err
    assert f"-s {SIZE}" in err, err


def test_snapshot_is_not_writable(ceph: CephCluster, tmp_path: Path) -> None:
    img, _ = golden(ceph, data_mib=1)
    err, _ = serve_fails(tmp_path, "-s", "64m", "-C", f"rbd:{img}@v1", *ceph_args(ceph))
    assert "a snapshot is read-only" in err, err


def test_read_only_key(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    """A read-only key serves the snapshot (-c) but may not write the image (-C)."""
    img, base = golden(ceph, data_mib=2)
    ro = ceph.add_user(name("ro"), "mon", "profile rbd", "osd",
                       "profile rbd-read-only pool=rbd")
    user = Path(ro).name.removeprefix("client.").removesuffix(".keyring")
    creds = ["--ceph-id", user, "--ceph-keyring", ro]
    err, _ = serve_fails(tmp_path, "-s", "64m", "-C", f"rbd:{img}", *ceph_args(ceph, *creds))
    assert f"permission denied: client.{user} may not write image '{img}'" in err, err
    s = lbd_server(["-s", "64m", "-c", f"rbd:{img}@v1", "-E", str(tmp_path / "c.lbd"),
                    *ceph_args(ceph, *creds)])
    assert pread_all(s.uri, SIZE) == base
    # no key for the user, and the wrong key
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", f"rbd:{img}@v1",
                         *ceph_args(ceph, "--ceph-id", "nobody"))
    assert "no key for client.nobody" in err, err
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", f"rbd:{img}@v1",
                         *ceph_args(ceph, "--ceph-id", "nobody", "--ceph-keyring", ro))
    assert "client.nobody" in err, err


def test_second_writer_refused(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    img, _ = golden(ceph, data_mib=1)
    lbd_server(["-s", "64m", "-C", f"rbd:{img}", *ceph_args(ceph)])
    err, _ = serve_fails(tmp_path, "-s", "64m", "-C", f"rbd:{img}", *ceph_args(ceph))
    assert "in use by another writer" in err, err


def test_unreachable_cluster_times_out(ceph: CephCluster, tmp_path: Path) -> None:
    """No monitor at the address: a clear error after --ceph-timeout, not a hang."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # a port that accepts and never speaks
    port = s.getsockname()[1]
    try:
        conf = tmp_path / "dead.conf"
        conf.write_text(f"[global]\nmon_host = v2:127.0.0.1:{port}\n")
        err, took = serve_fails(tmp_path, "-s", "64m", "-c", "rbd:x@y", "--ceph-conf",
                                str(conf), "--ceph-keyring", ceph.admin_keyring,
                                "--ceph-timeout", "3")
        assert "did not answer within 3 s" in err and str(port) in err, err
        assert took < 30, f"took {took:.1f} s"
    finally:
        s.close()
    err, _ = serve_fails(tmp_path, "-s", "64m", "-c", "rbd:x@y", "--ceph-conf",
                         str(tmp_path / "missing.conf"))
    assert "missing.conf: no such file" in err, err


def test_without_the_bindings(tmp_path: Path) -> None:
    """Without python3-rbd LBD still serves files, and -c says what to install."""
    block = "import sys; sys.modules['rbd'] = None; sys.modules['rados'] = None; "
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(MiB))
    py = str(Path(lbd_exe()).with_name("python"))
    p = subprocess.run([py, "-c", block + "from lbd.cli import main; main()", "serve", "-s",
                        "64m", "-c", "rbd:rbd/x@y", "--unix", str(tmp_path / "s"), "-a",
                        "none"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "python3-rbd" in p.stderr and "apt-get install" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    # a flat layer works with the bindings blocked
    sock = tmp_path / "f.sock"
    proc = subprocess.Popen([py, "-c", block + "from lbd.cli import main; main()", "serve",
                             "-s", "1m", "-f", str(base), "--unix", str(sock), "-a", "none"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "lbd serve -f did not start"
            time.sleep(0.05)
        out = nbdsh(f"nbd+unix:///?socket={sock}", "print(h.pread(16, 0).hex())")
        assert out.strip() == base.read_bytes()[:16].hex()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    assert "rbd" not in sys.modules or sys.modules["rbd"] is not None  # untouched here


# -- a cluster that goes away mid-I/O -----------------------------------------------------


@pytest.fixture
def own_ceph(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A cluster of this test's own, to stop and start without disturbing the others."""
    with CephCluster(tmp_path_factory.mktemp("ceph-own")) as c:
        yield c


def test_cluster_goes_away_and_comes_back(own_ceph: CephCluster, lbd_server,
                                          tmp_path: Path) -> None:
    ceph = own_ceph
    img, base = golden(ceph)
    rw = name("rw")
    ceph.create_image(rw, 16 * MiB)
    args = ceph_args(ceph, "--ceph-timeout", "3")
    s = lbd_server(["-s", "64m", "-c", f"rbd:{img}@v1", "-E", str(tmp_path / "c.lbd"), *args])
    w = lbd_server(["-s", "16m", "-C", f"rbd:{rw}", *args])
    nbdsh(s.uri, f"h.pwrite(b'L' * 65536, {MiB}); h.flush()")
    assert nbdsh(s.uri, "print(h.pread(4, 0).hex())").strip() == base[:4].hex()
    nbdsh(w.uri, "h.pwrite(b'W' * 4096, 0); h.flush()")

    ceph.stop_daemons()
    # reads from the base fail with EIO after the timeout; the server stays up, and
    # what the change file holds still reads
    t0 = time.monotonic()
    out = nbdsh(s.uri, f"""
try:
    h.pread(65536, {8 * MiB})
    print('read ok')
except nbd.Error as e:
    print('errno', e.errno)
print(h.pread(4, {MiB}))
""")
    took = time.monotonic() - t0
    assert "errno EIO" in out and "bytearray(b'LLLL')" in out, out
    assert took < 60, f"the failed read took {took:.0f} s"
    out = nbdsh(w.uri, """
for f in (lambda: h.pwrite(b'X' * 4096, 8192), h.flush):
    try:
        f()
        print('ok')
    except nbd.Error as e:
        print('errno', e.errno)
""")
    assert "errno EIO" in out, out
    assert s.proc.poll() is None and w.proc.poll() is None
    assert "no answer from the Ceph cluster within 3 s" in s.log(), s.log()

    ceph.start_daemons()
    deadline = time.monotonic() + 60
    while True:  # the client library reconnects by itself
        out = nbdsh(s.uri, f"""
try:
    print(h.pread(65536, {8 * MiB}).hex())
except nbd.Error as e:
    print('errno', e.errno)
""").strip()
        if not out.startswith("errno") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert out == base[8 * MiB:8 * MiB + 65536].hex(), out[:80]
    nbdsh(w.uri, "h.pwrite(b'Y' * 4096, 8192); h.flush()")
    assert nbdsh(w.uri, "print(h.pread(4, 0), h.pread(4, 8192))").strip() == \
        "bytearray(b'WWWW') bytearray(b'YYYY')"
    assert pread_all(s.uri, SIZE)[:MiB] == base[:MiB]


# -- the management daemon ------------------------------------------------------------------


def test_device_info_and_live_add_layer(ceph: CephCluster, lbd_server,
                                        tmp_path: Path) -> None:
    """DEVICE_INFO_STRINGS shows the RBD layer; LIVE_ADD_LAYER covers a writable image."""
    from support import mgmt

    img, base = golden(ceph, data_mib=2)
    s = lbd_server(["-s", "64m", "-C", f"rbd:rbd/{img}", *ceph_args(ceph)], manage=True)
    nbdsh(s.uri, "h.pwrite(b'A' * 4096, 0); h.flush()")
    lines = mgmt(s, "DEVICE_INFO_STRINGS").lines
    layer = next(i for i, x in enumerate(lines) if "type=" in x and "rbd" in x)
    assert lines[layer] == f"    1: type={'rbd':>18}, writable= true, param=rbd:rbd/{img}", lines
    assert "writes 1 (4096 bytes)" in lines[layer + 1], lines
    assert "ceph client.admin, image id " in lines[layer + 1], lines
    restart = lines[-1]
    assert f"-C rbd:rbd/{img} --ceph-conf {ceph.conf}" in restart, restart
    # a change file on top: the image becomes read-only and keeps what was written
    change = tmp_path / "top.lbd"
    rep = mgmt(s, "LIVE_ADD_LAYER", str(change))
    assert rep.ok, rep
    nbdsh(s.uri, "h.pwrite(b'B' * 4096, 4096); h.flush()")
    lines = mgmt(s, "DEVICE_INFO_STRINGS").lines
    assert any(f"writable=false, param=rbd:rbd/{img}" in x for x in lines), lines
    restart = lines[-1]
    assert f"-c rbd:rbd/{img}" in restart and f"-E {change}" in restart, restart
    assert s.stop() == 0
    head = ceph.read_image(img, 0, 8192)
    assert head[:4096] == b"A" * 4096 and head[4096:] == base[4096:8192]
    # the restart command line reopens the same stack (the change file's parent matches)
    import shlex

    argv = shlex.split(restart.removeprefix("restart: "))
    argv = argv[2:]
    for opt in ("-a", "--unix"):  # the test harness gives its own
        i = argv.index(opt)
        del argv[i:i + 2]
    s2 = lbd_server(argv)
    assert nbdsh(s2.uri, "print(h.pread(8192, 0) == b'A' * 4096 + b'B' * 4096)").strip() == \
        "True"
