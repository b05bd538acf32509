"""LIVE_ADD_LAYER under load: fio writes through several connections while layers are added.

fio's nbd engine writes every block of its range once (random order, the
random map on), each block carrying a crc32c header, then reads them all
back.  Meanwhile layers are pushed through the management daemon.  After a
SHUTDOWN the stack is reopened from DEVICE_INFO's restart command line and
checked twice: fio --verify_only replays the same writes as reads, and a
copy of the whole device taken before the shutdown must match byte for byte.
Each block was written once, so it must live in exactly one change file:
none lost, none duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from support import LBD, TOOL_PATH, mgmt, random_file, require, run

MiB = 1 << 20
SIZE = 80 * MiB  # fio writes the first 64 MiB; the rest shows the base
WRITTEN = 64 * MiB


def fio_cmd(uri: str, *args: str) -> list[str]:
    return ["fio", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
            "--verify_state_save=0", "--rw=randwrite", "--verify=crc32c", "--verify_fatal=1",
            *args]


def start_fio(uri: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
    require("fio")
    return subprocess.Popen(fio_cmd(uri, *args), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PATH": TOOL_PATH})


def finish_fio(p: subprocess.Popen[str], timeout: float = 180) -> list[dict[str, Any]]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"fio exited {p.returncode}\n{err}\n{out[-3000:]}"
    assert "verify:" not in err, err
    body = out[out.find("{"):]
    jobs = json.loads(body)["jobs"]
    for j in jobs:
        assert j["error"] == 0, j
    return jobs


def info(srv: LBD) -> dict[str, Any]:
    rep = mgmt(srv, "DEVICE_INFO")
    assert rep.kind == "OK", rep
    return rep.value


def add_layer(srv: LBD, path: Path) -> dict[str, Any]:
    rep = mgmt(srv, "LIVE_ADD_LAYER", str(path))
    assert rep.kind == "OK", rep
    assert rep.value["flushed"] is True
    return rep.value


def top_written(srv: LBD) -> int:
    return info(srv)["layers"][0]["stats"]["written_bytes"]


def layer_args(d: dict[str, Any]) -> list[str]:
    argv, out = d["command"], []
    for i, a in enumerate(argv):
        if a in ("-f", "-F", "-e", "-E"):
            out += [a, argv[i + 1]]
    return out


def copy_device(uri: str, dest: Path) -> str:
    require("nbdcopy")
    run(["nbdcopy", uri, str(dest)])
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocation(paths: list[Path]) -> list[list[tuple[int, int]]]:
    """Per change file, the sector runs holding data (``(sector, count)``)."""
    from lbd.layers.changefile import ChangeFile

    out = []
    for p in paths:
        cf = ChangeFile.open(str(p), writable=False)
        try:
            runs = [(s, n) for s, n, loc in cf.lookup(0, SIZE // 512) if loc is not None]
        finally:
            cf.close(clean=False)
        out.append(runs)
    return out


def check_each_block_in_one_layer(paths: list[Path]) -> list[int]:
    """No sector in two change files; together they hold exactly what fio wrote."""
    count = bytearray(SIZE // 512)
    per_layer = []
    for runs in allocation(paths):
        total = 0
        for s, n in runs:
            for i in range(s, s + n):
                count[i] += 1
            total += n
        per_layer.append(total * 512)
    assert max(count) == 1, "a sector is in two change files"
    assert count[:WRITTEN // 512] == b"\x01" * (WRITTEN // 512), "a written sector is missing"
    assert not any(count[WRITTEN // 512:]), "a sector fio never wrote is in a change file"
    return per_layer


def verify_restarted(lbd_server, tmp_path: Path, final: dict[str, Any], ref_sha: str,  # type: ignore[no-untyped-def]
                     fio_args: list[list[str]]) -> None:
    again = lbd_server(["-s", str(SIZE), *layer_args(final)])
    assert copy_device(again.uri, tmp_path / "after.img") == ref_sha
    for args in fio_args:
        p = start_fio(again.uri, tmp_path, *args, "--verify_only")
        jobs = finish_fio(p)
        assert all(j["read"]["io_bytes"] > 0 for j in jobs)


def test_live_add_layer_during_fio_four_connections(lbd_server, tmp_path: Path) -> None:
    """Four fio connections write at a limited rate; three layers are added mid-run."""
    base = random_file(tmp_path / "base.img", SIZE, seed=21)
    l1 = tmp_path / "l1.lbd"
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(l1)], manage=True)
    args = ["--name=live", "--bs=4k", "--iodepth=8", "--numjobs=4", "--size=16M",
            "--offset_increment=16M", "--rate_iops=1000"]
    fio = start_fio(srv.uri, tmp_path, *args)
    added = [tmp_path / f"l{i}.lbd" for i in (2, 3, 4)]
    try:
        for path in added:
            # wait for the current top to take a good share of the writes first
            deadline = time.monotonic() + 60
            while top_written(srv) < 6 * MiB:
                assert fio.poll() is None, "fio finished before the layers were added"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            during = info(srv)
            assert len(during["clients"]) == 4  # fio's connections, all writing
            r = add_layer(srv, path)
            assert r["previous"]["writable"] is False
        assert fio.poll() is None, "fio should still be writing into the last layer"
    finally:
        jobs = finish_fio(fio)
    assert len(jobs) == 4
    for j in jobs:
        assert j["write"]["io_bytes"] == 16 * MiB
        assert j["read"]["io_bytes"] >= 16 * MiB  # fio's own verify pass, through the stack
    final = info(srv)
    changes = [l1, *added]
    assert [x["param"] for x in final["layers"]] == [*map(str, reversed(changes)), str(base),
                                                     "null"]
    assert [x["writable"] for x in final["layers"]] == [True, False, False, False, False, False]
    assert layer_args(final) == ["-f", str(base), "-e", str(l1), "-e", str(added[0]),
                                 "-e", str(added[1]), "-E", str(added[2])]
    stats = {x["param"]: x["stats"]["written_bytes"] for x in final["layers"]}
    assert sum(stats[str(p)] for p in changes) == WRITTEN
    assert all(stats[str(p)] > 0 for p in changes), stats
    ref_sha = copy_device(srv.uri, tmp_path / "ref.img")
    assert mgmt(srv, "SHUTDOWN").value is True
    assert srv.wait(60) == 0
    per_layer = check_each_block_in_one_layer(changes)
    assert per_layer == [stats[str(p)] for p in changes]  # what each layer counted it holds
    with open(tmp_path / "ref.img", "rb") as a, open(base, "rb") as b:
        a.seek(WRITTEN)
        b.seek(WRITTEN)
        assert a.read() == b.read()  # the base shows through where fio did not write
    verify_restarted(lbd_server, tmp_path, final, ref_sha, [args])


def test_live_add_layer_storm_two_fio_processes(lbd_server, tmp_path: Path) -> None:
    """Two fio processes (4k and 64k blocks), a layer pushed every 50 ms.

    The 64k writes run at full speed; the 4k writes are paced (~3 s) so that
    the writes certainly span several layers: unpaced, both finish in about
    half a second here, and a slow add on a loaded machine once left all of
    them in one layer.
    """
    base = random_file(tmp_path / "base.img", SIZE, seed=22)
    l0 = tmp_path / "s00.lbd"
    srv = lbd_server(["-s", str(SIZE), "-f", str(base), "-E", str(l0)], manage=True)
    small = ["--name=small", "--bs=4k", "--iodepth=32", "--numjobs=2", "--size=16M",
             "--offset_increment=16M", "--offset=0", "--rate_iops=1200"]
    large = ["--name=large", "--bs=64k", "--iodepth=16", "--numjobs=2", "--size=16M",
             "--offset_increment=16M", "--offset=32M"]
    procs = [start_fio(srv.uri, tmp_path, *small), start_fio(srv.uri, tmp_path, *large)]
    paths = [l0]
    try:
        while any(p.poll() is None for p in procs) and len(paths) < 40:
            path = tmp_path / f"s{len(paths):02d}.lbd"
            add_layer(srv, path)
            paths.append(path)
            time.sleep(0.05)
    finally:
        for p in procs:
            finish_fio(p)
    assert len(paths) >= 3, "fio finished before layers could be added"
    final = info(srv)
    assert len(final["layers"]) == len(paths) + 2
    expected = ["-f", str(base)]
    for p in paths[:-1]:
        expected += ["-e", str(p)]
    assert layer_args(final) == [*expected, "-E", str(paths[-1])]
    ref_sha = copy_device(srv.uri, tmp_path / "ref.img")
    assert mgmt(srv, "SHUTDOWN").value is True
    assert srv.wait(60) == 0
    per_layer = check_each_block_in_one_layer(paths)
    assert sum(per_layer) == WRITTEN
    assert sum(1 for n in per_layer if n) >= 2, per_layer  # the writes really were split
    verify_restarted(lbd_server, tmp_path, final, ref_sha, [small, large])
