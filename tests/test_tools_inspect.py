"""lbd-inspect on change files written by real clients through a real server."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from support import random_file, require, run
from toolsupport import MiB, Stack, tool, tool_json
from v1build import V1Writer

SIZE = 16 * MiB


def _ranges(rows: list[dict], pred) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Merged [start, end) byte ranges of the rows for which pred(row) holds."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if not pred(r):
            continue
        s, e = r["start"], r["start"] + r["length"]
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _rows(rows: list[dict]) -> list[dict]:
    return [{**r, "start": r["offset"]} for r in rows]


def test_inspect_a_change_file_written_through_the_server(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=0, ops=[
        f"write -P 171 0 {MiB}", "write -P 205 524288 65536", f"write -z {4 * MiB} {MiB}"])
    d = tool_json("inspect", str(c1))
    assert d["format"] == "native" and d["version"] == 2
    assert d["device_size"] == SIZE
    assert d["parent"]["kind"] == "image" and d["parent"]["name"] == "base.img"
    assert d["data_bytes"] == MiB and d["zero_bytes"] == MiB
    assert d["dead_bytes"] == 64 * 1024  # the 64 KiB rewrite inside the first MiB
    assert len(d["id"]) == 32 and d["journal"]["index_snapshot"] is True
    text = tool("inspect", str(c1)).stdout
    assert "LBD change file, version 2" in text and "created on     image base.img" in text
    # the same through the lbd command group
    assert json.loads(run(["lbd", "inspect", "--json", str(c1)]).stdout)["id"] == d["id"]
    # the map of the lone file: data, absent (falls through), zero
    m = tool_json("inspect", "--map", str(c1))["map"]
    assert _ranges(_rows(m), lambda r: r["state"] == "data") == [(0, MiB)]
    assert _ranges(_rows(m), lambda r: r["state"] == "zero") == [(4 * MiB, 5 * MiB)]
    assert _ranges(_rows(m), lambda r: r["state"] == "absent") == [(MiB, 4 * MiB),
                                                                   (5 * MiB, SIZE)]


def test_stack_map_agrees_with_qemu_img_map_and_nbdinfo(tmp_path: Path, lbd_server) -> None:
    require("qemu-img", "nbdinfo")
    st = Stack(tmp_path, SIZE, seed=3)
    st.add_layer(lbd_server, "c1.lbd", n_writes=10)
    st.add_layer(lbd_server, "c2.lbd", n_writes=10)
    args = ["-f", str(st.base), "-e", str(st.changes[0]), "-e", str(st.changes[1])]
    d = tool_json("inspect", *args, "--map")
    ours = _rows(d["map"])
    assert sum(r["length"] for r in ours) == SIZE
    srv = lbd_server(st.layer_args())
    qm = json.loads(run(["qemu-img", "map", "--output=json", srv.uri]).stdout)
    assert _ranges(ours, lambda r: r["state"] == "zero") == \
        _ranges(qm, lambda r: r["zero"]), "zero ranges differ from qemu-img map"
    depth_out = run(["nbdinfo", "--map=lbd:allocation-depth", srv.uri]).stdout
    theirs = []
    for line in depth_out.splitlines():
        off, n, depth = (int(x) for x in line.split()[:3])
        theirs.append({"start": off, "length": n, "depth": depth})
    for depth in (1, 2, 3):
        assert _ranges(ours, lambda r, d=depth: r["depth"] == d) == \
            _ranges(theirs, lambda r, d=depth: r["depth"] == d), f"depth {depth} differs"
    # text form names the layers
    text = tool("inspect", *args, "--map").stdout
    assert "c2.lbd" in text and "base.img" in text and "Depth" in text


def test_check_exit_codes(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    clean = st.add_layer(lbd_server, "clean.lbd", n_writes=0,
                         ops=[f"write -P 7 0 {MiB}", f"write -P 8 {2 * MiB} 8192"])
    p = tool("inspect", "--check", str(clean), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check          clean" in p.stdout
    # a rewrite of part of a synced payload leaves dead space: "leaks", exit 3
    st.changes.clear()
    leaky = st.add_layer(lbd_server, "leaky.lbd", n_writes=0,
                         ops=[f"write -P 7 0 {MiB}", "flush", "write -P 9 4096 4096"])
    d = tool_json("inspect", "--check", str(leaky), expect_rc=3)
    assert d["check"]["result"] == "leaks" and "dead data" in d["check"]["leaks"][0]
    # one flipped byte in synced data: corrupt, exit 2
    data_off = next(r["file_offset"] for r in
                    tool_json("inspect", "--map", str(clean))["map"] if r["state"] == "data")
    with open(clean, "r+b") as f:
        f.seek(data_off + 100)
        b = f.read(1)
        f.seek(data_off + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    d = tool_json("inspect", "--check", str(clean), expect_rc=2)
    assert d["check"]["result"] == "corrupt"
    assert "fails its checksum" in " ".join(d["check"]["problems"])
    # both header copies damaged: corrupt, exit 2, with a message
    with open(leaky, "r+b") as f:
        for off in (100, 612):
            f.seek(off)
            f.write(b"\xff\xff")
    p = tool("inspect", "--check", str(leaky), check=False)
    assert p.returncode == 2 and "both header copies" in p.stdout + p.stderr


def test_check_finds_a_damaged_index_snapshot(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    c = st.add_layer(lbd_server, "c.lbd", n_writes=6)
    # the index snapshot is the last payload before the end of used space
    from lbd.layers.changefile import ChangeFile

    cf = ChangeFile.open(str(c), writable=False)
    h = cf.header
    raw = cf.io.pread(64, h.index_area + h.index_slot * 64)
    cf.close(clean=False)
    snap_off = struct.unpack_from("<Q", raw, 32)[0]  # entry field c: the snapshot's offset
    with open(c, "r+b") as f:
        f.seek(snap_off + 40)
        f.write(b"\x55\x55\x55\x55")
    d = tool_json("inspect", "--check", str(c), expect_rc=2)
    assert "index snapshot" in " ".join(d["check"]["problems"])


def test_a_file_being_served_is_refused_with_the_holder(tmp_path: Path, lbd_server) -> None:
    base = random_file(tmp_path / "base.img", SIZE)
    c = tmp_path / "c.lbd"
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(c)])
    for name, args in (("inspect", [str(c)]), ("compact", [str(c)]),
                       ("merge", ["-f", str(base), "-e", str(c)])):
        p = tool(name, *args, check=False)
        assert p.returncode == 1, (name, p.stdout, p.stderr)
        assert f"process {srv.proc.pid}" in p.stderr and "lbd serve" in p.stderr, p.stderr
    srv.stop()


def test_files_that_do_not_belong_together_are_refused(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=2)
    other = random_file(tmp_path / "other.img", SIZE, seed=99)
    p = tool("inspect", "-f", str(other), "-e", str(c1), check=False)
    assert p.returncode == 1 and "do not belong together" in p.stderr, p.stderr
    p = tool("inspect", "-f", str(other), "-e", str(c1), "--force", check=False)
    assert p.returncode == 0 and "--force given" in p.stdout
    # wrong order of two change files
    c2 = st.add_layer(lbd_server, "c2.lbd", n_writes=2)
    p = tool("inspect", "-f", str(st.base), "-e", str(c2), "-e", str(c1), check=False)
    assert p.returncode == 1 and "do not belong together" in p.stderr
    # not a change file at all
    p = tool("inspect", "-e", str(other), check=False)
    assert p.returncode == 1 and "not an LBD change file" in p.stderr


def test_v1_file_inspect_map_and_check(tmp_path: Path) -> None:
    p = tmp_path / "orig.v1"
    w = V1Writer(str(p))
    w.write_block(0, b"\x11" * 512)
    w.close()
    raw = p.read_bytes()
    # the layout the original's format description gives for a first write of block 0
    assert len(raw) == 0xE00 and raw[504:512] == bytes.fromhex("4c42445801010101")
    for level, table in enumerate((0, 0x200, 0x400, 0x600, 0x800)):
        assert struct.unpack_from(">Q", raw, table)[0] == table + 0x200, level
    assert struct.unpack_from(">Q", raw, 0xA00)[0] == 0xC00 and raw[0xC00:0xE00] == b"\x11" * 512
    w = V1Writer(str(p))
    w.write(8 * 512, b"\x22" * 4096)  # blocks 8..15
    w.write(20000 * 512, b"\x33" * 1024)  # another level-5 table
    w.write(0, b"\x44" * 512)  # rewritten in place
    w.close()
    d = tool_json("inspect", "--map", "--check", "-s", str(SIZE), str(p))
    assert d["format"] == "v1" and d["device_size"] == SIZE and d["parent"] is None
    assert d["check"]["result"] == "clean", d["check"]
    data = [(r["offset"], r["length"]) for r in d["map"] if r["state"] == "data"]
    assert data == [(0, 512), (8 * 512, 4096), (20000 * 512, 1024)]
    text = tool("inspect", str(p)).stdout
    assert "version 1" in text and "not recorded" in text
    # a unit that nothing references: leaked space
    with open(p, "ab") as f:
        f.write(b"\x99" * 512)
    assert tool_json("inspect", "--check", str(p), expect_rc=3)["check"]["result"] == "leaks"
    # a level-5 entry pointing past the end of the file: corrupt
    with open(p, "r+b") as f:
        f.seek(0xA00 + 8)  # block 1's entry
        f.write(struct.pack(">Q", 1 << 40))
    d = tool_json("inspect", "--check", str(p), expect_rc=2)
    assert "outside the file" in d["check"]["problems"][0]
    # without --check the same damage is an error, not data
    p2 = tool("inspect", str(p), check=False)
    assert p2.returncode == 2 and "outside the file" in p2.stderr
    assert os.path.getsize(p) > 0


def test_check_is_clean_after_random_rewrites_through_the_server(
        tmp_path: Path, lbd_server) -> None:
    """Regression: fio's random 4k rewrites (rewritten in place until a sync)
    leave the live map and a replay of the journal split into different
    extents; --check compared the splits and called a sound file corrupt."""
    require("fio")
    base = random_file(tmp_path / "base.img", SIZE, seed=11)
    c1 = tmp_path / "c1.lbd"
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(c1)])
    run(["fio", "--name=rw", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=32", "--size=16M", "--io_size=64M", "--randseed=5"],
        timeout=300)
    assert srv.stop() == 0
    p = run(["lbd-inspect", "--check", str(c1)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check          clean" in p.stdout
