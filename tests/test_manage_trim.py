"""TRIM through the management daemon (``lbd ctl trim``): how a FUSE-mounted
device gives space back, since pyfuse3 has no fallocate."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from fuse_support import FuseEnv
from support import LBD, TOOL_PATH, lbd_exe, mgmt, nbdsh, random_file

MiB = 1 << 20


def ctl(address: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([lbd_exe(), "ctl", "-a", address, *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PATH": TOOL_PATH})
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p


def test_ctl_trim_on_a_fuse_mount(fuse: FuseEnv, tmp_path: Path) -> None:
    change = tmp_path / "c.lbd"
    base = random_file(tmp_path / "base.img", 16 * MiB, seed=21)
    m = fuse.mount(["-s", "16M", "-f", str(base), "-E", str(change)], manage=True)
    assert m.file is not None
    with open(m.file, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x42" * (4 * MiB))
        f.flush()
        os.fsync(f.fileno())
    deadline = time.monotonic() + 30
    while os.stat(m.file).st_blocks != 16 * MiB // 512 and time.monotonic() < deadline:
        time.sleep(0.2)
    # FUSE cannot discard (pyfuse3 has no fallocate): punching a hole fails, nothing changes
    p = subprocess.run(["fallocate", "--punch-hole", "-o", str(3 * MiB), "-l", str(MiB),
                        str(m.file)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "unsupported" in p.stderr, p.stderr
    out = ctl(m.manage_address, "trim", "3m", "1M").stdout
    assert f"trimmed {MiB} bytes at {3 * MiB}" in out, out
    data = base.read_bytes()
    with open(m.file, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == b"\x42" * MiB
        assert f.read(MiB) == bytes(MiB)  # trimmed: zeros, not the base below
        assert f.read(2 * MiB) == b"\x42" * (2 * MiB)
        f.seek(0)
        assert f.read(2 * MiB) == data[:2 * MiB]
    # st_blocks counts what layers hold as data: the trimmed MiB no longer
    deadline = time.monotonic() + 30
    while os.stat(m.file).st_blocks != 15 * MiB // 512 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.stat(m.file).st_blocks == 15 * MiB // 512
    # durable: the reply came after a sync; a restart reads the same
    assert m.stop() == 0
    srv = LBD(["-s", "16M", "-f", str(base), "-E", str(change)], cwd=tmp_path)
    try:
        nbdsh(srv.uri, f"assert h.pread({MiB}, {3 * MiB}) == bytes({MiB})\n"
                       f"assert h.pread(512, {2 * MiB}) == b'\\x42' * 512")
    finally:
        assert srv.stop() == 0


def test_trim_punches_a_hole_in_a_writable_flat_image(lbd_server, tmp_path: Path) -> None:
    img = random_file(tmp_path / "disk.img", 8 * MiB, seed=22)
    srv = lbd_server(["-s", "8M", "-F", str(img)], manage=True)
    before = os.stat(img).st_blocks
    assert mgmt(srv, "TRIM", f"{MiB} {2 * MiB}").value == {"offset": MiB, "length": 2 * MiB}
    with open(img, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)
    assert os.stat(img).st_blocks <= before - 2 * MiB // 512  # the space went back
    nbdsh(srv.uri, f"assert h.pread({2 * MiB}, {MiB}) == bytes({2 * MiB})")


def test_trim_refusals(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", 8 * MiB, seed=23)
    srv = lbd_server(["-s", "8M", "-f", str(base), "-E", str(tmp_path / "c.lbd")], manage=True)
    for arg, code, words in [
        ("512 100", "BAD_REQUEST", "multiples of 512"),
        ("100 512", "BAD_REQUEST", "multiples of 512"),
        ("0 0", "BAD_REQUEST", "must not be 0"),
        (f"{8 * MiB - 512} 1024", "BAD_REQUEST", "beyond the end of the device"),
        ("0", "BAD_REQUEST", "OFFSET LENGTH"),
        ("one two", "BAD_REQUEST", "OFFSET LENGTH"),
        ("-512 512", "BAD_REQUEST", "OFFSET LENGTH"),
    ]:
        r = mgmt(srv, "TRIM", arg)
        assert not r.ok and r.code == code and words in r.message, (arg, r)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    out = nbdsh(srv.uri, f"import hashlib; print(hashlib.sha256(h.pread({8 * MiB}, 0))"
                         ".hexdigest())")
    assert out.strip() == digest  # nothing changed
    p = ctl(srv.manage_address, "trim", "1x", "512", check=False)
    assert p.returncode == 2 and "not a byte count" in p.stderr, p.stderr
    p = ctl(srv.manage_address, "trim", "0", "1000", check=False)
    assert p.returncode == 1 and "multiples of 512" in p.stderr, p.stderr


def test_trim_on_a_read_only_device(lbd_server, tmp_path: Path) -> None:
    base = random_file(tmp_path / "base.img", 4 * MiB, seed=24)
    for args in (["-f", str(base)], ["-f", str(base), "-E", str(tmp_path / "c.lbd"), "-r"]):
        srv = lbd_server(["-s", "4M", *args], manage=True)
        r = mgmt(srv, "TRIM", "0 4096")
        assert not r.ok and r.code == "READ_ONLY", r
        assert srv.stop() == 0
    assert base.read_bytes()[:4096] != bytes(4096)
