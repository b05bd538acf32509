"""LBD against ``nbdinfo`` (libnbd): export facts, listings and allocation maps.

The map tests build a real layered stack: a sparse flat base with data and
holes, a change file on top written, trimmed and zeroed through a real
client (nbdsh), and then check the exact extents nbdinfo reports for
``base:allocation`` and ``lbd:allocation-depth``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from support import nbdsh, require, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB

DATA = 0
HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO

# the sparse base: data at [0, 1M) and [4M, 5M), holes elsewhere
BASE_DATA = [(0, 1 * MiB), (4 * MiB, 1 * MiB)]


def make_base(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in BASE_DATA:
            os.pwrite(f.fileno(), os.urandom(n), off)
    return path


def nbdinfo_json(*args: str) -> dict[str, Any]:
    require("nbdinfo")
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    require("nbdinfo")
    opt = "--map" if context == "base:allocation" else f"--map={context}"
    out = json.loads(run(["nbdinfo", opt, "--json", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def runs(spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(length, type)`` runs laid end to end -> ``(offset, length, type)``."""
    out, pos = [], 0
    for length, kind in spans:
        out.append((pos, length, kind))
        pos += length
    assert pos == SIZE
    return out


def only_export(info: dict[str, Any]) -> dict[str, Any]:
    assert len(info["exports"]) == 1, info
    return info["exports"][0]


# -- export facts --------------------------------------------------------------------------


def test_nbdinfo_size_flags_and_contexts_writable(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    info = nbdinfo_json(srv.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    e = only_export(info)
    assert e["export-size"] == SIZE
    assert e["export-name"] == ""
    assert e["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                "can_df", "can_multi_conn"):
        assert e[cap] is True, cap
    assert sorted(e["contexts"]) == ["base:allocation", "lbd:allocation-depth"]
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] >= 1 * MiB
    # the plain (human) output says the same
    text = run(["nbdinfo", srv.uri]).stdout
    assert "export-size: 16777216" in text
    assert "lbd:allocation-depth" in text


def test_nbdinfo_size_only(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-b", str(48 * MiB // 512), "-E", str(tmp_path / "c.lbd")])
    assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == str(48 * MiB)


def test_nbdinfo_read_only_flat_base(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base)])
    e = only_export(nbdinfo_json(srv.uri))
    assert e["is_read_only"] is True
    assert e["can_trim"] is False
    assert e["can_zero"] is False
    # `nbdinfo --can write` exits 2 for "no"
    assert run(["nbdinfo", "--can", "write", srv.uri], check=False).returncode != 0
    assert run(["nbdinfo", "--can", "read", srv.uri], check=False).returncode == 0


def test_nbdinfo_read_only_flag_option(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd"), "--readonly"])
    e = only_export(nbdinfo_json(srv.uri))
    assert e["is_read_only"] is True
    assert run(["nbdinfo", "--can", "write", srv.uri], check=False).returncode != 0


def test_nbdinfo_export_name_and_description(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd"),
                      "--description", "scratch disk"], export="disk1")
    e = only_export(nbdinfo_json(srv.uri))
    assert e["export-name"] == "disk1"
    assert e["export-size"] == SIZE
    assert e.get("description") == "scratch disk"
    # a name the server does not have is refused
    sock = srv.sock
    for wrong in ("", "disk2"):
        p = run(["nbdinfo", f"nbd+unix:///{wrong}?socket={sock}"], check=False)
        assert p.returncode != 0, p.stdout
        assert "opt_go" in p.stderr or "export" in p.stderr.lower(), p.stderr


def test_nbdinfo_list(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd"),
                      "--description", "the one export"], export="vol0")
    info = nbdinfo_json("--list", srv.uri)
    e = only_export(info)
    assert e["export-name"] == "vol0"
    assert e["description"] == "the one export"
    assert e["export-size"] == SIZE
    assert sorted(e["contexts"]) == ["base:allocation", "lbd:allocation-depth"]
    text = run(["nbdinfo", "--list", srv.uri]).stdout
    assert 'export="vol0"' in text
    assert "the one export" in text


def test_nbdinfo_list_default_export(lbd_server, tmp_path: Path) -> None:
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    e = only_export(nbdinfo_json("--list", srv.uri))
    assert e["export-name"] == ""
    assert e["export-size"] == SIZE


# -- maps of a layered stack -----------------------------------------------------------------

# change-file operations done by a client over the base above
WRITES = [(512 * KiB, 64 * KiB), (2 * MiB, 128 * KiB)]  # over base data, over a base hole
TRIM = (4 * MiB + 256 * KiB, 64 * KiB)  # over base data
ZERO = (8 * MiB, 1 * MiB)  # over a base hole
ZERO_OVER_DATA = (4 * MiB + 768 * KiB, 128 * KiB)  # over base data: must read zero


def write_layered(uri: str) -> None:
    nbdsh(uri, "\n".join([
        *(f"h.pwrite(b'\\xa5' * {n}, {off})" for off, n in WRITES),
        f"h.trim({TRIM[1]}, {TRIM[0]})",
        f"h.zero({ZERO[1]}, {ZERO[0]})",
        f"h.zero({ZERO_OVER_DATA[1]}, {ZERO_OVER_DATA[0]})",
        "h.flush()",
        f"assert h.pread({TRIM[1]}, {TRIM[0]}) == bytes({TRIM[1]})",
        f"assert h.pread({ZERO_OVER_DATA[1]}, {ZERO_OVER_DATA[0]}) == bytes({ZERO_OVER_DATA[1]})",
    ]))


def test_nbdinfo_map_flat_base_alone(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base)])
    assert nbdinfo_map(srv.uri) == runs([
        (1 * MiB, DATA), (3 * MiB, HOLE_ZERO), (1 * MiB, DATA), (11 * MiB, HOLE_ZERO)])
    # one layer: everything comes from depth 1, holes included
    assert nbdinfo_map(srv.uri, "lbd:allocation-depth") == [(0, SIZE, 1)]


def test_nbdinfo_map_base_allocation_layered(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    write_layered(srv.uri)
    assert nbdinfo_map(srv.uri) == runs([
        (1 * MiB, DATA),  # base data, with a change-file write inside
        (1 * MiB, HOLE_ZERO),
        (128 * KiB, DATA),  # written over a base hole
        (2 * MiB - 128 * KiB, HOLE_ZERO),
        (256 * KiB, DATA),
        (64 * KiB, HOLE_ZERO),  # trimmed: masks the base data
        (448 * KiB, DATA),
        (128 * KiB, HOLE_ZERO),  # zeroed over base data
        (128 * KiB, DATA),
        (11 * MiB, HOLE_ZERO),  # base hole, the zeroed 1M, base hole
    ])


def test_nbdinfo_map_allocation_depth_layered(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    write_layered(srv.uri)
    assert nbdinfo_map(srv.uri, "lbd:allocation-depth") == runs([
        (512 * KiB, 2),
        (64 * KiB, 1),  # written
        (2 * MiB - 576 * KiB, 2),
        (128 * KiB, 1),  # written
        (2 * MiB + 128 * KiB, 2),
        (64 * KiB, 1),  # trimmed
        (448 * KiB, 2),
        (128 * KiB, 1),  # zeroed over data
        (3 * MiB + 128 * KiB, 2),
        (1 * MiB, 1),  # zeroed over a hole
        (7 * MiB, 2),
    ])


def test_nbdinfo_map_three_layers(lbd_server, tmp_path: Path) -> None:
    """base <- c1 (read-only, written earlier) <- c2 (writable): depths 3, 2, 1."""
    base = make_base(tmp_path / "base.img")
    c1, c2 = tmp_path / "c1.lbd", tmp_path / "c2.lbd"
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(c1)])
    nbdsh(srv.uri, f"h.pwrite(b'\\x01' * {1 * MiB}, {2 * MiB}); h.trim({64 * KiB}, 0)")
    assert srv.stop() == 0
    srv = lbd_server(["-s", "16M", "-f", str(base), "-e", str(c1), "-E", str(c2)])
    nbdsh(srv.uri, f"h.pwrite(b'\\x02' * {256 * KiB}, {2 * MiB + 512 * KiB})")
    assert nbdinfo_map(srv.uri, "lbd:allocation-depth") == runs([
        (64 * KiB, 2),  # trimmed in c1
        (2 * MiB - 64 * KiB, 3),
        (512 * KiB, 2),
        (256 * KiB, 1),
        (256 * KiB, 2),
        (13 * MiB, 3),
    ])
    assert nbdinfo_map(srv.uri) == runs([
        (64 * KiB, HOLE_ZERO),
        (1 * MiB - 64 * KiB, DATA),
        (1 * MiB, HOLE_ZERO),
        (1 * MiB, DATA),
        (1 * MiB, HOLE_ZERO),
        (1 * MiB, DATA),
        (11 * MiB, HOLE_ZERO),
    ])


def test_nbdinfo_map_change_file_without_base(lbd_server, tmp_path: Path) -> None:
    """No base: unwritten sectors come from the null layer, depth 0."""
    srv = lbd_server(["-s", "16M", "-E", str(tmp_path / "c.lbd")])
    assert nbdinfo_map(srv.uri) == [(0, SIZE, HOLE_ZERO)]
    assert nbdinfo_map(srv.uri, "lbd:allocation-depth") == [(0, SIZE, 0)]
    nbdsh(srv.uri, f"h.pwrite(b'x' * {4 * KiB}, {1 * MiB}); h.zero({8 * KiB}, {3 * MiB})")
    assert nbdinfo_map(srv.uri) == runs([
        (1 * MiB, HOLE_ZERO), (4 * KiB, DATA), (15 * MiB - 4 * KiB, HOLE_ZERO)])
    assert nbdinfo_map(srv.uri, "lbd:allocation-depth") == runs([
        (1 * MiB, 0), (4 * KiB, 1), (2 * MiB - 4 * KiB, 0), (8 * KiB, 1),
        (13 * MiB - 8 * KiB, 0)])


def test_nbdinfo_map_totals(lbd_server, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "16M", "-f", str(base), "-E", str(tmp_path / "c.lbd")])
    write_layered(srv.uri)
    totals = json.loads(run(["nbdinfo", "--map", "--totals", "--json", srv.uri]).stdout)
    by_type = {t["type"]: t["size"] for t in totals}
    data = 2 * MiB + 128 * KiB - 64 * KiB - 128 * KiB
    assert by_type == {DATA: data, HOLE_ZERO: SIZE - data}
