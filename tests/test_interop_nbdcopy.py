"""LBD against ``nbdcopy``: whole-device copies out and in, and sparseness.

nbdcopy uses several connections at once (multi-conn) and large requests, and
it reads ``base:allocation`` to skip holes; both directions are checked
byte for byte against a model.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from support import nbdsh, require, run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 32 * MiB


def make_base(path: Path) -> bytearray:
    """A sparse base: random data at [0, 2M), [8M, 12M) and [31M, 32M)."""
    model = bytearray(SIZE)
    rng = random.Random(11)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in ((0, 2 * MiB), (8 * MiB, 4 * MiB), (31 * MiB, 1 * MiB)):
            model[off:off + n] = rng.randbytes(n)
            os.pwrite(f.fileno(), model[off:off + n], off)
    return model


def write_changes(uri: str, model: bytearray, tmp_path: Path) -> None:
    """Writes, a trim and a zero through a real client, mirrored in the model."""
    rng = random.Random(12)
    data = rng.randbytes(3 * MiB)
    (tmp_path / "changes.bin").write_bytes(data)
    ops = f"""
d = open({str(tmp_path / "changes.bin")!r}, 'rb').read()
h.pwrite(d[:{1 * MiB}], {1 * MiB + 512 * KiB})
h.pwrite(d[{1 * MiB}:{1 * MiB} + 777], {20 * MiB + 3})
h.pwrite(d[{2 * MiB}:], {28 * MiB})
h.trim({1 * MiB}, {9 * MiB})
h.zero({64 * KiB}, {31 * MiB + 64 * KiB})
h.flush()
"""
    model[1 * MiB + 512 * KiB:2 * MiB + 512 * KiB] = data[:1 * MiB]
    model[20 * MiB + 3:20 * MiB + 3 + 777] = data[1 * MiB:1 * MiB + 777]
    model[28 * MiB:29 * MiB] = data[2 * MiB:]
    model[9 * MiB:10 * MiB] = bytes(1 * MiB)
    model[31 * MiB + 64 * KiB:31 * MiB + 128 * KiB] = bytes(64 * KiB)
    nbdsh(uri, ops)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's data extents as SEEK_DATA/SEEK_HOLE see them."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    return out


def nbdcopy(*args: str) -> None:
    require("nbdcopy")
    run(["nbdcopy", *args])


def assert_same(got: bytes, want: bytes | bytearray) -> None:
    assert len(got) == len(want)
    if got != want:
        first = next(i for i in range(len(got)) if got[i] != want[i])
        raise AssertionError(f"differs from the model first at byte {first}")


# -- out of the device ---------------------------------------------------------------------


def test_nbdcopy_out_layered_stack(lbd_server, tmp_path: Path) -> None:
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "32M", "-f", str(tmp_path / "base.img"), "-E",
                      str(tmp_path / "c.lbd")])
    write_changes(srv.uri, model, tmp_path)
    nbdcopy(srv.uri, str(tmp_path / "out.img"))
    assert_same((tmp_path / "out.img").read_bytes(), model)
    # one connection, synchronous, small requests, no extents: same bytes
    nbdcopy("-C", "1", "--synchronous", "--request-size=65536", "--no-extents", srv.uri,
            str(tmp_path / "out2.img"))
    assert_same((tmp_path / "out2.img").read_bytes(), model)


def test_nbdcopy_out_read_only_base(lbd_server, tmp_path: Path) -> None:
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "32M", "-f", str(tmp_path / "base.img")])
    nbdcopy("-C", "4", srv.uri, str(tmp_path / "out.img"))
    assert_same((tmp_path / "out.img").read_bytes(), model)


def test_nbdcopy_out_is_sparse(lbd_server, tmp_path: Path) -> None:
    """Holes and zeroed ranges of the device stay holes in the copy."""
    model = make_base(tmp_path / "base.img")
    srv = lbd_server(["-s", "32M", "-f", str(tmp_path / "base.img"), "-E",
                      str(tmp_path / "c.lbd")])
    write_changes(srv.uri, model, tmp_path)
    out = tmp_path / "out.img"
    nbdcopy(srv.uri, str(out))
    assert_same(out.read_bytes(), model)
    data = 2 * MiB + 512 * KiB + 4 * MiB - 1 * MiB + 4 * KiB + 1 * MiB + 1 * MiB - 64 * KiB
    assert allocated(out) <= data + 1 * MiB, (allocated(out), data)
    # no data extent in the copy where the device has a hole or zeros
    for off, n in data_ranges(out):
        for hole_off, hole_n in ((3 * MiB, 5 * MiB), (9 * MiB, 1 * MiB), (13 * MiB, 7 * MiB),
                                 (21 * MiB, 7 * MiB)):
            assert off + n <= hole_off or off >= hole_off + hole_n, (off, n, hole_off)


# -- into the device ---------------------------------------------------------------------------


def make_source(path: Path) -> bytes:
    """A 32 MiB file: random data with real zero runs and holes in it."""
    rng = random.Random(13)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in ((0, 3 * MiB), (5 * MiB, 1 * MiB + 4 * KiB), (16 * MiB, 8 * MiB),
                       (30 * MiB, 2 * MiB)):
            os.pwrite(f.fileno(), rng.randbytes(n), off)
        os.pwrite(f.fileno(), bytes(1 * MiB), 18 * MiB)  # allocated zeros
    return path.read_bytes()


def test_nbdcopy_in_writable_stack(lbd_server, tmp_path: Path) -> None:
    """A file copied over a base with data: the device then reads as the file,
    holes in the file included (they must hide the base data under them)."""
    make_base(tmp_path / "base.img")
    src = make_source(tmp_path / "src.img")
    chg = tmp_path / "c.lbd"
    srv = lbd_server(["-s", "32M", "-f", str(tmp_path / "base.img"), "-E", str(chg)])
    nbdcopy("--flush", str(tmp_path / "src.img"), srv.uri)
    nbdcopy(srv.uri, str(tmp_path / "back.img"))
    assert_same((tmp_path / "back.img").read_bytes(), src)
    # data was copied as data, holes as zero records: the change file holds
    # about the data and not the zeros
    data = 3 * MiB + 1 * MiB + 4 * KiB + 8 * MiB + 2 * MiB
    assert allocated(chg) <= data + 2 * MiB, (allocated(chg), data)
    # and it survives a restart of the same stack
    assert srv.stop() == 0
    srv = lbd_server(["-s", "32M", "-f", str(tmp_path / "base.img"), "-E", str(chg)])
    nbdcopy(srv.uri, str(tmp_path / "back2.img"))
    assert_same((tmp_path / "back2.img").read_bytes(), src)


def test_nbdcopy_in_sparse_change_file_only(lbd_server, tmp_path: Path) -> None:
    """Copying a mostly-empty file into an empty change file stays small, and
    the device map shows data only where the file has data."""
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        os.pwrite(f.fileno(), b"\x5a" * (1 * MiB), 7 * MiB)
    chg = tmp_path / "c.lbd"
    srv = lbd_server(["-s", "32M", "-E", str(chg)])
    nbdcopy(str(src), srv.uri)
    nbdcopy(srv.uri, str(tmp_path / "back.img"))
    assert_same((tmp_path / "back.img").read_bytes(), src.read_bytes())
    assert allocated(chg) <= 2 * MiB, allocated(chg)
    m = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in m] == [
        (0, 7 * MiB, 3), (7 * MiB, 1 * MiB, 0), (8 * MiB, 24 * MiB, 3)]


def test_nbdcopy_in_writable_flat(lbd_server, tmp_path: Path) -> None:
    """Into a writable flat image (-F): the image file becomes the source."""
    make_base(tmp_path / "base.img")
    src = make_source(tmp_path / "src.img")
    srv = lbd_server(["-s", "32M", "-F", str(tmp_path / "base.img")])
    nbdcopy("--flush", str(tmp_path / "src.img"), srv.uri)
    assert srv.stop() == 0
    assert_same((tmp_path / "base.img").read_bytes(), src)
