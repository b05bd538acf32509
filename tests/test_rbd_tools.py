"""lbd-inspect and lbd-merge on stacks whose base is an RBD image (a real Ceph cluster).

- ``lbd-inspect -f rbd:POOL/IMAGE@SNAP -e C --map``: which layer serves what;
- ``lbd-merge -f rbd:POOL/IMAGE -e C``: commit a change file into the image
  (made on a snapshot the head has not moved from), crash-safe with an intent
  record in the image's metadata;
- ``lbd-merge -f ... -e C -o rbd:POOL/NEW@SNAP``: the stack as a new image.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from ceph_cluster import CephCluster
from support import TOOL_PATH, lbd_exe, nbdsh, require, run

MiB = 1 << 20
SIZE = 64 * MiB


def tool(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = str(Path(lbd_exe()).with_name(name))
    p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": TOOL_PATH})
    if check and p.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    assert "Traceback" not in p.stderr, p.stderr
    return p


def golden(ceph: CephCluster) -> tuple[str, bytes]:
    img = f"tgold-{uuid.uuid4().hex[:8]}"
    data = os.urandom(20 * MiB)
    ceph.create_image(img, SIZE, data=data, snap="v1", protect=True)
    return img, data + bytes(SIZE - len(data))


def changes(ceph: CephCluster, lbd_server, base: str, path: Path,
            expected: bytes) -> bytes:
    """Writes through a real server on ``base`` into the change file ``path``."""
    s = lbd_server(["-s", "64m", "-c", base, "-E", str(path), "--ceph-conf", ceph.conf])
    nbdsh(s.uri, f"""
h.pwrite(b'A' * (2 * 1024 * 1024), {3 * MiB})
h.pwrite(b'B' * 4096, {30 * MiB})
h.zero(1024 * 1024, {10 * MiB})
h.flush()
""")
    assert s.stop() == 0
    want = bytearray(expected)
    want[3 * MiB:5 * MiB] = b"A" * (2 * MiB)
    want[30 * MiB:30 * MiB + 4096] = b"B" * 4096
    want[10 * MiB:11 * MiB] = bytes(MiB)
    return bytes(want)


def test_inspect_a_stack_on_rbd(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    img, base = golden(ceph)
    c = tmp_path / "c.lbd"
    changes(ceph, lbd_server, f"rbd:rbd/{img}@v1", c, base)
    p = tool("lbd-inspect", "-f", f"rbd:rbd/{img}@v1", "-e", str(c), "--map", "--json",
             "--check", "--ceph-conf", ceph.conf)
    d = json.loads(p.stdout)
    rbd_file, cf = d["files"]
    assert rbd_file["format"] == "rbd" and rbd_file["rbd"]["snapshot"] == "v1"
    assert rbd_file["data_bytes"] == 20 * MiB  # five 4 MiB objects exist
    assert cf["parent"]["id"] == rbd_file["id"] and cf["parent"]["name"] == f"rbd:rbd/{img}@v1"
    rows = [(r["offset"], r["length"], r["state"], r["depth"]) for r in d["map"]]
    assert rows == [
        (0, 3 * MiB, "data", 2), (3 * MiB, 2 * MiB, "data", 1), (5 * MiB, 5 * MiB, "data", 2),
        (10 * MiB, MiB, "zero", 1), (11 * MiB, 9 * MiB, "data", 2),
        (20 * MiB, 10 * MiB, "zero", 2), (30 * MiB, 4096, "data", 1),
        (30 * MiB + 4096, 34 * MiB - 4096, "zero", 2)], rows
    # the text form, and the same stack named by the image's unchanged head
    p = tool("lbd-inspect", "-f", f"rbd:{img}", "-e", str(c), "--map", "--ceph-conf",
             ceph.conf)
    assert f"rbd:rbd/{img} <- {c}" in p.stdout and "Ceph RBD image" in p.stdout, p.stdout
    # another image is refused, and a missing one named
    other, _ = golden(ceph)
    p = tool("lbd-inspect", "-f", f"rbd:{other}@v1", "-e", str(c), "--ceph-conf", ceph.conf,
             check=False)
    assert p.returncode == 1 and "do not belong together" in p.stderr, p.stderr
    p = tool("lbd-inspect", "-f", "rbd:nope@v1", "-e", str(c), "--ceph-conf", ceph.conf,
             check=False)
    assert p.returncode == 1 and "no image 'nope'" in p.stderr, p.stderr


def test_merge_into_a_new_rbd_image(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    img, base = golden(ceph)
    c = tmp_path / "c.lbd"
    want = changes(ceph, lbd_server, f"rbd:rbd/{img}@v1", c, base)
    new = f"{img}-v2"
    p = tool("lbd-merge", "-f", f"rbd:rbd/{img}@v1", "-e", str(c), "-o",
             f"rbd:rbd/{new}@v2", "--verify", "--ceph-conf", ceph.conf)
    assert "verified" in p.stdout and "snapshot v2 created and protected" in p.stdout, p.stdout
    assert ceph.read_image(new, snap="v2") == want
    assert ceph.read_image(img, snap="v1") == base, "the source snapshot changed"
    with ceph.client() as (_, ioctx):
        import rbd

        with rbd.Image(ioctx, new, read_only=True) as im:
            assert im.is_protected_snap("v2")
        assert f"{new}.lbd-tmp" not in rbd.RBD().list(ioctx)
    # the new snapshot serves as a base at once
    s = lbd_server(["-s", "64m", "-c", f"rbd:{new}@v2", "--ceph-conf", ceph.conf])
    require("nbdcopy")
    out = run(["nbdcopy", s.uri, "-"], input=b"", timeout=300).stdout
    assert out == want
    # never overwritten
    p = tool("lbd-merge", "-f", f"rbd:rbd/{img}@v1", "-e", str(c), "-o", f"rbd:rbd/{new}",
             "--ceph-conf", ceph.conf, check=False)
    assert p.returncode == 1 and "the image exists" in p.stderr, p.stderr
    # a flat file stack can go to Ceph too
    flat = tmp_path / "flat.img"
    flat.write_bytes(want)
    p = tool("lbd-merge", "-f", str(flat), "-e", str(tmp_path / "empty.lbd"), "-o",
             f"rbd:{img}-fromfile", "--ceph-conf", ceph.conf, "--force", check=False)
    assert p.returncode == 1 and "no such file" in p.stderr  # -e must exist
    s = lbd_server(["-s", "64m", "-f", str(flat), "-E", str(tmp_path / "e.lbd")])
    nbdsh(s.uri, "h.pwrite(b'F' * 512, 0); h.flush()")
    assert s.stop() == 0
    tool("lbd-merge", "-f", str(flat), "-e", str(tmp_path / "e.lbd"), "-o",
         f"rbd:{img}-fromfile", "--verify", "--ceph-conf", ceph.conf)
    got = ceph.read_image(f"{img}-fromfile")
    assert got[:512] == b"F" * 512 and got[512:] == want[512:]


def test_merge_into_the_rbd_image_in_place(ceph: CephCluster, lbd_server,
                                           tmp_path: Path) -> None:
    """A change file made on a snapshot is committed into the (unchanged) head."""
    img, base = golden(ceph)
    c = tmp_path / "c.lbd"
    want = changes(ceph, lbd_server, f"rbd:rbd/{img}@v1", c, base)
    # refused while a server writes the image
    w = lbd_server(["-s", "64m", "-C", f"rbd:{img}", "--ceph-conf", ceph.conf])
    p = tool("lbd-merge", "-f", f"rbd:{img}", "-e", str(c), "--ceph-conf", ceph.conf,
             check=False)
    assert p.returncode == 1 and "in use by another writer" in p.stderr, p.stderr
    assert w.stop() == 0
    # a snapshot cannot be the target
    p = tool("lbd-merge", "-f", f"rbd:{img}@v1", "-e", str(c), "--ceph-conf", ceph.conf,
             check=False)
    assert p.returncode == 1 and "a snapshot is read-only" in p.stderr, p.stderr
    p = tool("lbd-merge", "-f", f"rbd:{img}", "-e", str(c), "--verify", "--ceph-conf",
             ceph.conf)
    assert f"into rbd:rbd/{img}" in p.stdout and "verified" in p.stdout, p.stdout
    assert ceph.read_image(img) == want
    assert ceph.read_image(img, snap="v1") == base, "the snapshot changed"
    # the head has moved on: the change file no longer belongs to it
    p = tool("lbd-merge", "-f", f"rbd:{img}", "-e", str(c), "--ceph-conf", ceph.conf,
             check=False)
    assert p.returncode == 1 and "do not belong together" in p.stderr, p.stderr


def test_interrupted_merge_into_rbd(ceph: CephCluster, lbd_server, tmp_path: Path) -> None:
    """The intent record in the image's metadata: serve refuses, inspect reports, a re-run
    resumes and clears it."""
    from lbd.layers.rbd import CephOptions, RBDLayer, parse_target

    img, base = golden(ceph)
    c = tmp_path / "c.lbd"
    want = changes(ceph, lbd_server, f"rbd:rbd/{img}@v1", c, base)
    cmd = ["-f", f"rbd:rbd/{img}", "-e", str(c), "--ceph-conf", ceph.conf]
    # what lbd-merge leaves when it is killed after its first step: the record
    # (written by the layer's own code), with half of the data applied
    layer = RBDLayer(parse_target(f"rbd:{img}"), SIZE, True, CephOptions(ceph.conf))
    try:
        layer.set_merge_intent({
            "tool": "lbd-merge", "version": 1, "target": f"rbd:rbd/{img}",
            "target_format": "rbd",
            "sources": [{"path": str(c.resolve()), "id": _uuid_of(c)}],
            "command": "lbd-merge " + " ".join(cmd), "started_ns": 1})
        layer.write(3 * MiB, [b"A" * MiB], MiB, False)
    finally:
        layer.close()
    # the snapshot is untouched and still serves
    s = lbd_server(["-s", "64m", "-c", f"rbd:{img}@v1", "--ceph-conf", ceph.conf])
    assert nbdsh(s.uri, "print(h.pread(16, 0).hex())").strip() == base[:16].hex()
    assert s.stop() == 0
    r = run([lbd_exe(), "serve", "-s", "64m", "-C", f"rbd:{img}", "--ceph-conf", ceph.conf,
             "--unix", str(tmp_path / "y.sock"), "-a", "none"], check=False, timeout=60)
    assert r.returncode == 2 and "half-merged" in r.stderr and "lbd-merge" in r.stderr, \
        r.stderr
    p = tool("lbd-inspect", "-f", f"rbd:{img}", "-e", str(c), "--check", "--force",
             "--ceph-conf", ceph.conf, check=False)
    assert p.returncode == 2 and "half-merged" in p.stdout, p.stdout + p.stderr
    p = tool("lbd-merge", *cmd)
    assert "resuming the interrupted merge" in p.stdout, p.stdout
    assert ceph.read_image(img) == want
    s = lbd_server(["-s", "64m", "-C", f"rbd:{img}", "--ceph-conf", ceph.conf])
    assert s.stop() == 0


def _uuid_of(path: Path) -> str:
    from lbd.layers.changefile import ChangeFile

    cf = ChangeFile.open(str(path), writable=False)
    try:
        return cf.header.uuid.hex()
    finally:
        cf.close(clean=False)
