"""LBD against QEMU's NBD client: ``qemu-io``, ``qemu-img compare/map/convert``.

QEMU opens the export as a raw image through an ``nbd+unix://`` URI.  Data
written with qemu-io patterns is checked by qemu-io itself (``read -P``) and
then the whole device is compared with a reference raw file built in Python.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from support import nbdsh, require, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB


def make_base(path: Path) -> bytearray:
    """A sparse base: random data at [0, 1M) and [4M, 5M), holes elsewhere."""
    model = bytearray(SIZE)
    rng = random.Random(21)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in ((0, 1 * MiB), (4 * MiB, 1 * MiB)):
            model[off:off + n] = rng.randbytes(n)
            os.pwrite(f.fileno(), model[off:off + n], off)
    return model


def qemu_io(uri: str, *cmds: str, readonly: bool = False, check: bool = True) -> str:
    require("qemu-io")
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for c in cmds:
        args += ["-c", c]
    p = run([*args, uri], check=False)
    out = p.stdout + p.stderr
    if check:
        assert p.returncode == 0, f"qemu-io exited {p.returncode}:\n{out}"
        assert "verification failed" not in out, out
        assert "error" not in out.lower(), out
    return out


def write_reference(path: Path, model: bytes | bytearray) -> Path:
    path.write_bytes(model)
    return path


def compare(uri: str, ref: Path) -> tuple[int, str]:
    require("qemu-img")
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(ref)], check=False)
    return p.returncode, p.stdout + p.stderr


def layered(lbd_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(tmp_path / "base.img"), "-E",
                      str(tmp_path / "c.lbd")])
    return srv, model


# -- qemu-io ---------------------------------------------------------------------------------


def test_qemu_io_write_read_patterns(lbd_server, tmp_path: Path) -> None:
    srv, model = layered(lbd_server, tmp_path)
    pats = [(0xAB, 0, 1 * MiB), (0x11, 2 * MiB, 64 * KiB), (0x22, 4 * MiB + 512, 3 * 512),
            (0x33, 1000, 3000), (0x44, 5 * MiB - 7, 14), (0x55, SIZE - 4096, 4096),
            (0x66, 8 * MiB, 4 * MiB)]
    cmds = []
    for p, off, n in pats:
        cmds.append(f"write -P {p:#x} {off} {n}")
        model[off:off + n] = bytes([p]) * n
    for p, off, n in pats:
        if model[off:off + n] == bytes([p]) * n:
            cmds.append(f"read -P {p:#x} {off} {n}")
    out = qemu_io(srv.uri, *cmds)
    assert out.count("wrote ") == len(pats)
    # bytes around an unaligned write kept the base data (read-modify-write)
    qemu_io(srv.uri, f"read -P 0x0 {2 * MiB - 4096} 4096", f"read -P 0x0 {2 * MiB + 64 * KiB} 4096")
    ref = write_reference(tmp_path / "ref.img", model)
    assert compare(srv.uri, ref) == (0, "Images are identical.\n")


def test_qemu_io_write_zeroes_and_discard(lbd_server, tmp_path: Path) -> None:
    srv, model = layered(lbd_server, tmp_path)
    qemu_io(srv.uri,
            "write -z 0 64k",  # over base data
            "write -z -u 256k 256k",  # zero, may unmap
            "write -z 4194404 1000",  # unaligned, over base data
            "write -P 0x77 2M 1M",
            "write -z 2M 512k",  # over data written just now
            "discard 4718592 64k",  # trim over base data
            "read -P 0 0 64k", "read -P 0 256k 256k", "read -P 0 4194404 1000",
            "read -P 0 2M 512k", "read -P 0x77 2621440 512k", "read -P 0 4718592 64k")
    for off, n in ((0, 64 * KiB), (256 * KiB, 256 * KiB), (4194404, 1000),
                   (4718592, 64 * KiB)):
        model[off:off + n] = bytes(n)
    model[2 * MiB:3 * MiB] = b"\x77" * MiB
    model[2 * MiB:2 * MiB + 512 * KiB] = bytes(512 * KiB)
    ref = write_reference(tmp_path / "ref.img", model)
    assert compare(srv.uri, ref)[0] == 0


def test_qemu_io_read_only_export_refuses_writes(lbd_server, tmp_path: Path) -> None:
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(tmp_path / "base.img")])
    out = qemu_io(srv.uri, "write -P 0x1 0 4k", check=False)
    assert "wrote 4096" not in out, out
    qemu_io(srv.uri, f"read -P 0 {1 * MiB} 3M", readonly=True)
    assert srv.stop() == 0
    assert (tmp_path / "base.img").read_bytes() == model


# -- qemu-img ----------------------------------------------------------------------------------


def test_qemu_img_compare_layered_stack(lbd_server, tmp_path: Path) -> None:
    srv, model = layered(lbd_server, tmp_path)
    nbdsh(srv.uri, f"""
h.pwrite(b'\\x99' * {64 * KiB}, {512 * KiB})
h.pwrite(b'\\x98' * 100, {3 * MiB + 5})
h.trim({64 * KiB}, {4 * MiB + 256 * KiB})
h.zero({1 * MiB}, {8 * MiB})
""")
    model[512 * KiB:576 * KiB] = b"\x99" * (64 * KiB)
    model[3 * MiB + 5:3 * MiB + 105] = b"\x98" * 100
    model[4 * MiB + 256 * KiB:4 * MiB + 320 * KiB] = bytes(64 * KiB)
    ref = write_reference(tmp_path / "ref.img", model)
    assert compare(srv.uri, ref) == (0, "Images are identical.\n")
    # one byte off in the reference: reported in exactly that sector
    # (qemu-img compare reports the start of the first differing sector)
    model[3 * MiB + 50] ^= 0xFF
    write_reference(ref, model)
    code, out = compare(srv.uri, ref)
    assert code == 1, out
    assert f"Content mismatch at offset {3 * MiB}!" in out


def test_qemu_img_map_json(lbd_server, tmp_path: Path) -> None:
    srv, _ = layered(lbd_server, tmp_path)
    nbdsh(srv.uri, f"""
h.pwrite(b'\\x01' * {64 * KiB}, {512 * KiB})
h.pwrite(b'\\x02' * {128 * KiB}, {2 * MiB})
h.trim({64 * KiB}, {4 * MiB + 256 * KiB})
h.zero({1 * MiB}, {8 * MiB})
""")
    require("qemu-img")
    got = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri]).stdout)
    runs = [(e["start"], e["length"], e["data"], e["zero"]) for e in got]
    data, hole = (True, False), (False, True)
    want = []
    pos = 0
    for n, kind in ((1 * MiB, data), (1 * MiB, hole), (128 * KiB, data),
                    (2 * MiB - 128 * KiB, hole), (256 * KiB, data), (64 * KiB, hole),
                    (704 * KiB, data), (11 * MiB, hole)):
        want.append((pos, n, *kind))
        pos += n
    assert pos == SIZE
    assert runs == want


def test_qemu_img_info_size(lbd_server, tmp_path: Path) -> None:
    srv, _ = layered(lbd_server, tmp_path)
    require("qemu-img")
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", srv.uri]).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_img_convert_out_and_in(lbd_server, tmp_path: Path) -> None:
    srv, model = layered(lbd_server, tmp_path)
    require("qemu-img")
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(tmp_path / "out.img")])
    assert (tmp_path / "out.img").read_bytes() == model
    # in: a new image over the stack (-n: the target exists)
    rng = random.Random(22)
    new = bytearray(SIZE)
    new[3 * MiB:7 * MiB] = rng.randbytes(4 * MiB)
    src = write_reference(tmp_path / "src.img", new)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
    assert compare(srv.uri, src)[0] == 0
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(tmp_path / "out2.img")])
    assert (tmp_path / "out2.img").read_bytes() == new
