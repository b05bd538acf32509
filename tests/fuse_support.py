"""Test support for the FUSE frontend: real mounts, loop devices, ext4.

Everything a test sets up is torn down in reverse order even when the test
fails: file systems mounted on loop devices are unmounted, loop devices
detached, LBD processes stopped (SIGTERM, they must exit 0), and any FUSE
mount still present is unmounted with ``fusermount3 -u`` (``umount -l`` as a
last resort).  Tests run as root with the kernel's FUSE (/dev/fuse).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import TOOL_PATH, lbd_exe, require, run

READY = "FUSE: device file at "


def mounts() -> list[tuple[str, str]]:
    """``(mountpoint, fstype)`` for every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            point = fields[4].replace("\\040", " ").replace("\\011", "\t") \
                .replace("\\012", "\n").replace("\\134", "\\")
            out.append((point, fields[sep + 1]))
    return out


def is_mounted(path: str | Path) -> bool:
    p = os.path.abspath(path)
    return any(m == p for m, _ in mounts())


class Mounted:
    """An ``lbd mount`` (or ``lbd serve --mount``) subprocess and its device file."""

    def __init__(self, args: list[str], mountpoint: Path, *, cwd: Path, serve: bool = False,
                 manage: bool = False, wait: bool = True) -> None:
        self.mountpoint = mountpoint
        self.sock: str | None = None
        self.sockdir: str | None = None
        self.manage_port: int | None = None
        if serve:
            import tempfile

            self.sockdir = tempfile.mkdtemp(prefix="lbdf-")
            self.sock = os.path.join(self.sockdir, "nbd.sock")
            cmd = [lbd_exe(), "serve", *args, "--unix", self.sock, "--mount", str(mountpoint)]
        else:
            cmd = [lbd_exe(), "mount", *args, str(mountpoint)]
        if "-a" not in args:
            cmd += ["-a", "127.0.0.1:0" if manage else "none"]
        cmd.append("-v")
        self.log_path = cwd / f"lbd-fuse-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PATH": TOOL_PATH}
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        self.file: Path | None = None
        if wait:
            self.wait_ready(manage)

    def wait_ready(self, manage: bool = False) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.log()
            if READY in text and (not manage or "management daemon listening at " in text):
                line = next(x for x in text.splitlines() if READY in x)
                self.file = Path(line.split(READY, 1)[1].rsplit(" (", 1)[0])
                if manage:
                    line = next(x for x in text.splitlines()
                                if "management daemon listening at " in x)
                    self.manage_port = int(line.rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"lbd exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"lbd did not mount within 60 s:\n{self.log()}")

    @property
    def uri(self) -> str:
        assert self.sock is not None, "not started with serve=True"
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def manage_address(self) -> str:
        assert self.manage_port is not None, "started without manage=True"
        return f"127.0.0.1:{self.manage_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lbd did not exit within {timeout} s:\n{self.log()}") \
                from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"lbd ignored {sig!r}:\n{self.log()}") from None
        return self.proc.returncode


class FuseEnv:
    """Starts mounts and loop devices for one test and undoes them all afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        require("fusermount3", "losetup", "mount", "umount")
        self.tmp = tmp_path
        self.started: list[Mounted] = []
        self.loops: list[str] = []
        self.fs_mounts: list[Path] = []
        self.fuse_points: list[Path] = []

    def mount(self, args: list[str], mountpoint: Path | None = None, **kw: object) -> Mounted:
        if mountpoint is None:
            mountpoint = self.tmp / f"mnt{len(self.fuse_points)}"
            mountpoint.mkdir()
        self.fuse_points.append(mountpoint)
        m = Mounted(args, mountpoint, cwd=self.tmp, **kw)  # type: ignore[arg-type]
        self.started.append(m)
        return m

    def losetup(self, path: Path) -> str:
        dev = run(["losetup", "-f", "--show", str(path)]).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def mount_fs(self, dev: str, where: Path) -> None:
        where.mkdir(exist_ok=True)
        run(["mount", dev, str(where)])
        self.fs_mounts.append(where)

    def umount_fs(self, where: Path) -> None:
        run(["umount", str(where)])
        self.fs_mounts.remove(where)

    def cleanup(self) -> list[str]:
        problems = []
        for where in reversed(self.fs_mounts):
            if run(["umount", str(where)], check=False).returncode != 0:
                run(["umount", "-l", str(where)], check=False)
        for dev in reversed(self.loops):
            run(["losetup", "-d", dev], check=False)
        for m in self.started:
            if m.proc.poll() is None:
                code = m.stop()
                if code != 0:
                    problems.append(f"lbd exited {code} on SIGTERM:\n{m.log()}")
            m._log.close()
            if m.sockdir is not None:
                shutil.rmtree(m.sockdir, ignore_errors=True)
        for point in self.fuse_points:
            if is_mounted(point):
                problems.append(f"{point} was still mounted after its lbd stopped")
                if run(["fusermount3", "-u", str(point)], check=False).returncode != 0:
                    run(["umount", "-l", str(point)], check=False)
        return problems


@pytest.fixture
def fuse(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A :class:`FuseEnv`; everything it started is undone at the end of the test."""
    env = FuseEnv(tmp_path)
    try:
        yield env
    finally:
        problems = env.cleanup()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
