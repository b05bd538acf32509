"""Fixtures for the kernel-client VM tests (the harness is in kernel_harness.py)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_initramfs
from kernel_harness import HOST_TOOLS, Servers, Vm, find_lbd

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest() -> build_initramfs.Guest:
    try:
        build_initramfs.require(*HOST_TOOLS)
        return build_initramfs.build()
    except build_initramfs.BuildError as exc:
        pytest.fail(f"cannot build the kernel-client test guest: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def lbd_exe() -> str:
    return find_lbd()


@pytest.fixture
def servers(lbd_exe: str, tmp_path: Path) -> Iterator[Servers]:
    sockdir = Path(tempfile.mkdtemp(prefix="lbdk-"))
    s = Servers(lbd_exe, tmp_path, sockdir)
    try:
        yield s
    finally:
        problems = s.close()
        shutil.rmtree(sockdir, ignore_errors=True)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def vm(guest: build_initramfs.Guest, tmp_path: Path) -> Iterator[Vm]:
    sockdir = Path(tempfile.mkdtemp(prefix="lbdk-"))
    try:
        yield Vm(guest, tmp_path, sockdir)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
