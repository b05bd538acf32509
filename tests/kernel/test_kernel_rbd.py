"""The Linux kernel nbd client over LBD over Ceph RBD (a real single-node cluster).

The seed's use case with the base in Ceph: an ext4 golden image is imported
into an RBD image and snapshotted; LBD serves the protected snapshot with a
change file on top to the kernel in the VM, which mounts it, reads the golden
files, changes some and checks the file system.  On the host, a second LBD
over the same snapshot with its own change file still reads as the golden
image, and the snapshot is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ceph_cluster import CephCluster
from kernel_harness import MiB, Servers, Vm, sha256
from test_kernel_nbd import make_ext4

pytestmark = pytest.mark.kernel


def test_ext4_over_an_rbd_snapshot(ceph: CephCluster, servers: Servers, vm: Vm,
                                   tmp_path: Path) -> None:
    original = {"keep.txt": b"kept as it was\n" * 50, "change.bin": os.urandom(MiB),
                "dir/deep.txt": b"deep\n" * 10}
    base = tmp_path / "base.img"
    make_ext4(base, 64, original)
    base_bytes = base.read_bytes()
    image = f"kgolden-{os.getpid()}"
    ceph.create_image(image, len(base_bytes), data=base_bytes, snap="golden", protect=True)
    spec = f"rbd:rbd/{image}@golden"
    conf = ["--ceph-conf", ceph.conf]
    change, other = tmp_path / "host1.lbd", tmp_path / "host2.lbd"
    a = servers.start("a", size="64m", layers=[("-c", spec), ("-E", change)], export="a",
                      extra=conf)
    new_change, added = os.urandom(MiB + 12345), os.urandom(700 * 1024)
    names = " ".join(original)
    run = vm.boot(f"""
nbd_attach /dev/nbd0 a nbd0
mount -t ext4 /dev/nbd0 /mnt
for f in {names}; do result "before:$f" "$(sha /mnt/$f)"; done
cp new-change.bin /mnt/change.bin
cp added.bin /mnt/added.bin
sync
umount /mnt
rc=0
e2fsck -fn /dev/nbd0 || rc=$?
result fsck "$rc"
drop_caches
mount -t ext4 -o ro /dev/nbd0 /mnt
for f in keep.txt change.bin added.bin; do result "after:$f" "$(sha /mnt/$f)"; done
umount /mnt
nbd_detach /dev/nbd0
""", {"nbd0": a}, files={"new-change.bin": new_change, "added.bin": added})
    for name, data in original.items():
        run.expect(f"before:{name}", sha256(data))
    run.expect("fsck", 0)
    run.expect("after:keep.txt", sha256(original["keep.txt"]))
    run.expect("after:change.bin", sha256(new_change))
    run.expect("after:added.bin", sha256(added))
    tap = run.taps["nbd0"]
    run.check(tap.commands["READ"] > 0 and tap.commands["WRITE"] > 0,
              f"expected the kernel's reads and writes: {tap.summary()}")
    # another host's server over the same snapshot sees none of it
    b = servers.start("b", size="64m", layers=[("-c", spec), ("-E", other)], export="b",
                      extra=conf)
    run.check(b.read_all(tmp_path / "b.img") == base_bytes,
              "a second LBD over the snapshot does not read as the golden image")
    a.stop()
    b.stop()
    assert change.stat().st_size >= len(new_change), "the writes are not in the change file"
    assert sha256(ceph.read_image(image, snap="golden")) == sha256(base_bytes), \
        "the RBD snapshot changed"
