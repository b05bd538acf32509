"""The NBD layer (-n, -N, -X) against real remotes: nbdkit (memory, file),
qemu-nbd, nbd-server with a named export, and another ``lbd serve``.

Clients are real too (nbdsh, nbdinfo, nbdcopy, qemu-img).  Reconnection,
fio and the write-back cache are in test_nbd_layer_resilience.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

from remotes import Remotes
from support import LBD, make_file, mgmt, nbdsh, random_file, require, run

MiB = 1 << 20
SIZE = 32 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(uri: str, dest: Path) -> bytes:
    require("nbdcopy")
    if dest.exists():
        dest.unlink()
    run(["nbdcopy", uri, str(dest)])
    return dest.read_bytes()


def sparse_base(path: Path, size: int = SIZE) -> Path:
    """Random data in [0, 1M) and [16M, 16M+64K); holes elsewhere."""
    rng = random.Random(5)
    make_file(path, size)
    with open(path, "r+b") as f:
        f.write(rng.randbytes(MiB))
        f.seek(16 * MiB)
        f.write(rng.randbytes(64 * 1024))
    return path


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map --json`` as (offset, length, type) triples."""
    require("nbdinfo")
    out = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def layer_info(srv: LBD) -> list[dict[str, object]]:
    reply = mgmt(srv, "DEVICE_INFO")
    assert reply.kind == "OK", reply
    return list(reply.value["layers"])


# -- nbdkit ---------------------------------------------------------------------------------


def test_nbdkit_memory_base_with_local_changes(remotes: Remotes, lbd_server,
                                               tmp_path: Path) -> None:
    """The seed's example: a common image from a remote host, changes saved locally."""
    kit = remotes.nbdkit("memory", f"size={SIZE}")
    nbdsh(kit.uri, "h.pwrite(b'\\xa5' * (1 << 20), 0); h.pwrite(b'tail' * 128, "
          f"{SIZE - 512})")
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "-E", str(tmp_path / "c.lbd")],
                     manage=True)
    out = nbdsh(srv.uri, """
assert h.pread(1 << 20, 0) == b'\\xa5' * (1 << 20)
assert h.pread(512, {tail}) == b'tail' * 128
assert h.pread(4096, 8 << 20) == bytes(4096)
h.pwrite(b'local!' * 1000, 4096)
h.flush()
assert h.pread(6000, 4096) == b'local!' * 1000
assert h.pread(4096, 0) == b'\\xa5' * 4096
print('ok')
""".replace("{tail}", str(SIZE - 512)))
    assert out.strip() == "ok"
    # the remote never saw the write: it went to the local change file
    assert nbdsh(kit.uri, "print(h.pread(6000, 4096) == b'\\xa5' * 6000)").strip() == "True"
    layers = layer_info(srv)
    assert [(x["type"], x["writable"]) for x in layers] == [
        ("expandable", True), ("nbd", False), ("null", False)]
    remote = layers[1]["remote"]
    assert isinstance(remote, dict) and remote["connected"] is True
    assert layers[1]["param"] == kit.uri
    assert "Traceback" not in srv.log()


def test_nbdkit_file_whole_image_and_block_status(remotes: Remotes, lbd_server,
                                                  tmp_path: Path) -> None:
    base = sparse_base(tmp_path / "base.img")
    kit = remotes.nbdkit("file", str(base), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri])
    assert read_all(srv.uri, tmp_path / "out.img") == base.read_bytes()
    # holes in the remote are known without reading them: the same map, from block status
    direct = nbd_map(kit.uri)
    through = nbd_map(srv.uri)
    assert through == direct
    assert any(t == 3 for _, _, t in through) and any(t == 0 for _, _, t in through)
    # a large read is split to the remote's maximum and comes back whole
    out = nbdsh(srv.uri, "import hashlib; print(hashlib.sha256(h.pread(32 << 20, 0))"
                ".hexdigest())")
    assert out.strip() == sha(base.read_bytes())


def test_writable_remote_write_trim_zero_fua(remotes: Remotes, lbd_server,
                                             tmp_path: Path) -> None:
    img = random_file(tmp_path / "rw.img", SIZE, seed=3)
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-N", kit.uri])
    out = nbdsh(srv.uri, """
import nbd
h.pwrite(b'W' * 65536, 1 << 20)
h.pwrite(b'F' * 4096, 3 << 20, nbd.CMD_FLAG_FUA)
h.trim(1 << 20, 8 << 20)
h.zero(1 << 20, 12 << 20)
h.pwrite(b'u', 12345)  # unaligned: read-modify-write through the remote
h.flush()
assert h.pread(1 << 20, 12 << 20) == bytes(1 << 20)
assert h.pread(1 << 20, 8 << 20) == bytes(1 << 20)
print(h.can_trim(), h.can_zero(), h.can_fua())
""")
    assert out.split() == ["True", "True", "True"]
    data = img.read_bytes()  # the remote's file has every change
    assert data[8 * MiB:9 * MiB] == bytes(MiB)  # trimmed reads as zeros
    assert data[12 * MiB:13 * MiB] == bytes(MiB)
    assert data[12345:12346] == b"u"
    assert data[1 * MiB - 1:1 * MiB] != b""  # untouched data stays
    srv.stop()


def test_ipv6_and_tcp_addresses(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "b.img", 4 * MiB, seed=9)
    kit = remotes.nbdkit("file", str(base), readonly=True, tcp="::1")
    port = kit.uri.split("]:")[1].rstrip("/")
    for target in (f"[::1]:{port}", f"nbd://[::1]:{port}", f"nbd://[::1]:{port}/"):
        srv = lbd_server(["-s", "4M", "-n", target])
        assert read_all(srv.uri, tmp_path / "o.img") == base.read_bytes()
        srv.stop()
    kit4 = remotes.nbdkit("file", str(base), readonly=True, tcp="127.0.0.1")
    hostport = kit4.uri[len("nbd://"):].rstrip("/")
    srv = lbd_server(["-s", "4M", "-n", hostport])
    assert read_all(srv.uri, tmp_path / "o.img") == base.read_bytes()


# -- qemu-nbd and nbd-server -------------------------------------------------------------


def test_qemu_nbd_base_and_writable(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "q.img", SIZE, seed=11)
    q = remotes.qemu_nbd(base, readonly=True)
    srv = lbd_server(["-s", "32M", "-n", q.uri, "-E", str(tmp_path / "c.lbd")])
    require("qemu-img")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, str(base)])
    srv.stop()
    rw = random_file(tmp_path / "q2.img", SIZE, seed=12)
    q2 = remotes.qemu_nbd(rw)
    srv = lbd_server(["-s", "32M", "-N", q2.uri])
    require("qemu-io")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 2M", "-c", "flush", srv.uri])
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 1M 2M", q2.uri])


def test_qemu_nbd_single_client_default(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    """qemu-nbd's default takes one client: LBD finds its extra connections refused,
    keeps to one, and reads go through worker threads."""
    img = random_file(tmp_path / "one.img", 8 * MiB, seed=13)
    q = remotes.qemu_nbd(img, shared=None, readonly=True)
    srv = lbd_server(["-s", "8M", "-n", q.uri, "-E", str(tmp_path / "c.lbd")])
    out = nbdsh(srv.uri, "h.pwrite(b'Q' * 4096, 0); h.flush(); "
                "print(h.pread(4096, 0) == b'Q' * 4096, h.pread(8 << 20, 0)[4096:] == "
                f"open({str(img)!r}, 'rb').read()[4096:])")
    assert out.split() == ["True", "True"]
    assert "reads use worker threads" in srv.log()


def test_nbd_server_named_export(remotes: Remotes, lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "ns.img", 16 * MiB, seed=17)
    ns = remotes.nbd_server(base, "golden")
    srv = lbd_server(["-s", "16M", "-n", ns.uri, "-E", str(tmp_path / "c.lbd")])
    assert read_all(srv.uri, tmp_path / "o.img") == base.read_bytes()
    nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0); h.flush()")
    assert base.read_bytes()[:512] != b"x" * 512  # the change stayed local
    srv.stop()
    # writable, through nbd-server (simple replies, no block status)
    srv = lbd_server(["-s", "16M", "-N", ns.uri])
    nbdsh(srv.uri, "h.pwrite(b'N' * 8192, 4096); h.flush()")
    assert base.read_bytes()[4096:12288] == b"N" * 8192
    out = run([lbd_exe_path(), "serve", "-s", "16M", "-n",
               ns.uri.rsplit("/", 1)[0] + "/silver", "-a", "none", "--unix",
               str(tmp_path / "x.sock")], check=False, timeout=60)
    assert out.returncode == 2
    assert "no export named 'silver'" in out.stderr or "silver" in out.stderr, out.stderr


def lbd_exe_path() -> str:
    from support import lbd_exe

    return lbd_exe()


# -- LBD on LBD ------------------------------------------------------------------------


def test_many_machines_share_one_remote_lbd(remotes: Remotes, lbd_server,
                                            tmp_path: Path) -> None:
    """One LBD serves the golden image; two others use it as their base over NBD,
    each saving its own changes locally (the seed's example, with LBDs only)."""
    golden = random_file(tmp_path / "golden.img", SIZE, seed=21)
    before = sha(golden.read_bytes())
    hub = remotes.lbd(["-s", "32M", "-f", str(golden)])
    a = lbd_server(["-s", "32M", "-n", hub.uri, "-E", str(tmp_path / "a.lbd")])
    b = lbd_server(["-s", "32M", "-n", hub.uri, "-E", str(tmp_path / "b.lbd")])
    nbdsh(a.uri, "h.pwrite(b'A' * (1 << 20), 4 << 20); h.flush()")
    nbdsh(b.uri, "h.pwrite(b'B' * (1 << 20), 4 << 20); h.flush()")
    da = read_all(a.uri, tmp_path / "a.out")
    db = read_all(b.uri, tmp_path / "b.out")
    g = golden.read_bytes()
    assert da[4 * MiB:5 * MiB] == b"A" * MiB and db[4 * MiB:5 * MiB] == b"B" * MiB
    assert da[:4 * MiB] == g[:4 * MiB] == db[:4 * MiB]
    assert da[5 * MiB:] == g[5 * MiB:] == db[5 * MiB:]
    assert sha(golden.read_bytes()) == before
    # each change file knows it sits on that remote: reopen a's without --force
    a.stop()
    a2 = lbd_server(["-s", "32M", "-n", hub.uri, "-e", str(tmp_path / "a.lbd")])
    assert nbdsh(a2.uri, "print(bytes(h.pread(4, 4 << 20)))").strip() == "b'AAAA'"


def test_change_file_moves_between_flat_and_remote(remotes: Remotes, lbd_server,
                                                   tmp_path: Path) -> None:
    """The remote's identity is the image's content fingerprint, as for a flat file:
    a change file made over the local image fits the remote serving it, and a
    change file made over another image is refused (unless --force)."""
    golden = random_file(tmp_path / "g.img", 8 * MiB, seed=31)
    other = random_file(tmp_path / "o.img", 8 * MiB, seed=32)
    c = tmp_path / "c.lbd"
    local = lbd_server(["-s", "8M", "-f", str(golden), "-E", str(c)])
    nbdsh(local.uri, "h.pwrite(b'C' * 512, 0); h.flush()")
    local.stop()
    kit = remotes.nbdkit("file", str(golden), readonly=True)
    srv = lbd_server(["-s", "8M", "-n", kit.uri, "-E", str(c)])
    assert nbdsh(srv.uri, "print(bytes(h.pread(3, 0)))").strip() == "b'CCC'"
    srv.stop()
    wrong = remotes.nbdkit("file", str(other), readonly=True)
    p = run([lbd_exe_path(), "serve", "-s", "8M", "-n", wrong.uri, "-e", str(c),
             "-a", "none", "--unix", str(tmp_path / "w.sock")], check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "was created on top of" in p.stderr and "--force" in p.stderr
    forced = lbd_server(["-s", "8M", "-n", wrong.uri, "-e", str(c), "--force"])
    assert nbdsh(forced.uri, "print(bytes(h.pread(3, 0)))").strip() == "b'CCC'"


# -- errors -------------------------------------------------------------------------------


def serve_fails(tmp_path: Path, *args: str) -> str:
    p = run([lbd_exe_path(), "serve", *args, "-a", "none", "--unix",
             str(tmp_path / "f.sock")], check=False, timeout=60)
    assert p.returncode == 2, f"exit {p.returncode}: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_clear_errors(remotes: Remotes, tmp_path: Path) -> None:
    kit = remotes.nbdkit("memory", "size=16M")
    err = serve_fails(tmp_path, "-s", "32M", "-n", kit.uri)
    assert re.search(r"-n .*: the remote export is 16777216 bytes but the device is "
                     r"33554432 bytes", err), err
    assert "-s 16777216" in err
    ro = remotes.nbdkit("memory", "size=16M", readonly=True)
    for flag in ("-N", "-X"):
        err = serve_fails(tmp_path, "-s", "16M", flag, ro.uri)
        assert f"{flag} {ro.uri}: the remote export is read-only" in err, err
    sock = tmp_path / "nobody.sock"
    err = serve_fails(tmp_path, "-s", "16M", "-n", f"nbd+unix:///?socket={sock}")
    assert "cannot connect to the NBD server" in err and "No such file" in err, err
    err = serve_fails(tmp_path, "-s", "16M", "-n", "127.0.0.1:1")
    assert "cannot connect" in err and "refused" in err.lower(), err
    for bad, why in [("nbds://h:1/x", "TLS"), ("nbd+unix:///x", "socket=PATH"),
                     ("http://h:1", "unknown URI scheme"), ("justahost", "not HOST:PORT"),
                     ("h:99999", "port"), ("::1:10809", "[ADDRESS]:PORT")]:
        err = serve_fails(tmp_path, "-s", "16M", "-n", bad)
        assert why in err, (bad, err)
    err = serve_fails(tmp_path, "-s", "16M", "-N", kit.uri, "-E", str(tmp_path / "c.lbd"))
    assert "only the topmost" in err
    assert not os.path.exists(tmp_path / "c.lbd")


def test_management_info_shows_the_remote(remotes: Remotes, lbd_server,
                                          tmp_path: Path) -> None:
    kit = remotes.nbdkit("memory", f"size={SIZE}")
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "--nbd-cache", "8m", "--nbd-timeout", "7",
                      "-E", str(tmp_path / "c.lbd")], manage=True)
    nbdsh(srv.uri, "h.pread(1 << 20, 0); h.pread(1 << 20, 0)")
    reply = mgmt(srv, "DEVICE_INFO_STRINGS")
    text = "\n".join(reply.lines)
    assert f"type=               nbd, writable=false, param={kit.uri}" in text, text
    assert re.search(r"remote connected, 0 reconnects; cache \d+ hits, \d+ misses", text), text
    restart = next(x for x in reply.lines if x.startswith("restart: "))
    assert f"-n {kit.uri}" in restart.replace("'", "")
    assert "--nbd-cache 8388608" in restart and "--nbd-timeout 7" in restart


def test_read_cache_serves_mixed_hits_and_misses_byte_for_byte(remotes: Remotes, lbd_server,
                                                              tmp_path: Path) -> None:
    """-n with --nbd-cache, and -X: reads that are partly in the cache and partly
    not (the cached read path copies hits and asks the remote for the rest), at
    queue depth, against the image; -X also after writes it still holds."""
    img = random_file(tmp_path / "m.img", SIZE, seed=51)
    data = bytearray(img.read_bytes())
    kit = remotes.nbdkit("file", str(img), readonly=True)
    srv = lbd_server(["-s", "32M", "-n", kit.uri, "--nbd-cache", "2m"], manage=True)
    script = """
import random, sys
rng = random.Random(9)
for off in range(0, 1 << 20, 3 << 16):  # warm scattered pieces of the first MiB
    h.pread(4096 * (1 + off % 5), off)
bufs = []
for i in range(400):  # mixed sizes and places, 32 in flight at a time
    n = 512 * rng.randint(1, 512)
    off = 512 * rng.randrange(0, ((2 << 20) - n) // 512)
    b = nbd.Buffer(n)
    h.aio_pread(b, off)
    bufs.append((off, b))
    while h.aio_in_flight() >= 32:
        h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
for off, b in bufs:
    sys.stdout.buffer.write(off.to_bytes(8, "little") + len(b.to_bytearray()).to_bytes(4, "little"))
    sys.stdout.buffer.write(b.to_bytearray())
"""
    out = run(["nbdsh", "-u", srv.uri, "-c", "import nbd", "-c", script], input=b"").stdout
    pos = n_reads = 0
    while pos < len(out):
        off = int.from_bytes(out[pos:pos + 8], "little")
        n = int.from_bytes(out[pos + 8:pos + 12], "little")
        assert out[pos + 12:pos + 12 + n] == data[off:off + n], (off, n)
        pos += 12 + n
        n_reads += 1
    assert n_reads == 400
    reply = "\n".join(mgmt(srv, "DEVICE_INFO_STRINGS").lines)
    hits = int(re.search(r"cache (\d+) hits", reply).group(1))
    assert hits > 0, reply
    assert srv.stop() == 0

    # -X: written data held in the cache, read back mixed with the remote's
    kit2 = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-X", kit2.uri, "--nbd-cache", "2m"])
    rng = random.Random(10)
    writes = []
    for _ in range(64):
        n = 4096 * rng.randint(1, 4)
        off = 4096 * rng.randrange(0, (1 << 20) // 4096 - 4)
        payload = rng.randbytes(n)
        writes.append((off, payload))
        data[off:off + n] = payload
    recs = tmp_path / "writes.bin"
    recs.write_bytes(b"".join(o.to_bytes(8, "little") + len(p).to_bytes(4, "little") + p
                              for o, p in writes))
    nbdsh(srv.uri, f"""
raw = open({str(recs)!r}, "rb").read()
pos = 0
while pos < len(raw):
    off = int.from_bytes(raw[pos:pos + 8], "little")
    n = int.from_bytes(raw[pos + 8:pos + 12], "little")
    h.pwrite(raw[pos + 12:pos + 12 + n], off)
    pos += 12 + n
""")
    got = run(["nbdsh", "-u", srv.uri, "-c",
               "import sys; sys.stdout.buffer.write(h.pread(2 << 20, 0))"], input=b"").stdout
    assert got == data[:2 * MiB]
    assert srv.stop() == 0  # writes back
    assert img.read_bytes()[:2 * MiB] == data[:2 * MiB]


def test_writeback_cache_drains_in_the_background(remotes: Remotes, lbd_server,
                                                  tmp_path: Path) -> None:
    """-X: writes of four times the cache, 32 in flight, reach the remote with no
    FLUSH (the event loop writes the cache back, in the background from half
    full); a FLUSH and shutdown write back the rest, byte for byte."""
    img = random_file(tmp_path / "x.img", SIZE, seed=52)
    data = bytearray(img.read_bytes())
    kit = remotes.nbdkit("file", str(img))
    srv = lbd_server(["-s", "32M", "-X", kit.uri, "--nbd-cache", "1m"])
    rng = random.Random(11)
    writes = []
    # 4 MiB of 4 KiB writes at random places (each once: writes in flight
    # together may land in any order): 4x the cache
    for b in rng.sample(range(SIZE // 4096), 1024):
        off = 4096 * b
        payload = rng.randbytes(4096)
        writes.append((off, payload))
        data[off:off + 4096] = payload
    recs = tmp_path / "writes.bin"
    recs.write_bytes(b"".join(o.to_bytes(8, "little") + p for o, p in writes))
    nbdsh(srv.uri, f"""
import nbd
raw = open({str(recs)!r}, "rb").read()
for pos in range(0, len(raw), 4104):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(raw[pos + 8:pos + 4104])),
                 int.from_bytes(raw[pos:pos + 8], "little"))
    while h.aio_in_flight() >= 32:
        h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
""")  # no FLUSH: what reached the remote was written back in the background
    on_remote = img.read_bytes()
    landed = sum(on_remote[o:o + 4096] == p for o, p in writes[:512])
    assert landed > 256, f"only {landed} of the first 512 writes reached the remote"
    nbdsh(srv.uri, "h.flush()")
    assert img.read_bytes() == data
    assert srv.stop() == 0
    assert img.read_bytes() == data


def test_fua_write_through_n_keeps_its_flag(remotes: Remotes, lbd_server,
                                            tmp_path: Path) -> None:
    """-N: a FUA write goes to the remote as one WRITE with FUA (nbdkit's log
    filter shows the flag), not as a write and a separate FLUSH; its data lands."""
    img = random_file(tmp_path / "f.img", SIZE, seed=53)
    log_path = tmp_path / "kit.log"
    kit = remotes.nbdkit("--filter=log", "file", str(img), f"logfile={log_path}")
    srv = lbd_server(["-s", "32M", "-N", kit.uri])
    nbdsh(srv.uri, """
import nbd
for i in range(16):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([65 + i]) * 4096), (i * 7 + 3) * 4096,
                 flags=nbd.CMD_FLAG_FUA)
while h.aio_in_flight():
    h.poll(-1)
""")
    data = img.read_bytes()
    for i in range(16):
        off = (i * 7 + 3) * 4096
        assert data[off:off + 4096] == bytes([65 + i]) * 4096
    text = log_path.read_text()
    fua_writes = [ln for ln in text.splitlines()
                  if "Write" in ln and "count=0x1000" in ln and "fua=1" in ln]
    assert len(fua_writes) >= 16, text[-2000:]
    assert not [ln for ln in text.splitlines() if "Flush" in ln], text[-2000:]
    assert srv.stop() == 0
