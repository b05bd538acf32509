"""A real single-node Ceph cluster for tests: one mon, one memstore OSD, loopback only.

The daemons run as child processes in a private temporary directory with a
private port range, so several clusters (other test runs) can run at once and
nothing outside the directory is touched.  The OSD keeps its data in RAM
(``memstore``) and saves it to its data directory on a clean stop
(``osd_fast_shutdown = false``), so :meth:`CephCluster.stop_daemons` and
:meth:`CephCluster.start_daemons` take the cluster away and bring it back
with its data — what the "cluster goes away mid-I/O" tests need.

Usage::

    with CephCluster(tmpdir) as c:       # started, pool "rbd" ready
        c.conf, c.admin_keyring          # for lbd serve --ceph-conf/--ceph-keyring
        c.create_image("golden", 64 << 20, data=...)

A session-scoped pytest fixture ``ceph`` (in tests/conftest.py) starts one
cluster for the whole run.  A missing Ceph package is a failure (``require``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import TOOL_PATH, require

POOL = "rbd"
_BINARIES = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd", "rados")


def _free_port_range(count: int) -> int:
    """The first of ``count`` consecutive loopback TCP ports that are free now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the Ceph cluster")


CONF = """\
[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
ms_bind_port_min = {port_min}
ms_bind_port_max = {port_max}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {dir}/$name.keyring
run_dir = {dir}/run
pid_file = {dir}/run/$name.pid
log_file = {dir}/log/$name.log
crash_dir = {dir}/crash
log_to_stderr = false
err_to_stderr = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
mon_osd_reporter_subtree_level = osd
mon_data_avail_warn = 1
mon_data_avail_crit = 0

[mon]
admin_socket = {dir}/run/$name.asok
mon_data = {dir}/mon-$id

[osd]
admin_socket = {dir}/run/$name.asok
osd_data = {dir}/osd-$id
osd_objectstore = memstore
memstore_device_bytes = {memstore_bytes}
osd_fast_shutdown = false
osd_max_object_name_len = 256
osd_max_object_namespace_len = 64
"""


class CephCluster:
    """One mon (``a``) and one OSD (``0``) under ``base`` (a new temporary dir if None)."""

    def __init__(self, base: Path | str | None = None, memstore_bytes: int = 1 << 30) -> None:
        require(*_BINARIES)
        self.dir = Path(tempfile.mkdtemp(prefix="ceph-", dir=base))
        self.fsid = str(uuid.uuid4())
        port = _free_port_range(24)
        self.mon_port = port
        self.port_min, self.port_max = port + 1, port + 23
        self.memstore_bytes = memstore_bytes
        self.conf = str(self.dir / "ceph.conf")
        self.admin_keyring = str(self.dir / "client.admin.keyring")
        self.mon: subprocess.Popen[bytes] | None = None
        self.osd: subprocess.Popen[bytes] | None = None
        self._made = False

    # -- commands --------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PATH": TOOL_PATH, "CEPH_CONF": self.conf}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        p = subprocess.run(list(cmd), capture_output=True, timeout=timeout, env=self._env(),
                           input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n"
                                 f"{p.stdout.decode(errors='replace')}\n"
                                 f"{p.stderr.decode(errors='replace')}\n{self.logs()}")
        return p

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """``ceph -c CONF ARGS`` as client.admin; its stdout."""
        return self.run("ceph", "-c", self.conf, "--connect-timeout", "30", *args,
                        timeout=timeout).stdout.decode()

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self.run("rbd", "-c", self.conf, *args, timeout=timeout).stdout.decode()

    def logs(self) -> str:
        out = []
        for name in ("mon.a", "osd.0"):
            p = self.dir / "log" / f"{name}.log"
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-15:]
                out.append(f"--- {name}.log (tail)\n" + "\n".join(text))
        return "\n".join(out)

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> CephCluster:
        """Make the cluster (first time) and start the daemons; the pool is ready."""
        if not self._made:
            self._make()
        self.start_daemons()
        if not self._made:
            self.ceph("osd", "pool", "create", POOL, "8", "8")
            self.rbd("pool", "init", POOL)
            self._made = True
        return self

    def _make(self) -> None:
        d = self.dir
        for sub in ("run", "log", "crash", "mon-a", "osd-0"):
            (d / sub).mkdir(exist_ok=True)
        Path(self.conf).write_text(CONF.format(
            fsid=self.fsid, mon_port=self.mon_port, port_min=self.port_min,
            port_max=self.port_max, dir=d, memstore_bytes=self.memstore_bytes))
        mon_kr = str(d / "mon.a.keyring")
        self.run("ceph-authtool", "--create-keyring", mon_kr, "--gen-key", "-n", "mon.",
                 "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", self.admin_keyring, "--gen-key", "-n",
                 "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *")
        osd_kr = str(d / "osd.0.keyring")
        self.run("ceph-authtool", "--create-keyring", osd_kr, "--gen-key", "-n", "osd.0",
                 "--cap", "mon", "allow profile osd", "--cap", "mgr", "allow profile osd",
                 "--cap", "osd", "allow *")
        self.run("ceph-authtool", mon_kr, "--import-keyring", self.admin_keyring)
        self.run("ceph-authtool", mon_kr, "--import-keyring", osd_kr)
        monmap = str(d / "monmap")
        self.run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                 f"[v2:127.0.0.1:{self.mon_port}]", monmap)
        self.run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                 "--keyring", mon_kr)
        self._spawn_mon()
        self.osd_uuid = str(uuid.uuid4())
        out = self.ceph("osd", "new", self.osd_uuid, "0").strip()
        assert out == "0", f"ceph osd new gave id {out!r}"
        self.run("ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid)

    def _spawn(self, *cmd: str) -> subprocess.Popen[bytes]:
        err = open(self.dir / "log" / f"{cmd[0]}.stderr", "ab")
        try:
            return subprocess.Popen(list(cmd), env=self._env(), stdout=err, stderr=err,
                                    stdin=subprocess.DEVNULL)
        finally:
            err.close()

    def _spawn_mon(self) -> None:
        if self.mon is None or self.mon.poll() is not None:
            self.mon = self._spawn("ceph-mon", "-c", self.conf, "-i", "a", "-f")

    def start_daemons(self, timeout: float = 60) -> None:
        """Start the mon and the OSD (if not running) and wait until the OSD is up."""
        self._spawn_mon()
        if self.osd is None or self.osd.poll() is not None:
            self.osd = self._spawn("ceph-osd", "-c", self.conf, "-i", "0", "-f")
        self.wait_osd_up(timeout)

    def wait_osd_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in (("ceph-mon", self.mon), ("ceph-osd", self.osd)):
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode}:\n{self.logs()}")
            p = self.run("ceph", "-c", self.conf, "--connect-timeout", "10", "osd", "dump",
                         "--format", "json", check=False, timeout=30)
            if p.returncode == 0:
                dump = json.loads(p.stdout)
                osds = dump.get("osds", [])
                if osds and osds[0].get("up") == 1:
                    if not self._made or self._pgs_active():
                        return
                last = json.dumps(osds)
            else:
                last = p.stderr.decode(errors="replace")
            time.sleep(0.1)
        raise AssertionError(f"the OSD did not come up in {timeout} s: {last}\n{self.logs()}")

    def _pgs_active(self) -> bool:
        """A read in the pool is answered (without a mgr, ``ceph pg stat`` would hang)."""
        p = self.run("rados", "-c", self.conf, "-p", POOL, "--rados-osd-op-timeout", "5",
                     "stat", "lbd-probe", check=False, timeout=30)
        return p.returncode == 0 or b"No such file or directory" in p.stderr

    def stop_daemons(self, timeout: float = 60) -> None:
        """Stop the OSD (it saves its memstore) and then the mon; the data survives."""
        for attr in ("osd", "mon"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            setattr(self, attr, None)

    def pause(self) -> None:
        """Freeze both daemons (SIGSTOP): the cluster stops answering, as in a partition."""
        for proc in (self.osd, self.mon):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in (self.mon, self.osd):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.stop_daemons(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data helpers -----------------------------------------------------------------

    @contextlib.contextmanager
    def client(self, name: str = "admin", keyring: str | None = None) -> Any:
        """A connected ``rados.Rados`` and the pool's ioctx, as ``(cluster, ioctx)``."""
        import rados

        cluster = rados.Rados(conffile=self.conf, rados_id=name,
                              conf={"keyring": keyring or self.admin_keyring})
        cluster.connect(timeout=30)
        try:
            ioctx = cluster.open_ioctx(POOL)
            try:
                yield cluster, ioctx
            finally:
                ioctx.close()
        finally:
            cluster.shutdown()

    def create_image(self, name: str, size: int, data: bytes | None = None,
                     snap: str | None = None, protect: bool = False) -> None:
        """A new image in the pool, optionally written from offset 0 and snapshotted."""
        import rbd

        with self.client() as (_, ioctx):
            rbd.RBD().create(ioctx, name, size)
            with rbd.Image(ioctx, name) as img:
                if data:
                    step = 4 << 20
                    for off in range(0, len(data), step):
                        img.write(data[off:off + step], off)
                    img.flush()
                if snap is not None:
                    img.create_snap(snap)
                    if protect:
                        img.protect_snap(snap)

    def read_image(self, name: str, offset: int = 0, length: int | None = None,
                   snap: str | None = None) -> bytes:
        import rbd

        with self.client() as (_, ioctx), \
                rbd.Image(ioctx, name, snapshot=snap, read_only=True) as img:
            n = img.size() - offset if length is None else length
            out = bytearray()
            step = 4 << 20
            for off in range(offset, offset + n, step):
                out += img.read(off, min(step, offset + n - off))
            return bytes(out)

    def remove_image(self, name: str) -> None:
        import rbd

        with self.client() as (_, ioctx):
            with rbd.Image(ioctx, name) as img:
                for s in list(img.list_snaps()):
                    if img.is_protected_snap(s["name"]):
                        img.unprotect_snap(s["name"])
                    img.remove_snap(s["name"])
            rbd.RBD().remove(ioctx, name)

    def add_user(self, name: str, *caps: str) -> str:
        """A new cephx user (``client.NAME``) with ``caps``; the path of its keyring."""
        path = str(self.dir / f"client.{name}.keyring")
        self.ceph("auth", "get-or-create", f"client.{name}", *caps, "-o", path)
        return path


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One cluster for the whole test session (started on first use)."""
    with CephCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
