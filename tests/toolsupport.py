"""Shared by the offline-tool tests: stacks of change files written by real clients.

A stack is made the way users make one: ``lbd serve`` over the base and the
change files so far, a new writable change file on top, writes from
``qemu-io`` over NBD, SIGTERM.  The test keeps what the device must read as
in ``expected`` (a raw image it updates alongside).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import LBD, random_file, require, run

MiB = 1 << 20
SECTOR = 512


class Stack:
    def __init__(self, tmp: Path, size: int, base: bool = True, seed: int = 1) -> None:
        self.tmp = tmp
        self.size = size
        self.base = random_file(tmp / "base.img", size, seed) if base else None
        self.expected = bytearray(self.base.read_bytes() if self.base else bytes(size))
        self.changes: list[Path] = []
        self.rng = random.Random(seed)

    def layer_args(self) -> list[str]:
        args = ["-s", str(self.size)]
        if self.base is not None:
            args += ["-f", str(self.base)]
        for c in self.changes:
            args += ["-e", str(c)]
        return args

    def add_layer(self, start: Callable[..., LBD], name: str, n_writes: int = 12,
                  ops: list[str] | None = None) -> Path:
        """Serve the stack with a new writable change file on top and write to it."""
        require("qemu-io")
        path = self.tmp / name
        srv = start([*self.layer_args(), "-E", str(path)])
        cmds = list(ops or [])
        for _ in range(n_writes):
            cmds.append(self.random_op())
        for c in cmds:
            self.apply(c)
        args = []
        for c in cmds:
            args += ["-c", c]
        run(["qemu-io", "-f", "raw", *args, srv.uri], timeout=300)
        assert srv.stop() == 0, srv.log()
        self.changes.append(path)
        return path

    def random_op(self) -> str:
        r = self.rng.random()
        length = self.rng.choice([4096, 65536, 512 * 1024, MiB, 3 * MiB + 4096])
        off = self.rng.randrange(0, (self.size - length) // 4096) * 4096
        if r < 0.75:
            return f"write -P {self.rng.randrange(1, 255)} {off} {length}"
        if r < 0.9:
            return f"write -z {off} {length}"
        return f"discard {off} {length}"

    def apply(self, cmd: str) -> None:
        parts = cmd.split()
        if parts[0] == "write" and parts[1] == "-P":
            pat, off, n = int(parts[2]), int(parts[3]), int(parts[4])
            self.expected[off:off + n] = bytes([pat]) * n
        elif parts[0] == "write" and parts[1] == "-z":
            off, n = int(parts[2]), int(parts[3])
            self.expected[off:off + n] = bytes(n)
        elif parts[0] == "discard":
            # TRIM on a change file records zeros: they never fall through again
            off, n = int(parts[1]), int(parts[2])
            self.expected[off:off + n] = bytes(n)
        elif parts[0] != "flush":
            raise ValueError(cmd)

    def expected_file(self, name: str = "expected.img") -> Path:
        p = self.tmp / name
        p.write_bytes(self.expected)
        return p


def tool(name: str, *args: str, check: bool = True, timeout: float = 300) -> Any:
    """Run ``lbd-<name>``; with check, a non-zero exit is an AssertionError."""
    return run([f"lbd-{name}", *args], check=check, timeout=timeout)


def tool_json(name: str, *args: str, expect_rc: int = 0) -> Any:
    p = tool(name, *args, "--json", check=False)
    assert p.returncode == expect_rc, (p.returncode, p.stdout, p.stderr)
    return json.loads(p.stdout)


def qemu_compare(a: Path | str, b: Path | str) -> None:
    require("qemu-img")
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], check=False)
    assert p.returncode == 0, f"qemu-img compare {a} {b}: {p.stdout} {p.stderr}"


def serve_and_compare(start: Callable[..., LBD], args: list[str], expected: Path) -> None:
    """Serve ``args`` read-only and compare the device with ``expected`` (qemu-img compare)."""
    srv = start([*args])
    try:
        qemu_compare(expected, srv.uri)
    finally:
        assert srv.stop() == 0, srv.log()
