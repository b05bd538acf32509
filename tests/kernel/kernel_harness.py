"""The harness of the kernel-client VM tests: LBD servers on the host, a guest VM.

Each test starts one or more ``lbd serve`` processes on Unix sockets
(:class:`Servers`), then boots a Debian kernel under QEMU (TCG) whose nbd
driver and ``nbd-client`` reach those sockets through virtio-serial ports, one
port (a QEMU socket chardev) per NBD connection (:class:`Vm`).  Each port's
connection passes through a :class:`Tap` on the host that decodes what the
kernel's client sends (handshake flags, options, requests by type).  The guest runs
a shell script the test hands over in a small cpio appended to the initramfs,
prints ``LBD-RESULT key value`` lines and ``LBD-GUEST-END rc=N`` on the serial
console, and powers off.  Every boot has a time limit; a failure shows the
guest's console and the servers' logs.

A missing tool fails the tests loudly; nothing here skips.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import build_initramfs
import pytest

#: seconds one VM boot may take before it is killed and the test fails
VM_TIMEOUT = float(os.environ.get("LBD_KERNEL_VM_TIMEOUT", "150"))
#: seconds a server may take to start listening or to stop after SIGTERM
SERVER_TIMEOUT = 30.0
HOST_TOOLS = ("qemu-system-x86_64", "nbdcopy", "nbdinfo", "mkfs.ext4", "e2fsck", "debugfs")

MiB = 1 << 20
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def find_lbd() -> str:
    """The ``lbd`` executable: on PATH (tools/test.sh puts .venv/bin there) or
    next to the running Python (the venv's bin)."""
    found = shutil.which("lbd") or shutil.which("lbd", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("the lbd executable is not on PATH nor next to "
                    f"{sys.executable}: run tools/setup.sh", pytrace=False)
    return found


def sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        h = hashlib.sha256()
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(4 * MiB), b""):
                h.update(chunk)
        return h.hexdigest()
    return hashlib.sha256(data).hexdigest()


# -- servers ------------------------------------------------------------------------------


def lbd_command(lbd: str, *, socket: Path, size: str | None,
                layers: Sequence[tuple[str, Path | str]], export: str, readonly: bool,
                extra: Sequence[str] = ()) -> list[str]:
    """The ``lbd serve`` command line: the one place it is built.

    ``layers`` are (flag, file) pairs in stacking order, last on top: ``-f``/``-e``
    read-only flat image / change file, ``-F``/``-E`` writable ones, ``-c``/``-C``
    an RBD image (``rbd:POOL/IMAGE@SNAP``, with ``--ceph-conf`` in ``extra``).
    """
    cmd = [lbd, "serve"]
    if size is not None:
        cmd += ["-s", size]
    for flag, path in layers:
        if flag not in ("-f", "-F", "-e", "-E", "-c", "-C"):
            raise ValueError(f"unknown layer flag {flag!r}")
        cmd += [flag, str(path)]
    cmd += [*extra, "--unix", str(socket), "-x", export, "-a", "none"]  # no management daemon
    if readonly:
        cmd.append("--readonly")
    return cmd


@dataclass(eq=False)
class Server:
    name: str
    argv: list[str]
    socket: Path
    export: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    returncode: int | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.uri}>"

    def describe(self) -> str:
        state = ("running" if self.proc.poll() is None
                 else f"exited with {self.proc.returncode}")
        return (f"--- server {self.name} ({state}): {' '.join(self.argv)}\n"
                f"{self.log().rstrip()}\n")

    def stop(self) -> str:
        """SIGTERM, wait, and fail unless it exited 0; its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SERVER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"server {self.name} did not stop within {SERVER_TIMEOUT} s of "
                            f"SIGTERM\n{self.describe()}", pytrace=False)
        self.returncode = self.proc.returncode
        assert self.returncode == 0, f"server {self.name} exited with {self.returncode}\n" \
            + self.describe()
        return self.log()

    def read_all(self, dest: Path) -> bytes:
        """The whole export as the host sees it, through nbdcopy."""
        run_tool(["nbdcopy", self.uri, str(dest)], f"nbdcopy from {self.name}", self)
        return dest.read_bytes()

    def block_map(self, context: str = "base:allocation") -> list[tuple[int, int, int]]:
        """(offset, length, flags) extents from nbdinfo --map."""
        out = run_tool(["nbdinfo", f"--map={context}", self.uri], f"nbdinfo --map {self.name}",
                       self)
        extents = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].isdigit():
                extents.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return extents


def run_tool(cmd: list[str], what: str, *servers: Server) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}\n"
                    + "".join(s.describe() for s in servers), pytrace=False)
    return proc.stdout


class Servers:
    """Starts LBD servers for one test and stops what is left at its end."""

    def __init__(self, lbd: str, workdir: Path, sockdir: Path) -> None:
        self.lbd = lbd
        self.workdir = workdir
        self.sockdir = sockdir  # short: Unix socket paths are limited to 108 bytes
        self.started: list[Server] = []

    def start(self, name: str, *, size: str | None, layers: Sequence[tuple[str, Path | str]],
              export: str = "lbd", readonly: bool = False, extra: Sequence[str] = ()) -> Server:
        socket = self.sockdir / f"{name}.sock"
        argv = lbd_command(self.lbd, socket=socket, size=size, layers=layers, export=export,
                           readonly=readonly, extra=extra)
        log_path = self.workdir / f"server-{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=self.workdir)
        server = Server(name, argv, socket, export, log_path, proc)
        self.started.append(server)
        deadline = time.monotonic() + SERVER_TIMEOUT
        while "listening on" not in server.log() or not socket.exists():
            if proc.poll() is not None:
                pytest.fail(f"server {name} exited before listening\n{server.describe()}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"server {name} not listening after {SERVER_TIMEOUT} s\n"
                            f"{server.describe()}", pytrace=False)
            time.sleep(0.02)
        return server

    def close(self) -> list[str]:
        """Stop every server still running; problems found."""
        problems = []
        for s in self.started:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
                try:
                    s.proc.wait(SERVER_TIMEOUT)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
                    problems.append(f"server {s.name} ignored SIGTERM\n{s.describe()}")
                    continue
                if s.proc.returncode != 0:
                    problems.append(f"server {s.name} exited with {s.proc.returncode}\n"
                                    f"{s.describe()}")
        return problems


# -- a tap on each NBD connection ---------------------------------------------------------

OPT_MAGIC = b"IHAVEOPT"
REQUEST_MAGIC = struct.pack(">I", 0x25609513)
OPT_EXPORT_NAME, OPT_GO = 1, 7
CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES = 1, 2
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE",
             6: "WRITE_ZEROES", 7: "BLOCK_STATUS"}


class Tap:
    """A relay between one QEMU socket chardev and a server's Unix socket.

    It passes every byte on unchanged and decodes the client's side of the
    conversation: the handshake flags, the options (with their data) and the
    transmission requests, counted by command and flag, so a test can see what
    the kernel itself sent, independently of the server's logs.
    """

    def __init__(self, path: Path, upstream: Path, timeout: float) -> None:
        self.path = path
        self.upstream = upstream
        self.client_flags: int | None = None
        self.options: list[tuple[int, bytes]] = []
        self.commands: Counter[str] = Counter()
        self.fua = 0  #: requests with NBD_CMD_FLAG_FUA
        self.error: str | None = None
        self.connected = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(timeout)
        self._thread = threading.Thread(target=self._run, name=f"tap {path.name}",
                                        daemon=True)
        self._thread.start()

    def export_names(self, opt: int = OPT_GO) -> list[str]:
        """Names asked for with NBD_OPT_GO (or, with ``opt``, NBD_OPT_INFO)."""
        names = []
        for o, data in self.options:
            if o == opt and len(data) >= 4:
                (n,) = struct.unpack_from(">I", data)
                names.append(data[4:4 + n].decode(errors="replace"))
        return names

    def summary(self) -> str:
        opts = [f"{o}:{d[:40]!r}" for o, d in self.options]
        return (f"client flags {self.client_flags}, options {opts}, "
                f"commands {dict(self.commands)}, fua {self.fua}, error {self.error}")

    def close(self) -> None:
        try:  # wakes a thread still in accept() (QEMU never connected)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return  # closed or timed out: QEMU never connected
        client.settimeout(None)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(str(self.upstream))
        except OSError as exc:
            self.error = f"connecting to {self.upstream}: {exc}"
            client.close()
            return
        self.connected = True
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, _Parser(self))
        back.join(30)
        client.close()
        server.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, parser: _Parser | None) -> None:
        try:
            while chunk := src.recv(1 << 20):
                if parser is not None:
                    parser.feed(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class _Parser:
    """Decodes the client-to-server byte stream of one NBD connection."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.buf = bytearray()
        self.skip = 0  # write payload bytes still to pass over
        self.dead = False

    def feed(self, chunk: bytes) -> None:
        if self.dead:
            return
        if self.skip:
            n = min(self.skip, len(chunk))
            self.skip -= n
            chunk = chunk[n:]
        self.buf += chunk
        tap = self.tap
        while not self.dead and not self.skip:
            buf = self.buf
            if tap.client_flags is None:
                if len(buf) < 4:
                    return
                (tap.client_flags,) = struct.unpack_from(">I", buf)
                del buf[:4]
            elif buf[:8] == OPT_MAGIC:
                if len(buf) < 16:
                    return
                opt, length = struct.unpack_from(">II", buf, 8)
                if len(buf) < 16 + length:
                    return
                tap.options.append((opt, bytes(buf[16:16 + length])))
                del buf[:16 + length]
            elif buf[:4] == REQUEST_MAGIC:
                if len(buf) < 28:
                    return
                flags, cmd, _handle, _offset, length = struct.unpack_from(">HHQQI", buf, 4)
                tap.commands[CMD_NAMES.get(cmd, str(cmd))] += 1
                tap.fua += bool(flags & 1)
                del buf[:28]
                if cmd == 1:  # WRITE: its payload follows
                    n = min(length, len(buf))
                    del buf[:n]
                    self.skip = length - n
            elif len(buf) < 8:
                return
            else:
                tap.error = f"undecodable client bytes {bytes(buf[:16]).hex()}"
                self.dead = True
                return


# -- the guest ----------------------------------------------------------------------------


@dataclass
class GuestRun:
    console: str
    rc: int | None  #: the test script's exit status, None if it never ended
    elapsed: float
    servers: list[Server]
    taps: dict[str, Tap]  #: by port name
    results: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<GuestRun rc={self.rc} {self.elapsed:.1f} s>"

    def report(self) -> str:
        return ("\n===== guest serial console =====\n" + self.console.rstrip()
                + "\n===== end of console =====\n"
                + "".join(f"--- port {p}: {t.summary()}\n" for p, t in self.taps.items())
                + "".join(s.describe() for s in self.servers))

    def __getitem__(self, key: str) -> str:
        values = self.results.get(key)
        assert values, f"the guest reported no {key!r}" + self.report()
        return values[-1]

    def check(self, cond: object, message: str) -> None:
        """Assert with the guest console and the server logs in the message."""
        assert cond, message + self.report()

    def expect(self, key: str, value: object) -> None:
        self.check(self[key] == str(value),
                   f"guest reported {key}={self[key]!r}, expected {value!r}")


class Vm:
    """Boots the guest; one instance per test."""

    def __init__(self, guest: build_initramfs.Guest, workdir: Path, sockdir: Path) -> None:
        self.guest = guest
        self.workdir = workdir
        self.sockdir = sockdir  # short: Unix socket paths are limited to 108 bytes
        self.boots = 0

    def boot(self, script: str, ports: dict[str, Server], *, files: dict[str, bytes] | None = None,
             smp: int = 1, timeout: float = VM_TIMEOUT, check: bool = True) -> GuestRun:
        """Run ``script`` (sh, after ``. /lib/lbd/lib.sh``) in a fresh guest.

        ``ports`` maps virtio-serial port names to the server each one connects
        to: one port carries one NBD connection, through a :class:`Tap`.
        ``files`` land in /test/ in the guest.  With ``check`` the script must
        have ended with status 0.
        """
        self.boots += 1
        n = self.boots
        content = {f"test/{k}": v for k, v in (files or {}).items()}
        content["test/run.sh"] = (". /lib/lbd/lib.sh\n" + script).encode()
        initrd = self.workdir / f"initrd-{n}.cpio"
        with open(initrd, "wb") as f:
            f.write(self.guest.initramfs.read_bytes())
            f.write(build_initramfs.newc_archive(content, ["test/run.sh"]))
        console_path = self.workdir / f"console-{n}.txt"
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "512",
                "-smp", str(smp), "-nodefaults", "-no-reboot", "-display", "none",
                "-monitor", "none", "-serial", "stdio",
                "-kernel", str(self.guest.kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 quiet",
                "-device", "virtio-serial-pci"]
        taps: dict[str, Tap] = {}
        try:
            for i, (port, server) in enumerate(ports.items()):
                tap = taps[port] = Tap(self.sockdir / f"{n}-{i}.tap", server.socket, timeout)
                argv += ["-chardev", f"socket,id=c{i},path={tap.path}",
                         "-device", f"virtserialport,chardev=c{i},name={port}"]
            servers = list(dict.fromkeys(ports.values()))
            start = time.monotonic()
            timed_out = False
            with open(console_path, "wb") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    proc.kill()
                    proc.wait()
            elapsed = time.monotonic() - start
        finally:
            for tap in taps.values():
                tap.close()
            initrd.unlink()
        console = _ANSI.sub("", console_path.read_bytes().decode(errors="replace"))
        console = console.replace("\r", "")
        m = re.search(r"^LBD-GUEST-END rc=(\d+)$", console, re.MULTILINE)
        run = GuestRun(console, int(m.group(1)) if m else None, elapsed, servers, taps)
        for line in console.splitlines():
            if line.startswith("LBD-RESULT "):
                parts = line.split(None, 2)
                if len(parts) >= 2:
                    run.results.setdefault(parts[1], []).append(
                        parts[2].strip() if len(parts) > 2 else "")
        print(f"boot {n}: {elapsed:.1f} s, script rc={run.rc}")
        for port, tap in taps.items():
            print(f"  port {port}: {tap.summary()}")
        if timed_out:
            pytest.fail(f"the guest did not power off within {timeout:.0f} s (boot {n})"
                        + run.report(), pytrace=False)
        if check:
            run.check(run.rc == 0, f"the guest test script failed (boot {n}, rc={run.rc}, "
                      f"qemu exit {proc.returncode})")
            for port, tap in taps.items():
                run.check(tap.error is None, f"port {port}: {tap.error}")
        return run
