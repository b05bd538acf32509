#!/usr/bin/env python3
"""Build the guest of the kernel-client VM tests: a Debian kernel and an initramfs.

The host kernel here has no nbd driver, so the tests boot a Debian kernel under
QEMU (TCG) whose ``nbd.ko`` and ``nbd-client`` talk to LBD on the host through
virtio-serial ports.  This module provides:

* the kernel: the package the ``linux-image-amd64`` metapackage depends on is
  fetched with ``apt-get download`` (Debian's package registry only), unpacked
  with ``dpkg-deb -x`` and indexed with ``depmod -b``: no slow install;
* a base initramfs: busybox-static, the real ``nbd-client``, ``socat``,
  e2fsprogs (``mke2fs``, ``e2fsck``), util-linux (``blockdev``, ``blkdiscard``,
  ``fstrim``), coreutils (``dd``, ``sha256sum``) with the shared libraries
  ``ldd`` lists, the modules ``modprobe --show-depends`` lists for virtio_pci,
  virtio_console, nbd and ext4 (in that order), and ``guest/init`` as /init;
* per-boot archives (:func:`newc_archive`): the test script and its data, an
  uncompressed cpio appended to the base initramfs (the kernel unpacks
  concatenated archives in turn).

Everything is cached under ``tests/kernel/cache/``: the kernel by its package
version, the initramfs by a hash of its inputs (this file, ``guest/``, the
kernel package version and the content of every host file copied in), so a
rerun costs a few ``apt-cache``/``ldd`` calls.

Run it alone to build (or find) the guest and print its paths::

    python tests/kernel/build_initramfs.py
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
DEFAULT_CACHE = HERE / "cache"

KERNEL_METAPACKAGE = "linux-image-amd64"
#: modules to load in the guest, in this order (with their dependencies first)
MODULES = ("virtio_pci", "virtio_console", "nbd", "ext4")
BUSYBOX = "/bin/busybox"
#: real binaries for the guest (busybox applets cover the rest)
GUEST_PROGRAMS = (
    "nbd-client",
    "socat",
    "mke2fs",
    "e2fsck",
    "blockdev",
    "blkdiscard",
    "fstrim",
    "dd",
    "sha256sum",
    "cmp",
)
#: extra names for some of them (argv[0] matters to e2fsprogs)
GUEST_LINKS = {"mkfs.ext4": "mke2fs", "fsck.ext4": "e2fsck"}
#: host configuration files copied as they are
GUEST_CONFIG = ("/etc/mke2fs.conf",)

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The guest cannot be built (a missing tool, no kernel package...)."""


@dataclass(frozen=True)
class Guest:
    kernel: Path  #: vmlinuz
    initramfs: Path  #: uncompressed newc cpio
    kver: str  #: e.g. 6.1.0-56-amd64
    package: str  #: e.g. linux-image-6.1.0-56-amd64=6.1.192-2


def _log_stderr(msg: str) -> None:
    print(f"build_initramfs: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} is missing (see tools/packages-debian.txt): {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return str(proc.stdout)


def require(*programs: str) -> dict[str, str]:
    """Absolute paths of host programs; :class:`BuildError` naming any missing."""
    found: dict[str, str] = {}
    missing: list[str] = []
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    for prog in programs:
        where = shutil.which(prog, path=path)
        if where is None:
            missing.append(prog)
        else:
            found[prog] = where
    if missing:
        raise BuildError(
            "missing on this machine: " + ", ".join(missing)
            + " (install tools/packages-debian.txt with tools/setup.sh)")
    return found


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the kernel ------------------------------------------------------------------------


def _resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image the metapackage depends on now."""
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    m = re.search(r"^\s*\|?Depends:\s*(linux-image-\S+)", out, re.MULTILINE)
    if m is None:
        raise BuildError(f"no linux-image dependency in apt-cache depends {KERNEL_METAPACKAGE}")
    package = m.group(1)
    show = _run(["apt-cache", "show", "--no-all-versions", package])
    v = re.search(r"^Version:\s*(\S+)", show, re.MULTILINE)
    if v is None:
        raise BuildError(f"apt-cache show {package} gives no version")
    return package, v.group(1)


def _apt_update(log: Log) -> None:
    if os.geteuid() != 0:
        raise BuildError("the package lists are stale and only root can run apt-get update")
    log("apt-get update")
    _run(["apt-get", "update", "-q"])


def _kernel_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("kernel-*") if (p / ".complete").exists())


def fetch_kernel(cache: Path = DEFAULT_CACHE, log: Log = _log_stderr) -> tuple[Path, str, str]:
    """Unpack the current Debian kernel into the cache: (root, kver, package=version)."""
    require("apt-cache", "apt-get", "dpkg-deb", "depmod")
    try:
        package, version = _resolve_kernel_package()
    except BuildError as first:
        try:
            _apt_update(log)
            package, version = _resolve_kernel_package()
        except BuildError as again:
            cached = _kernel_dirs(cache)
            if not cached:
                raise BuildError(f"cannot resolve the kernel package: {first}; {again}") from again
            root = cached[-1]
            log(f"cannot resolve the kernel package ({again}); using the cached {root.name}")
            return root / "root", (root / ".kver").read_text(), (root / ".package").read_text()
    pinned = f"{package}={version}"
    dest = cache / f"kernel-{package}_{version}"
    if (dest / ".complete").exists():
        return dest / "root", (dest / ".kver").read_text(), pinned
    log(f"fetching {pinned} (apt-get download, dpkg-deb -x, depmod)")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".kernel-") as tmp:
        work = Path(tmp)
        try:
            _run(["apt-get", "download", "-q", pinned], cwd=work)
        except BuildError:
            _apt_update(log)
            _run(["apt-get", "download", "-q", pinned], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {pinned} left {debs}")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        debs[0].unlink()
        kvers = [p.name for p in (root / "lib/modules").iterdir()]
        if len(kvers) != 1:
            raise BuildError(f"{pinned} holds modules for {kvers}")
        kver = kvers[0]
        if not (root / "boot" / f"vmlinuz-{kver}").exists():
            raise BuildError(f"{pinned} has no boot/vmlinuz-{kver}")
        _run(["depmod", "-b", str(root), kver])
        (work / ".kver").write_text(kver)
        (work / ".package").write_text(pinned)
        (work / ".complete").write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
        work.mkdir()  # for TemporaryDirectory's clean-up
    for old in _kernel_dirs(cache):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest / "root", (dest / ".kver").read_text(), pinned


def module_list(root: Path, kver: str, modules: Iterable[str] = MODULES) -> list[Path]:
    """Module files to insmod, dependencies first, each once, relative to ``root``.

    The host's /etc/modprobe.d is ignored (an empty config directory) so that
    the guest does not depend on it.
    """
    with tempfile.TemporaryDirectory() as empty:
        out = _run(["modprobe", "-C", empty, "-d", str(root), "-S", kver, "-a",
                    "--show-depends", *modules])
    seen: list[Path] = []
    for line in out.splitlines():
        parts = line.split()
        if not parts or parts[0] == "builtin":
            continue
        if parts[0] != "insmod":
            raise BuildError(f"unexpected modprobe output: {line!r}")
        rel = Path(parts[1]).relative_to(root)
        if rel not in seen:
            seen.append(rel)
    if not seen:
        raise BuildError(f"modprobe --show-depends lists no modules for {modules}")
    return seen


# -- the initramfs ----------------------------------------------------------------------


class Newc:
    """A writer of "newc" cpio archives, as the kernel's initramfs unpacker reads them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1000
        self.dirs: set[str] = {""}

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(raw), 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        self.parts.append(head + b"\0" * (-len(head) % 4))
        if data:
            self.parts.append(data + b"\0" * (-len(data) % 4))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name: str, mode: int = 0o755) -> None:
        name = name.strip("/")
        if name in self.dirs:
            return
        self._parents(name)
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = Newc()
        trailer.ino = 0
        trailer._entry("TRAILER!!!", 0)
        data = b"".join(self.parts + trailer.parts)
        return data + b"\0" * (-len(data) % 512)


def newc_archive(files: dict[str, bytes], executable: Iterable[str] = ()) -> bytes:
    """An uncompressed cpio of ``files`` (path in the guest -> content)."""
    exe = set(executable)
    arc = Newc()
    for name, data in files.items():
        arc.file(name, data, 0o755 if name in exe else 0o644)
    return arc.getvalue()


def _shared_libraries(binary: str) -> list[str]:
    """The libraries (and the ELF interpreter) ldd lists for ``binary``."""
    libs: list[str] = []
    for line in _run(["ldd", binary]).splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if not target:
                continue
            if target == "not found" or not target.startswith("/"):
                raise BuildError(f"ldd {binary}: {line}")
            libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split()[0])
    return libs


def _host_inputs(programs: dict[str, str]) -> dict[str, Path]:
    """Guest path -> host file for every binary, library and config file copied."""
    inputs: dict[str, Path] = {}
    for prog, where in programs.items():
        if prog == "busybox":
            inputs["/bin/busybox"] = Path(where)
            continue
        # /usr/sbin or /usr/bin in the guest, whatever the host's usr-merge state
        sub = "sbin" if "/sbin/" in where else "bin"
        inputs[f"/usr/{sub}/{prog}"] = Path(where)
        for lib in _shared_libraries(where):
            inputs[lib] = Path(lib)
    for conf in GUEST_CONFIG:
        if Path(conf).exists():
            inputs[conf] = Path(conf)
    return inputs


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _guest_files() -> dict[str, Path]:
    return {p.name: p for p in sorted(GUEST_DIR.iterdir()) if p.is_file()}


def build(cache: Path = DEFAULT_CACHE, log: Log = _log_stderr) -> Guest:
    """The kernel and base initramfs, built now or found in the cache."""
    cache = cache.resolve()
    programs = require(*GUEST_PROGRAMS, "busybox", "ldd", "modprobe")
    if not Path(BUSYBOX).exists():
        raise BuildError(f"{BUSYBOX} is missing: install busybox-static")
    programs = {p: programs[p] for p in GUEST_PROGRAMS}
    programs["busybox"] = BUSYBOX
    with _locked(cache):
        root, kver, package = fetch_kernel(cache, log)
        inputs = _host_inputs(programs)
        h = hashlib.sha256()
        h.update(Path(__file__).read_bytes())
        for name, path in _guest_files().items():
            h.update(name.encode() + b"\0" + path.read_bytes())
        h.update(package.encode())
        for guest_path, host in sorted(inputs.items()):
            h.update(f"{guest_path}\0{_file_digest(host)}\0".encode())
        key = h.hexdigest()[:20]
        kernel = root / "boot" / f"vmlinuz-{kver}"
        initramfs = cache / f"initramfs-{kver}-{key}.cpio"
        if initramfs.exists():
            return Guest(kernel, initramfs, kver, package)
        log(f"building {initramfs.name}")
        data = _build_initramfs(root, kver, programs, inputs)
        tmp = initramfs.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(initramfs)
        for old in cache.glob("initramfs-*.cpio"):
            if old != initramfs:
                old.unlink()
        return Guest(kernel, initramfs, kver, package)


def _build_initramfs(root: Path, kver: str, programs: dict[str, str],
                     inputs: dict[str, Path]) -> bytes:
    arc = Newc()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys",
              "dev", "run", "tmp", "mnt", "root"):
        arc.dir(d)
    arc.chardev("dev/console", 5, 1)
    arc.chardev("dev/null", 1, 3, 0o666)
    arc.chardev("dev/ttyS0", 4, 64)
    # binaries, libraries (dereferenced, at the path ldd names), configuration
    for guest_path, host in sorted(inputs.items()):
        mode = host.stat().st_mode & 0o777
        arc.file(guest_path, host.read_bytes(), mode)
    shipped = {Path(p).name for p in inputs} | set(GUEST_LINKS)
    for link, target in GUEST_LINKS.items():
        arc.symlink(f"usr/sbin/{link}", target)
    applets = set(_run([BUSYBOX, "--list"]).split())
    for applet in sorted(applets):
        if applet not in shipped and applet != "busybox":
            arc.symlink(f"bin/{applet}", "busybox")
    arc.symlink("etc/mtab", "/proc/self/mounts")
    # kernel modules, in load order
    order: list[str] = []
    for rel in module_list(root, kver):
        data = (root / rel).read_bytes()
        name = f"/{rel}"
        if rel.suffix == ".xz":
            import lzma

            data, name = lzma.decompress(data), name[:-3]
        elif rel.suffix == ".gz":
            import gzip

            data, name = gzip.decompress(data), name[:-3]
        elif rel.suffix == ".zst":
            data = subprocess.run(["zstd", "-dc", str(root / rel)], capture_output=True,
                                  check=True).stdout
            name = name[:-4]
        arc.file(name, data)
        order.append(name)
    arc.file("etc/lbd-modules", ("\n".join(order) + "\n").encode())
    # Debian's busybox sh prefers its own applets to programs on PATH: shell
    # functions, which come first, make the real programs win in the scripts
    real = [f"{Path(p).name}() {{ {p} \"$@\"; }}\n" for p in sorted(inputs)
            if p.startswith("/usr/") and Path(p).name in applets]
    arc.file("lib/lbd/real-programs.sh",
             ("# generated by build_initramfs.py\n" + "".join(real)).encode())
    arc.file("etc/lbd-kver", kver.encode() + b"\n")
    for name, path in _guest_files().items():
        if name == "init":
            arc.file("init", path.read_bytes(), 0o755)
        else:
            arc.file(f"lib/lbd/{name}", path.read_bytes(), 0o755)
    return arc.getvalue()


def main() -> int:
    try:
        guest = build()
    except BuildError as exc:
        print(f"build_initramfs: {exc}", file=sys.stderr)
        return 1
    print(f"kernel    {guest.kernel}")
    print(f"initramfs {guest.initramfs} ({guest.initramfs.stat().st_size} bytes)")
    print(f"package   {guest.package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
