"""Real NBD servers for the NBD-layer tests: nbdkit, qemu-nbd, nbd-server.

Each is a child process on a private Unix socket (or a free loopback TCP
port), started and stopped by PID.  ``kill()`` and ``restart()`` take a
server away and bring it back on the same address, for the reconnection tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support import TOOL_PATH, require


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_handshake(uri: str, proc: subprocess.Popen[bytes] | None, what: str,
                   timeout: float = 30) -> None:
    """Until ``nbdinfo --size`` completes a handshake with the server."""
    deadline = time.monotonic() + timeout
    env = {**os.environ, "PATH": TOOL_PATH}
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}")
        p = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, env=env,
                           timeout=30)
        if p.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not answer at {uri}")


class Remote:
    """A real NBD server process serving one export."""

    def __init__(self, name: str, cmd: list[str], uri: str, *, cwd: Path,
                 probe_uri: str | None = None, pidfile: Path | None = None,
                 wait_for: str | None = None) -> None:
        self.wait_for = wait_for  # a socket file to wait for instead of a handshake
        self.pidfile = pidfile  # a server that daemonizes writes its PID here
        self.daemon_pid: int | None = None
        self.name = name
        self.cmd = cmd
        self.uri = uri  # what LBD's -n/-N/-X is given
        self.probe_uri = probe_uri or uri  # what nbdinfo checks (the same export)
        self.cwd = cwd
        self.log_path = cwd / f"{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        for flag in ("-U", "-k"):  # a killed server leaves its socket file behind
            if flag in self.cmd:
                stale = self.cmd[self.cmd.index(flag) + 1]
                if os.path.exists(stale):
                    os.unlink(stale)
        if self.pidfile is not None and self.pidfile.exists():
            self.pidfile.unlink()  # a new daemon, a new PID
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "PATH": TOOL_PATH})
        if self.pidfile is not None:
            assert self.proc.wait(30) == 0, f"{self.name} failed to start:\n{self.log()}"
            deadline = time.monotonic() + 30  # the daemon writes it after the parent exits
            while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
                assert time.monotonic() < deadline, f"{self.name} wrote no pid file"
                time.sleep(0.02)
            self.daemon_pid = int(self.pidfile.read_text().split()[0])
        if self.wait_for is not None:
            deadline = time.monotonic() + 30
            while not os.path.exists(self.wait_for):
                assert time.monotonic() < deadline, f"{self.name} did not start"
                time.sleep(0.02)
            return
        wait_handshake(self.probe_uri, self.proc if self.pidfile is None else None, self.name)

    @property
    def pid(self) -> int:
        if self.daemon_pid is not None:
            return self.daemon_pid
        assert self.proc is not None
        return self.proc.pid

    def _daemon_gone(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def _signal_daemon(self, sig: int) -> None:
        if self.daemon_pid is None or self._daemon_gone():
            return
        os.kill(self.daemon_pid, sig)
        deadline = time.monotonic() + 30
        while not self._daemon_gone() and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL by PID: the server vanishes without a goodbye."""
        if self.daemon_pid is not None:
            self._signal_daemon(signal.SIGKILL)
        elif self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def terminate(self, within: float) -> float:
        """SIGTERM (a graceful stop) and wait for the server to exit; returns the
        seconds it took.  Fails (after a SIGKILL) if it is still there after
        ``within`` seconds: nbdkit, for one, waits for its clients to leave."""
        assert self.proc is not None and self.daemon_pid is None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} was still running {within:g} s after "
                                 f"SIGTERM:\n{self.log()[-2000:]}") from None
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.daemon_pid is not None:
            self._signal_daemon(signal.SIGTERM)
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Remotes:
    """Factory for remotes; everything started is stopped at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.started: list[Remote] = []
        self.sockdir = tempfile.mkdtemp(prefix="lbdr-")  # short: sun_path is small

    def _sock(self, name: str) -> str:
        return os.path.join(self.sockdir, f"{name}{len(self.started)}.sock")

    def _add(self, r: Remote) -> Remote:
        self.started.append(r)
        return r

    def nbdkit(self, plugin: str, *args: str, readonly: bool = False,
               tcp: str | None = None) -> Remote:
        """``nbdkit PLUGIN ARGS`` on a Unix socket, or on TCP at host ``tcp``."""
        require("nbdkit", "nbdinfo")
        base = ["nbdkit", "-f", "--exit-with-parent"] + (["-r"] if readonly else [])
        if tcp is not None:
            port = free_port(tcp)
            cmd = [*base, "-i", tcp, "-p", str(port), plugin, *args]
            host = f"[{tcp}]" if ":" in tcp else tcp
            uri = f"nbd://{host}:{port}/"
        else:
            sock = self._sock("kit")
            cmd = [*base, "-U", sock, plugin, *args]
            uri = f"nbd+unix:///?socket={sock}"
        return self._add(Remote(f"nbdkit-{plugin}", cmd, uri, cwd=self.tmp))

    def qemu_nbd(self, image: Path, *, shared: int | None = 8, readonly: bool = False
                 ) -> Remote:
        """qemu-nbd on a raw image; ``shared=None`` keeps qemu-nbd's default (one client)."""
        require("qemu-nbd", "nbdinfo")
        sock = self._sock("qemu")
        cmd = ["qemu-nbd", "-k", sock, "-f", "raw", "--cache=writeback", str(image)]
        if shared is not None:
            cmd += ["--persistent", f"--shared={shared}"]
        if readonly:
            cmd.append("--read-only")
        uri = f"nbd+unix:///?socket={sock}"
        # with one client slot, a probing handshake would take it (and end qemu-nbd)
        return self._add(Remote("qemu-nbd", cmd, uri, cwd=self.tmp,
                                wait_for=sock if shared is None else None))

    def nbd_server(self, image: Path, export: str, *, readonly: bool = False) -> Remote:
        """nbd-server with a config file naming one export, on loopback TCP.

        It daemonizes (with -d it would serve one connection and exit), so it
        is known by the PID in its pid file.
        """
        require("nbd-server", "nbdinfo")
        port = free_port()
        conf = self.tmp / f"nbd-server-{port}.conf"
        conf.write_text(
            "[generic]\n"
            f"    port = {port}\n"
            "    listenaddr = 127.0.0.1\n"
            "    allowlist = true\n"
            f"[{export}]\n"
            f"    exportname = {image}\n"
            f"    readonly = {'true' if readonly else 'false'}\n"
            "    flush = true\n"
            "    fua = true\n"
            "    trim = true\n"
            "    multifile = false\n")
        uri = f"nbd://127.0.0.1:{port}/{export}"
        pidfile = self.tmp / f"nbd-server-{port}.pid"
        return self._add(Remote("nbd-server", ["nbd-server", "-C", str(conf), "-p",
                                               str(pidfile)], uri, cwd=self.tmp,
                                pidfile=pidfile))

    def lbd(self, args: list[str]) -> Remote:
        """Another ``lbd serve`` as the remote (on a Unix socket, no manager)."""
        exe = shutil.which("lbd", path=TOOL_PATH)
        assert exe is not None, "lbd is not installed (tools/setup.sh)"
        sock = self._sock("lbd")
        cmd = [exe, "serve", *args, "--unix", sock, "-a", "none"]
        return self._add(Remote("lbd-remote", cmd, f"nbd+unix:///?socket={sock}",
                                cwd=self.tmp))

    def close(self) -> None:
        for r in self.started:
            r.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def remotes(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Remotes(tmp_path)
    yield r
    r.close()
