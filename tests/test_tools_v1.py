"""Version-1 change files (the original Java LBD's) served, written, merged and converted.

The v1 files are built by tests/v1build.py from the format description, not
by LBD's own v1 code, and what LBD writes into them is read back by that
independent reader too.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from support import random_file, require, run
from toolsupport import MiB, qemu_compare, serve_and_compare, tool, tool_json
from v1build import V1Writer, read_block

from lbd.errors import ConfigError

SIZE = 16 * MiB
SECTOR = 512


def make_v1(tmp_path: Path, seed: int = 1) -> tuple[Path, Path, bytearray]:
    """A base image, a v1 file on it with scattered writes, and the expected device."""
    base = random_file(tmp_path / "base.img", SIZE, seed)
    expected = bytearray(base.read_bytes())
    v1 = tmp_path / "orig.v1"
    w = V1Writer(str(v1))
    rng = random.Random(seed)
    for i in range(40):
        n = rng.choice([1, 8, 64, 300])
        block = rng.randrange(0, SIZE // SECTOR - n)
        data = bytes([i + 1]) * (n * SECTOR)
        w.write(block * SECTOR, data)
        expected[block * SECTOR:(block + n) * SECTOR] = data
    w.write(0, b"\xaa" * 4096)
    w.write(0, b"\xbb" * 512)  # a rewrite in place
    expected[0:4096] = b"\xbb" * 512 + b"\xaa" * 3584
    w.close()
    return base, v1, expected


def test_serve_a_v1_file(tmp_path: Path, lbd_server) -> None:
    require("nbdinfo")
    base, v1, expected = make_v1(tmp_path)
    (tmp_path / "expected.img").write_bytes(expected)
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(base), "-e", str(v1)],
                      tmp_path / "expected.img")
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-e", str(v1)])
    depth = run(["nbdinfo", "--map=lbd:allocation-depth", srv.uri]).stdout.split("\n")[0]
    assert depth.split()[:3] == ["0", "4096", "1"], depth  # blocks 0..7 are in the v1 layer
    srv.stop()


def test_write_a_v1_file_through_the_server(tmp_path: Path, lbd_server) -> None:
    require("qemu-io")
    base, v1, expected = make_v1(tmp_path, seed=2)
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(v1)])
    cmds = []
    rng = random.Random(3)
    for i in range(30):
        n = rng.choice([512, 4096, 65536, 1 << 20])
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        if i % 5 == 4:
            cmds.append(f"write -z {off} {n}")  # version 1 stores the zeros as data
            expected[off:off + n] = bytes(n)
        else:
            cmds.append(f"write -P {i + 1} {off} {n}")
            expected[off:off + n] = bytes([i + 1]) * n
    cmds.append(f"discard 0 {MiB}")  # advisory; v1 has no zero state: data stays
    args = []
    for c in cmds:
        args += ["-c", c]
    run(["qemu-io", "-f", "raw", *args, srv.uri])
    assert srv.stop() == 0
    # the independent reader sees every block the server wrote
    base_bytes = base.read_bytes()
    for b in range(SIZE // SECTOR):
        got = read_block(str(v1), b)
        want = bytes(expected[b * SECTOR:(b + 1) * SECTOR])
        if got is None:
            assert want == base_bytes[b * SECTOR:(b + 1) * SECTOR], f"block {b} missing"
        else:
            assert got == want, f"block {b}"
    d = tool_json("inspect", "--check", "-s", str(SIZE), str(v1))
    assert d["format"] == "v1" and d["check"]["result"] == "clean", d["check"]
    (tmp_path / "expected.img").write_bytes(expected)
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(base), "-e", str(v1)],
                      tmp_path / "expected.img")


def _native_on_v1(tmp_path: Path, lbd_server, base: Path, v1: Path,
                  expected: bytearray) -> Path:
    """A native change file created by lbd serve on top of the v1 file."""
    top = tmp_path / "top.lbd"
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-e", str(v1), "-E", str(top)])
    run(["qemu-io", "-f", "raw", "-c", f"write -P 77 {2 * MiB} {MiB}", "-c",
         f"write -z {5 * MiB} 65536", srv.uri])
    assert srv.stop() == 0
    expected[2 * MiB:3 * MiB] = bytes([77]) * MiB
    expected[5 * MiB:5 * MiB + 65536] = bytes(65536)
    return top


def test_convert_v1_to_native(tmp_path: Path, lbd_server) -> None:
    base, v1, expected = make_v1(tmp_path, seed=4)
    top = _native_on_v1(tmp_path, lbd_server, base, v1, expected)
    (tmp_path / "expected.img").write_bytes(expected)
    p = tool("compact", str(v1), check=False)
    assert p.returncode == 1 and "--to-native" in p.stderr
    p = tool("compact", "--to-native", str(v1), check=False)
    assert p.returncode == 1 and "device size" in p.stderr
    conv = tmp_path / "conv.lbd"
    out = tool("compact", "--to-native", "--below", str(base), str(v1), "-o", str(conv)).stdout
    assert "converted to version 2" in out
    d = tool_json("inspect", "--check", str(conv))
    assert d["format"] == "native" and d["parent"]["name"] == "base.img"
    assert d["check"]["result"] == "clean"
    # the native file created on the v1 file fits on the converted one: same id
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(base), "-e", str(conv), "-e",
                                   str(top)], tmp_path / "expected.img")
    # in place, with the size given
    tool("compact", "--to-native", "-s", str(SIZE), str(v1))
    assert tool_json("inspect", str(v1))["format"] == "native"
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(base), "-e", str(v1), "-e",
                                   str(top), "--force"], tmp_path / "expected.img")


def test_merge_with_v1_files(tmp_path: Path, lbd_server) -> None:
    base, v1, expected = make_v1(tmp_path, seed=5)
    top = _native_on_v1(tmp_path, lbd_server, base, v1, expected)
    (tmp_path / "expected.img").write_bytes(expected)
    # a new flat image of base + v1 + native
    tool("merge", "-f", str(base), "-e", str(v1), "-e", str(top), "-o",
         str(tmp_path / "flat.img"), "--verify")
    qemu_compare(tmp_path / "expected.img", tmp_path / "flat.img")
    # the native file merged into the v1 file below it: the v1 file stays v1
    tool("merge", "-s", str(SIZE), "-e", str(v1), "-e", str(top), "--verify")
    d = tool_json("inspect", "--check", "-s", str(SIZE), str(v1))
    assert d["format"] == "v1" and d["check"]["result"] == "clean", d["check"]
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(base), "-e", str(v1)],
                      tmp_path / "expected.img")
    # and the v1 file committed into the base
    tool("merge", "-f", str(base), "-e", str(v1), "--verify")
    qemu_compare(tmp_path / "expected.img", base)


def test_v1_blocks_shared_by_two_entries_are_copied_on_write(tmp_path: Path) -> None:
    """A unit test of the v1 writer beside the interop tests above."""
    import struct

    from lbd.layers.changefile_v1 import MAX_BLOCKS, V1ChangeFile

    p = tmp_path / "shared.v1"
    w = V1Writer(str(p))
    w.write_block(0, b"\x01" * SECTOR)
    w.write_block(1, b"\x02" * SECTOR)
    w.close()
    # point block 1's level-5 entry at block 0's data: two entries, one unit
    with open(p, "r+b") as f:
        f.seek(0xA00 + 8)
        f.write(struct.pack(">Q", 0xC00))
    d = tool_json("inspect", "--check", "-s", str(SIZE), str(p), expect_rc=3)  # 0xE00 leaked
    assert "referenced by several entries" in " ".join(d["check"]["notes"])
    cf = V1ChangeFile.open(str(p), writable=True, device_size=SIZE)
    assert cf.shared == {0xC00}
    cf.write(1, [b"\x03" * SECTOR], SECTOR)  # must not overwrite block 0's data
    cf.close()
    assert read_block(str(p), 0) == b"\x01" * SECTOR
    assert read_block(str(p), 1) == b"\x03" * SECTOR
    # the magic occupies root entry 63: such blocks cannot exist, and a device
    # that would need them cannot be served writable from a v1 file
    assert MAX_BLOCKS == 63 << 30
    with pytest.raises(ConfigError, match="at most"):
        V1ChangeFile.open(str(p), writable=True, device_size=(MAX_BLOCKS + 1) * SECTOR)
