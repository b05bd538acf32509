"""The FUSE mount's lifecycle: clean unmounts, crashes, bad mountpoints.

Real ``lbd mount`` / ``lbd serve --mount`` processes and the kernel's FUSE.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fuse_support import FuseEnv, is_mounted, mounts
from support import TOOL_PATH, lbd_exe, mgmt, nbdsh, random_file, run

MiB = 1 << 20


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(fuse: FuseEnv, tmp_path: Path, sig: int) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")])
    assert m.file is not None
    with open(m.file, "r+b") as f:  # a write, then the stop: it must be in the change file
        f.write(b"\xa5" * 4096)
    assert is_mounted(m.mountpoint)
    assert m.stop(sig) == 0
    assert not is_mounted(m.mountpoint)
    assert os.listdir(m.mountpoint) == []
    log = m.log()
    assert "FUSE: unmounted" in log and "stopped cleanly" in log, log
    # the unmount comes after the layers were closed: the restart sees the write
    m2 = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")])
    assert m2.file is not None
    with open(m2.file, "rb") as f:
        assert f.read(4096) == b"\xa5" * 4096


def test_shutdown_from_the_manager_unmounts(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")], manage=True)
    info = mgmt(m, "DEVICE_INFO")
    assert info.ok, info
    fuse_info = [f for f in info.value["frontends"] if f["type"] == "fuse"]
    assert fuse_info and fuse_info[0]["file"] == str(m.file), info.value["frontends"]
    assert info.value["command"][:2] == ["lbd", "mount"], info.value["command"]
    assert info.value["command"][-1] == str(m.mountpoint)
    text = mgmt(m, "DEVICE_INFO_STRINGS").lines
    assert f"FUSE file: {m.file}" in text, text
    assert text[-1].startswith("restart: lbd mount -s 4194304 -E "), text
    assert mgmt(m, "SHUTDOWN").ok
    assert m.wait() == 0
    assert not is_mounted(m.mountpoint)


def test_serve_with_mount_stops_both_on_shutdown(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")], serve=True, manage=True)
    assert "4194304" in nbdsh(m.uri, "print(h.get_size())")
    assert mgmt(m, "SHUTDOWN").ok
    assert m.wait() == 0
    assert not is_mounted(m.mountpoint)
    log = m.log()
    assert "FUSE: unmounted" in log and "stopped cleanly" in log, log


def test_unmount_from_outside_stops_lbd_mount(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")])
    run(["fusermount3", "-u", str(m.mountpoint)])
    assert m.wait() == 0
    assert "unmounted from outside" in m.log()
    assert not is_mounted(m.mountpoint)


def test_unmount_from_outside_leaves_nbd_serving(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")], serve=True)
    run(["fusermount3", "-u", str(m.mountpoint)])
    nbdsh(m.uri, "h.pwrite(b'\\x11' * 512, 0); assert h.pread(512, 0) == b'\\x11' * 512")
    assert m.proc.poll() is None
    assert m.stop() == 0


def lbd_mount_fails(args: list[str], cwd: Path) -> str:
    p = subprocess.run([lbd_exe(), "mount", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PATH": TOOL_PATH})
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    return p.stderr


def test_a_mount_left_by_a_crash_is_reported(fuse: FuseEnv, tmp_path: Path) -> None:
    change = tmp_path / "c.lbd"
    m = fuse.mount(["-s", "4M", "-E", str(change)])
    assert m.stop(signal.SIGKILL) == -signal.SIGKILL
    point = str(m.mountpoint)
    assert is_mounted(point)  # left behind, dead: "transport endpoint is not connected"
    with pytest.raises(OSError):
        os.stat(point)
    err = lbd_mount_fails(["-s", "4M", "-E", str(change), point], tmp_path)
    assert "left behind by a process that stopped without unmounting" in err, err
    hint = err.split("unmount it with:", 1)[1].strip()
    assert hint == f"fusermount3 -u {point}", err
    run(hint.split())  # the line it gives works
    assert not is_mounted(point)
    m2 = fuse.mount(["-s", "4M", "-E", str(change)], mountpoint=m.mountpoint)
    assert m2.file is not None and os.path.getsize(m2.file) == 4 * MiB


def test_a_live_mount_is_not_mounted_over(fuse: FuseEnv, tmp_path: Path) -> None:
    m = fuse.mount(["-s", "4M", "-E", str(tmp_path / "c.lbd")])
    err = lbd_mount_fails(["-s", "4M", "-E", str(tmp_path / "d.lbd"), str(m.mountpoint)],
                          tmp_path)
    assert "is already a mount point (fuse.lbd" in err, err
    assert f"fusermount3 -u {m.mountpoint}" in err, err
    assert not (tmp_path / "d.lbd").exists()
    assert m.proc.poll() is None and os.path.getsize(m.file or "") == 4 * MiB


def test_bad_mountpoints(tmp_path: Path) -> None:
    change = tmp_path / "c.lbd"
    err = lbd_mount_fails(["-s", "4M", "-E", str(change), str(tmp_path / "nowhere")], tmp_path)
    assert "mountpoint" in err and "does not exist" in err, err
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("keep me")
    err = lbd_mount_fails(["-s", "4M", "-E", str(change), str(full)], tmp_path)
    assert "is a directory that is not empty" in err, err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    err = lbd_mount_fails(["-s", "4M", "-E", str(change), str(fifo)], tmp_path)
    assert "neither a directory nor a regular file" in err, err
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    sock.close()
    err = lbd_mount_fails(["-s", "4M", "-E", str(change), str(tmp_path / "s")], tmp_path)
    assert "neither a directory nor a regular file" in err, err
    # nothing was opened or created before the mountpoint was checked
    assert not change.exists()
    assert (full / "a").read_text() == "keep me"
    assert not any(p.startswith(str(tmp_path)) for p, _ in mounts())


def test_mount_needs_a_mountpoint(tmp_path: Path) -> None:
    p = subprocess.run([lbd_exe(), "mount", "-s", "4M"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PATH": TOOL_PATH})
    assert p.returncode == 2 and "MOUNTPOINT" in p.stderr, p.stderr


def test_nbd_only_options_are_not_taken_by_mount(tmp_path: Path) -> None:
    base = random_file(tmp_path / "b", MiB)
    for extra in (["-l", "10809"], ["--unix", str(tmp_path / "x.sock")], ["--oldstyle"]):
        p = subprocess.run([lbd_exe(), "mount", "-s", "1M", "-f", str(base), *extra,
                            str(tmp_path)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PATH": TOOL_PATH})
        assert p.returncode == 2 and "No such option" in p.stderr, p.stderr
