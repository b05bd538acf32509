"""LBD against the real Linux kernel nbd client (nbd.ko + nbd-client) in a VM.

Each test serves an LBD device on a Unix socket on the host, boots a Debian
kernel under QEMU whose /dev/nbdN reaches it through virtio-serial ports (see
conftest.py), runs a shell script in the guest, and then checks on the host,
through ``nbdcopy``/``nbdinfo`` against the still-running server and in the
layer files after the server stopped, that the kernel's I/O landed where it
must.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from kernel_harness import (
    CLIENT_FIXED_NEWSTYLE,
    OPT_EXPORT_NAME,
    MiB,
    Servers,
    Vm,
    run_tool,
    sha256,
)

pytestmark = pytest.mark.kernel

ZERO_MIB = sha256(bytes(MiB))


def zeros_sha(mib: int) -> str:
    return sha256(bytes(mib * MiB))


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def make_ext4(image: Path, size_mib: int, tree: dict[str, bytes]) -> None:
    """An ext4 file system holding ``tree`` (relative path -> content), made on the host."""
    src = image.with_name(image.name + ".d")
    for rel, data in tree.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    run_tool(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", "-L", "lbdbase",
              "-d", str(src), str(image)], "mkfs.ext4 -d")


def host_fsck(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, f"host e2fsck -fn {image.name}:\n{proc.stdout}{proc.stderr}"


def debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat /{path}", str(image)], capture_output=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def blocks(data: bytes, size: int = 4096) -> set[bytes]:
    return {data[i:i + size] for i in range(0, len(data) - size + 1, size)}


# -- 1. connect, size, a pattern, and the host's view -------------------------------------


def test_connect_size_and_pattern(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    size = 96 * MiB
    pattern = os.urandom(8 * MiB)
    srv = servers.start("plain", size="96m", layers=[("-E", tmp_path / "change.lbd")],
                        export="kernel1")
    run = vm.boot("""
nbd_attach /dev/nbd0 kernel1 nbd0
result size "$(blockdev --getsize64 /dev/nbd0)"
result ro "$(blockdev --getro /dev/nbd0)"
result sector "$(blockdev --getss /dev/nbd0)"
result zeros-before "$(sha /dev/nbd0 1 8)"
dd if=pattern.bin of=/dev/nbd0 bs=1M seek=1 oflag=direct status=none
drop_caches
result readback "$(sha /dev/nbd0 1 8)"
result head "$(sha /dev/nbd0 0 1)"
result whole "$(sha /dev/nbd0)"
nbd_detach /dev/nbd0
""", {"nbd0": srv}, files={"pattern.bin": pattern})
    expected = bytearray(size)
    expected[MiB:9 * MiB] = pattern
    run.expect("size", size)
    run.expect("ro", 0)
    run.expect("sector", 4096)
    run.expect("zeros-before", zeros_sha(8))
    run.expect("readback", sha256(pattern))
    run.expect("head", ZERO_MIB)
    run.expect("whole", sha256(bytes(expected)))
    # what the kernel's client sent: fixed newstyle, NBD_OPT_GO for the export
    # (not the old NBD_OPT_EXPORT_NAME), writes, reads and a clean disconnect
    tap = run.taps["nbd0"]
    run.check(tap.client_flags is not None and tap.client_flags & CLIENT_FIXED_NEWSTYLE,
              f"the client did not set NBD_FLAG_C_FIXED_NEWSTYLE: {tap.summary()}")
    run.check(tap.export_names() == ["kernel1"], f"no NBD_OPT_GO for 'kernel1': {tap.summary()}")
    run.check(not any(o == OPT_EXPORT_NAME for o, _ in tap.options),
              f"the client fell back to NBD_OPT_EXPORT_NAME: {tap.summary()}")
    run.check(tap.commands["WRITE"] > 0 and tap.commands["READ"] > 0
              and tap.commands["DISC"] == 1, f"unexpected requests: {tap.summary()}")
    # the host, through the server the guest left running
    image = srv.read_all(tmp_path / "seen.img")
    run.check(len(image) == size, f"nbdcopy read {len(image)} bytes")
    run.check(image[MiB:9 * MiB] == pattern, "nbdcopy does not see the guest's pattern")
    run.check(image == expected, "nbdcopy sees something besides the pattern")
    srv.stop()


# -- 2. ext4 end to end -------------------------------------------------------------------


def test_ext4_end_to_end(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(128 * MiB)
    base_sha = sha256(base)
    change = tmp_path / "change.lbd"
    files = {"a.bin": os.urandom(3 * MiB), "b.bin": os.urandom(200 * 1024),
             "c.txt": b"layered block device\n" * 100}
    srv = servers.start("ext4", size="128m", layers=[("-f", base), ("-E", change)],
                        export="ext4")
    run = vm.boot("""
nbd_attach /dev/nbd0 ext4 nbd0
# mke2fs as a user runs it: it discards the whole device first
mke2fs -q -t ext4 -b 4096 -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
mkdir -p /mnt/dir/sub
cp a.bin /mnt/a.bin
cp b.bin /mnt/dir/b.bin
cp c.txt /mnt/dir/sub/c.txt
sync
umount /mnt
rc=0
e2fsck -fn /dev/nbd0 || rc=$?
result fsck "$rc"
drop_caches
mount -t ext4 -o ro /dev/nbd0 /mnt
result a.bin "$(sha /mnt/a.bin)"
result b.bin "$(sha /mnt/dir/b.bin)"
result c.txt "$(sha /mnt/dir/sub/c.txt)"
umount /mnt
nbd_detach /dev/nbd0
""", {"nbd0": srv}, files=files)
    run.expect("fsck", 0)
    for name, data in files.items():
        run.expect(name, sha256(data))
    tap = run.taps["nbd0"]
    run.check(tap.commands["TRIM"] > 0 and tap.commands["FLUSH"] > 0 and tap.fua > 0,
              f"expected mke2fs's TRIM, and ext4's FLUSH and FUA writes: {tap.summary()}")
    image = tmp_path / "seen.img"
    srv.read_all(image)
    host_fsck(image)
    run.check(debugfs_cat(image, "a.bin") == files["a.bin"], "host debugfs: a.bin differs")
    run.check(debugfs_cat(image, "dir/sub/c.txt") == files["c.txt"],
              "host debugfs: c.txt differs")
    srv.stop()
    assert sha256(base) == base_sha, "the read-only flat base changed"
    assert change.stat().st_size >= len(files["a.bin"]), \
        f"the change file holds only {change.stat().st_size} bytes"


# -- 3. layering, seen from the kernel ----------------------------------------------------


def test_layering(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    original = {"keep.txt": b"kept as it was\n" * 50, "change.bin": os.urandom(MiB),
                "remove.bin": os.urandom(512 * 1024), "dir/deep.txt": b"deep\n" * 10}
    base = tmp_path / "base.img"
    make_ext4(base, 64, original)
    base_sha = sha256(base)
    base_bytes = base.read_bytes()
    c1, c2 = tmp_path / "c1.lbd", tmp_path / "c2.lbd"
    new_change, added = os.urandom(MiB + 12345), os.urandom(700 * 1024)
    a = servers.start("a", size="64m", layers=[("-f", base), ("-E", c1)], export="a")
    b = servers.start("b", size="64m", layers=[("-f", base), ("-E", c2)], export="b")
    names = " ".join(original)
    run = vm.boot(f"""
nbd_attach /dev/nbd0 a nbd0
mount -t ext4 /dev/nbd0 /mnt
for f in {names}; do result "a-before:$f" "$(sha /mnt/$f)"; done
cp new-change.bin /mnt/change.bin
rm /mnt/remove.bin
cp added.bin /mnt/added.bin
sync
umount /mnt
rc=0
e2fsck -fn /dev/nbd0 || rc=$?
result a-fsck "$rc"
nbd_detach /dev/nbd0

nbd_attach /dev/nbd1 b nbd1
mount -t ext4 -o ro /dev/nbd1 /mnt
for f in {names}; do result "b:$f" "$(sha /mnt/$f)"; done
if [ -e /mnt/added.bin ]; then result b-added yes; else result b-added no; fi
umount /mnt
rc=0
e2fsck -fn /dev/nbd1 || rc=$?
result b-fsck "$rc"
nbd_detach /dev/nbd1
""", {"nbd0": a, "nbd1": b}, files={"new-change.bin": new_change, "added.bin": added})
    for name, data in original.items():
        run.expect(f"a-before:{name}", sha256(data))
        run.expect(f"b:{name}", sha256(data))
    run.expect("a-fsck", 0)
    run.expect("b-fsck", 0)
    run.expect("b-added", "no")
    # the second device, over the same base with its own change file, is the base
    run.check(b.read_all(tmp_path / "b.img") == base_bytes,
              "the second LBD over the same base does not read as the base")
    a.stop()
    b.stop()
    assert sha256(base) == base_sha, "the read-only flat base changed"
    assert c1.stat().st_size >= len(new_change), \
        f"the change file holds only {c1.stat().st_size} bytes"
    c1_sha = sha256(c1)

    # the delta survives the server's restart, here as a read-only layer
    c = servers.start("c", size="64m", layers=[("-f", base), ("-e", c1)], export="c")
    run = vm.boot("""
nbd_attach /dev/nbd0 c nbd0
result ro "$(blockdev --getro /dev/nbd0)"
mount -t ext4 -o ro /dev/nbd0 /mnt
for f in keep.txt change.bin added.bin dir/deep.txt; do result "c:$f" "$(sha /mnt/$f)"; done
if [ -e /mnt/remove.bin ]; then result c-removed no; else result c-removed yes; fi
umount /mnt
rc=0
e2fsck -fn /dev/nbd0 || rc=$?
result c-fsck "$rc"
nbd_detach /dev/nbd0
""", {"nbd0": c})
    run.expect("ro", 1)
    run.expect("c:keep.txt", sha256(original["keep.txt"]))
    run.expect("c:dir/deep.txt", sha256(original["dir/deep.txt"]))
    run.expect("c:change.bin", sha256(new_change))
    run.expect("c:added.bin", sha256(added))
    run.expect("c-removed", "yes")
    run.expect("c-fsck", 0)
    c.stop()
    assert sha256(base) == base_sha, "the read-only flat base changed"
    assert sha256(c1) == c1_sha, "the read-only change file changed"


# -- 4. read-only exports -----------------------------------------------------------------


def test_readonly(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    tree = {"keep.txt": b"read me\n" * 100}
    base = tmp_path / "base.img"
    make_ext4(base, 32, tree)
    c1, c2 = tmp_path / "c1.lbd", tmp_path / "c2.lbd"
    for c in (c1, c2):
        servers.start(f"make-{c.stem}", size="32m", layers=[("-f", base), ("-E", c)]).stop()
    before = {p: sha256(p) for p in (base, c1, c2)}
    # a writable stack served --readonly, and a stack of read-only layers only
    r1 = servers.start("r1", size="32m", layers=[("-f", base), ("-E", c1)],
                       export="r1", readonly=True)
    # (this one as the default export, which nbd-client asks for without -N)
    r2 = servers.start("r2", size="32m", layers=[("-f", base), ("-e", c2)], export="")
    run = vm.boot("""
for n in 1 2; do
    dev=/dev/nbd$n
    if [ $n = 1 ]; then export=r1; else export=""; fi
    nbd_attach $dev "$export" nbd$n
    result r$n-ro "$(blockdev --getro $dev)"
    rc=0
    dd if=/dev/zero of=$dev bs=4096 count=1 oflag=direct status=none || rc=$?
    result r$n-dd "$rc"
    rc=0
    blkdiscard -f $dev || rc=$?
    result r$n-discard "$rc"
    rc=0
    mount -t ext4 -o rw $dev /mnt || rc=$?
    result r$n-mount-rw "$rc"
    if [ "$rc" = 0 ]; then
        rc=0
        touch /mnt/new || rc=$?
        result r$n-touch "$rc"
        umount /mnt
    fi
    mount -t ext4 -o ro $dev /mnt
    result r$n-keep "$(sha /mnt/keep.txt)"
    umount /mnt
    rc=0
    e2fsck -fn $dev || rc=$?
    result r$n-fsck "$rc"
    nbd_detach $dev
done
""", {"nbd1": r1, "nbd2": r2})
    for n in (1, 2):
        run.expect(f"r{n}-ro", 1)
        run.check(run[f"r{n}-dd"] != "0", f"a write to read-only export r{n} succeeded")
        run.check(run[f"r{n}-discard"] != "0", f"a discard on read-only export r{n} succeeded")
        if run[f"r{n}-mount-rw"] == "0":  # busybox mount falls back to read-only
            run.check(run[f"r{n}-touch"] != "0", f"a file was created on read-only r{n}")
        run.expect(f"r{n}-keep", sha256(tree["keep.txt"]))
        run.expect(f"r{n}-fsck", 0)
        tap = run.taps[f"nbd{n}"]
        run.check(tap.commands["READ"] > 0 and not tap.commands.keys() & {
            "WRITE", "TRIM", "WRITE_ZEROES"}, f"port nbd{n}: {tap.summary()}")
    r1.stop()
    r2.stop()
    for p, digest in before.items():
        assert sha256(p) == digest, f"{p.name} changed under a read-only export"


# -- 5. TRIM: blkdiscard and fstrim -------------------------------------------------------


def test_trim(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    # random bases: trimmed sectors must read as zeros, not fall through to them
    base1 = random_file(tmp_path / "base1.img", 32 * MiB)
    base2 = random_file(tmp_path / "base2.img", 64 * MiB)
    junk1, junk2 = os.urandom(8 * MiB), os.urandom(4 * MiB)
    t1 = servers.start("t1", size="32m", export="t1",
                       layers=[("-f", tmp_path / "base1.img"), ("-E", tmp_path / "c1.lbd")])
    t2 = servers.start("t2", size="64m", export="t2",
                       layers=[("-f", tmp_path / "base2.img"), ("-E", tmp_path / "c2.lbd")])
    run = vm.boot("""
nbd_attach /dev/nbd0 t1 nbd0
result t1-discard-max "$(cat /sys/block/nbd0/queue/discard_max_bytes)"
result t1-before "$(sha /dev/nbd0 4 8)"
blkdiscard -f -o $((4 << 20)) -l $((8 << 20)) /dev/nbd0
drop_caches
result t1-trimmed "$(sha /dev/nbd0 4 8)"
result t1-head "$(sha /dev/nbd0 0 4)"
result t1-tail "$(sha /dev/nbd0 12 20)"
nbd_detach /dev/nbd0

nbd_attach /dev/nbd1 t2 nbd1
mke2fs -q -t ext4 -b 4096 -E nodiscard -F /dev/nbd1
mount -t ext4 /dev/nbd1 /mnt
cp junk1.bin /mnt/junk1.bin
sync
result junk1 "$(sha /mnt/junk1.bin)"
rm /mnt/junk1.bin
sync
result fstrim "$(fstrim -v /mnt)"
umount /mnt
mount -t ext4 -o discard /dev/nbd1 /mnt
cp junk2.bin /mnt/junk2.bin
sync
rm /mnt/junk2.bin
sync
umount /mnt
rc=0
e2fsck -fn /dev/nbd1 || rc=$?
result t2-fsck "$rc"
nbd_detach /dev/nbd1
""", {"nbd0": t1, "nbd1": t2}, files={"junk1.bin": junk1, "junk2.bin": junk2})
    run.check(int(run["t1-discard-max"]) > 0, "the kernel sees no discard support")
    run.expect("t1-before", sha256(base1[4 * MiB:12 * MiB]))
    run.expect("t1-trimmed", zeros_sha(8))
    run.expect("t1-head", sha256(base1[:4 * MiB]))
    run.expect("t1-tail", sha256(base1[12 * MiB:]))
    run.expect("junk1", sha256(junk1))
    m = re.search(r"\((\d+) bytes\) trimmed", run["fstrim"])
    run.check(m is not None and int(m.group(1)) >= len(junk1),
              f"fstrim trimmed too little: {run['fstrim']!r}")
    run.expect("t2-fsck", 0)
    # blkdiscard, fstrim and -o discard reach LBD as NBD_CMD_TRIM
    for port in ("nbd0", "nbd1"):
        tap = run.taps[port]
        run.check(tap.commands["TRIM"] > 0, f"no TRIM on port {port}: {tap.summary()}")
    # the host sees zeros where the guest trimmed, reported as such by block status
    seen1 = t1.read_all(tmp_path / "t1.img")
    expected1 = base1[:4 * MiB] + bytes(8 * MiB) + base1[12 * MiB:]
    run.check(seen1 == expected1, "nbdcopy: t1 is not the base with a zeroed hole")
    for off, length, flags in t1.block_map():
        if off < 12 * MiB and off + length > 4 * MiB:
            run.check(flags & 2, f"block status: extent {off}+{length} in the trimmed range "
                                 f"has flags {flags} (no zero bit)")
    seen2 = t2.read_all(tmp_path / "t2.img")
    left = blocks(seen2) & (blocks(junk1) | blocks(junk2))
    run.check(not left, f"{len(left)} blocks of the deleted files are still on the device: "
                        "fstrim or the discard mount option did not reach LBD as TRIM")
    host_fsck(tmp_path / "t2.img")
    t1.stop()
    t2.stop()
    assert (tmp_path / "base1.img").read_bytes() == base1, "base1 changed"
    assert (tmp_path / "base2.img").read_bytes() == base2, "base2 changed"


# -- 6. several connections ---------------------------------------------------------------


def test_multi_connection(servers: Servers, vm: Vm, tmp_path: Path) -> None:
    p1, p2 = os.urandom(16 * MiB), os.urandom(16 * MiB)
    srv = servers.start("multi", size="128m", layers=[("-E", tmp_path / "change.lbd")],
                        export="multi")
    # two CPUs: the kernel maps each CPU to a hardware queue, each queue to a
    # connection, so the two pinned writers use both connections
    run = vm.boot("""
nbd_attach /dev/nbd0 multi "nbd0a nbd0b"
taskset 1 /usr/bin/dd if=p1.bin of=/dev/nbd0 bs=256k seek=32 oflag=direct status=none &
w1=$!
taskset 2 /usr/bin/dd if=p2.bin of=/dev/nbd0 bs=256k seek=256 oflag=direct status=none &
w2=$!
wait $w1
wait $w2
drop_caches
taskset 1 /usr/bin/dd if=/dev/nbd0 bs=256k skip=32 count=64 iflag=direct status=none > r1.bin &
r1=$!
taskset 2 /usr/bin/dd if=/dev/nbd0 bs=256k skip=256 count=64 iflag=direct status=none > r2.bin &
r2=$!
wait $r1
wait $r2
result r1 "$(sha r1.bin)"
result r2 "$(sha r2.bin)"
nbd_detach /dev/nbd0
""", {"nbd0a": srv, "nbd0b": srv}, files={"p1.bin": p1, "p2.bin": p2}, smp=2)
    run.expect("r1", sha256(p1))
    run.expect("r2", sha256(p2))
    # both connections negotiated the export and carried reads and writes
    for port in ("nbd0a", "nbd0b"):
        tap = run.taps[port]
        run.check(tap.export_names() == ["multi"], f"port {port}: {tap.summary()}")
        run.check(tap.commands["WRITE"] > 8 and tap.commands["READ"] > 8,
                  f"port {port} carried too little I/O: {tap.summary()}")
    image = srv.read_all(tmp_path / "seen.img")
    expected = bytearray(128 * MiB)
    expected[8 * MiB:24 * MiB] = p1
    expected[64 * MiB:80 * MiB] = p2
    run.check(image == expected, "nbdcopy does not see both patterns")
    srv.stop()

