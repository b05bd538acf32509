"""Test support: run a real ``lbd serve`` process and real client tools.

A tool the set-up did not install is a failure (``require``), never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
# Debian's python first: nbdsh needs the python3-libnbd module it has
TOOL_PATH = os.pathsep.join([str(VENV_BIN), "/usr/bin", "/usr/sbin", "/bin", "/sbin",
                             os.environ.get("PATH", "")])


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=TOOL_PATH) is None]
    if missing:
        pytest.fail(f"required tools not installed: {', '.join(missing)} "
                    "(tools/setup.sh installs them)", pytrace=False)


def lbd_exe() -> str:
    exe = shutil.which("lbd", path=TOOL_PATH)
    if exe is None:
        pytest.fail("the lbd executable is not installed (run tools/setup.sh)", pytrace=False)
    return exe


def run(cmd: list[str], *, check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": TOOL_PATH}
    p = subprocess.run(cmd, capture_output=True, text=input is None, timeout=timeout, env=env,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout: {p.stdout}\n"
                             f"stderr: {p.stderr}")
    return p


MANAGE_READY = "management daemon listening at "


class LBD:
    """A ``lbd serve`` subprocess on a private Unix socket (and optionally TCP)."""

    def __init__(self, args: list[str], *, cwd: Path, tcp: bool = False,
                 export: str = "", extra_env: dict[str, str] | None = None,
                 manage: bool = False) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="lbdt-")  # short path: sun_path is small
        self.sock = os.path.join(self.sockdir, "nbd.sock")
        self.export = export
        self.manage_port: int | None = None
        cmd = [lbd_exe(), "serve", *args, "--unix", self.sock, "-v"]
        # The management daemon: on a free loopback port with manage=True (its
        # port is then manage_port), else off, since tests run many servers
        # at once; args that pass -a themselves decide alone.
        if "-a" not in args and "--manage" not in args:
            cmd += ["-a", "127.0.0.1:0" if manage else "none"]
        if export:
            cmd += ["-x", export]
        if tcp:
            cmd += ["-l", "127.0.0.1:0"]
        self.log_path = cwd / f"lbd-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PATH": TOOL_PATH, **(extra_env or {})}
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        self.port: int | None = None
        self._wait_ready(tcp, manage)

    def _wait_ready(self, tcp: bool, manage: bool = False) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lbd serve exited {self.proc.returncode}:\n{self.log()}")
            text = self.log()
            if os.path.exists(self.sock) and (not tcp or "listening on 127.0.0.1:" in text) \
                    and (not manage or MANAGE_READY in text):
                if tcp:
                    line = next(x for x in text.splitlines() if "listening on 127.0.0.1:" in x)
                    self.port = int(line.rsplit(":", 1)[1])
                if manage:
                    line = next(x for x in text.splitlines() if MANAGE_READY in x)
                    self.manage_port = int(line.rsplit(":", 1)[1])
                return
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"lbd serve did not start:\n{self.log()}")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    @property
    def tcp_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    @property
    def manage_address(self) -> str:
        assert self.manage_port is not None, "started without manage=True"
        return f"127.0.0.1:{self.manage_port}"

    def wait(self, timeout: float = 60) -> int:
        """Wait for the server to exit by itself (e.g. after SHUTDOWN); its exit code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lbd serve did not exit within {timeout} s:\n{self.log()}") \
                from None
        return self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"lbd serve ignored {sig!r}:\n{self.log()}") from None
        self._log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        return self.proc.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def lbd_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: ``lbd_server(args, tcp=False, export="", manage=False)`` -> a running LBD.

    Every server still running at the end of the test is stopped with
    SIGTERM and must exit 0.
    """
    started: list[LBD] = []

    def start(args: list[str], **kw: object) -> LBD:
        s = LBD(args, cwd=tmp_path, **kw)  # type: ignore[arg-type]
        started.append(s)
        return s

    yield start
    bad = []
    for s in started:
        if s.proc.poll() is None:
            code = s.stop()
            if code != 0:
                bad.append(f"lbd serve exited {code} on SIGTERM:\n{s.log()}")
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


class MgmtConn:
    """A raw connection to a management daemon: send bytes, read parsed replies."""

    def __init__(self, address: str, timeout: float = 30) -> None:
        import socket

        from lbd import mgmtproto

        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.parser = mgmtproto.ReplyParser()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self):  # type: ignore[no-untyped-def]
        """The next reply (a mgmtproto.Reply); AssertionError at EOF."""
        while True:
            rep = self.parser.next_reply()
            if rep is not None:
                return rep
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("the management daemon closed the connection")
            self.parser.feed(chunk)

    def request(self, command: str, arg: str | None = None, token: str | None = None):  # type: ignore[no-untyped-def]
        from lbd import mgmtproto

        self.send(mgmtproto.encode_request(command, arg, token))
        return self.reply()

    def at_eof(self) -> bool:
        """True if the daemon closed the connection (after any pending data)."""
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return True
                self.parser.feed(chunk)
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MgmtConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mgmt(server: LBD, command: str, arg: str | None = None, token: str | None = None):  # type: ignore[no-untyped-def]
    """One request on a fresh connection to ``server``'s management daemon; its reply."""
    with MgmtConn(server.manage_address) as c:
        return c.request(command, arg, token)


def make_file(path: Path, size: int, pattern: bytes | None = None) -> Path:
    """A file of ``size`` bytes: sparse zeros, or a repeated pattern."""
    with open(path, "wb") as f:
        if pattern is None:
            f.truncate(size)
        else:
            block = (pattern * (1 << 20 // len(pattern) + 1))[:1 << 20]
            left = size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return path


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def nbdsh(uri: str, script: str) -> str:
    """Run a Python snippet in nbdsh connected to ``uri`` (``h`` is the handle)."""
    require("nbdsh")
    return run(["nbdsh", "-u", uri, "-c", script]).stdout


__all__ = ["LBD", "TOOL_PATH", "MgmtConn", "lbd_server", "make_file", "mgmt", "nbdsh",
           "random_file", "require", "run", "sys"]
