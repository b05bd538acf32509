"""``lbd serve`` refuses bad set-ups with a clear message and a non-zero exit.

Each case runs the real command; it must exit on its own (never start
serving), print ``lbd: error: ...`` naming the problem on stderr, and show no
traceback.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import lbd_exe, nbdsh, random_file, run

MiB = 1 << 20


def serve_fails(tmp_path: Path, *args: str, sock: str | None = None) -> str:
    """Run ``lbd serve ARGS``; it must fail fast. Returns stderr."""
    sock = sock or str(tmp_path / "s.sock")
    try:  # no management daemon: only the failure under test may stop the start
        p = run([lbd_exe(), "serve", *args, "--unix", sock, "-a", "none"], check=False,
                timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"lbd serve {' '.join(args)} started serving instead of "
                             "refusing") from None
    assert p.returncode != 0, f"lbd serve {' '.join(args)} did not fail:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "lbd: error:" in p.stderr, p.stderr
    assert not os.path.exists(sock), "a failed start left its socket behind"
    return p.stderr


def flat(tmp_path: Path, name: str = "base.img", size: int = 16 * MiB, seed: int = 1) -> str:
    return str(random_file(tmp_path / name, size, seed=seed))


def test_cli_flat_image_wrong_size(tmp_path: Path) -> None:
    base = flat(tmp_path)
    err = serve_fails(tmp_path, "-s", "32M", "-f", base)
    assert "16777216 bytes" in err and "33554432" in err, err
    err = serve_fails(tmp_path, "-s", "8M", "-F", base)
    assert "16777216 bytes" in err, err


def test_cli_flat_image_missing(tmp_path: Path) -> None:
    err = serve_fails(tmp_path, "-s", "16M", "-f", str(tmp_path / "nope.img"))
    assert "nope.img" in err and "no such file" in err.lower(), err


def test_cli_flat_image_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.img"
    d.mkdir()
    for flag in ("-f", "-F"):
        err = serve_fails(tmp_path, "-s", "16M", flag, str(d))
        assert "directory" in err, err


def test_cli_change_file_on_a_different_base(lbd_server, tmp_path: Path) -> None:
    """Created over base A, reopened over base B: refused; --force accepts."""
    a, b = flat(tmp_path, "a.img", seed=1), flat(tmp_path, "b.img", seed=2)
    chg = str(tmp_path / "c.lbd")
    srv = lbd_server(["-s", "16M", "-f", a, "-E", chg])
    nbdsh(srv.uri, "h.pwrite(b'\\xee' * 4096, 8192)")
    assert srv.stop() == 0
    err = serve_fails(tmp_path, "-s", "16M", "-f", b, "-E", chg)
    assert "c.lbd" in err and "--force" in err, err
    err = serve_fails(tmp_path, "-s", "16M", "-f", b, "-e", chg)  # read-only too
    assert "--force" in err, err
    err = serve_fails(tmp_path, "-s", "16M", "-E", chg)  # no base at all
    assert "--force" in err, err
    # --force: served over B, the change file's sectors on top of B's
    srv = lbd_server(["-s", "16M", "-f", b, "-E", chg, "--force"])
    base_b = Path(b).read_bytes()
    nbdsh(srv.uri, f"""
assert h.pread(8192, 0) == {base_b[:8192]!r}
assert h.pread(4096, 8192) == b'\\xee' * 4096
""")
    assert srv.stop() == 0
    # and the right base still works
    srv = lbd_server(["-s", "16M", "-f", a, "-E", chg])
    nbdsh(srv.uri, "assert h.pread(4096, 8192) == b'\\xee' * 4096")


def test_cli_change_file_of_another_size(lbd_server, tmp_path: Path) -> None:
    chg = str(tmp_path / "c.lbd")
    srv = lbd_server(["-s", "16M", "-E", chg])
    assert srv.stop() == 0
    err = serve_fails(tmp_path, "-s", "32M", "-E", chg)
    assert "16777216" in err and "33554432" in err, err


def test_cli_writable_layer_below_top(tmp_path: Path) -> None:
    base = flat(tmp_path)
    for args in (["-E", str(tmp_path / "a.lbd"), "-f", base],
                 ["-F", base, "-E", str(tmp_path / "b.lbd")],
                 ["-f", base, "-E", str(tmp_path / "c.lbd"), "-e", str(tmp_path / "d.lbd")]):
        err = serve_fails(tmp_path, "-s", "16M", *args)
        assert "only the topmost" in err, err
    # nothing was created by a refused stack
    assert not list(tmp_path.glob("*.lbd"))


def test_cli_no_size(tmp_path: Path) -> None:
    err = serve_fails(tmp_path, "-f", flat(tmp_path))
    assert "size" in err and "-s" in err, err


def test_cli_bad_sizes(tmp_path: Path) -> None:
    chg = str(tmp_path / "c.lbd")
    err = serve_fails(tmp_path, "-s", "12x", "-E", chg)
    assert "'12x' is not a size" in err, err
    err = serve_fails(tmp_path, "-s", "1000", "-E", chg)
    assert "not a multiple of 512" in err, err
    err = serve_fails(tmp_path, "-s", "0", "-E", chg)
    assert "positive" in err, err
    err = serve_fails(tmp_path, "-s", "-5", "-E", chg)
    assert "size" in err, err
    err = serve_fails(tmp_path, "-b", "0", "-E", chg)
    assert "-b" in err, err
    err = serve_fails(tmp_path, "-s", "16M", "-b", "32768", "-E", chg)
    assert "-s and -b" in err, err
    assert not os.path.exists(chg)


def test_cli_change_file_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "c.lbd"
    d.mkdir()
    for flag in ("-E", "-e"):
        err = serve_fails(tmp_path, "-s", "16M", flag, str(d))
        assert "is a directory" in err, err


def test_cli_garbage_change_file(tmp_path: Path) -> None:
    g = random_file(tmp_path / "g.lbd", 100_000, seed=3)
    before = g.read_bytes()
    for flag in ("-E", "-e"):
        err = serve_fails(tmp_path, "-s", "16M", flag, str(g))
        assert "not an LBD change file" in err, err
    assert g.read_bytes() == before  # left alone


def test_cli_read_only_change_file_missing(tmp_path: Path) -> None:
    """-e opens an existing change file; it does not create one (-E does)."""
    missing = tmp_path / "missing.lbd"
    err = serve_fails(tmp_path, "-s", "16M", "-e", str(missing))
    assert "missing.lbd" in err, err
    assert not missing.exists()


def test_cli_unix_socket_in_missing_directory(tmp_path: Path) -> None:
    sock = str(tmp_path / "no" / "such" / "dir" / "s.sock")
    err = serve_fails(tmp_path, "-s", "16M", "-E", str(tmp_path / "c.lbd"), sock=sock)
    assert "cannot listen on unix socket" in err and sock in err, err


# -- files in use by another server -----------------------------------------------------------


def test_cli_change_file_in_use(lbd_server, tmp_path: Path) -> None:
    base = flat(tmp_path)
    chg = str(tmp_path / "c.lbd")
    srv = lbd_server(["-s", "16M", "-f", base, "-E", chg])
    for flag in ("-E", "-e"):
        err = serve_fails(tmp_path, "-s", "16M", "-f", base, flag, chg)
        assert "locked" in err and str(srv.proc.pid) in err, err
    nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0)")  # the first server is unharmed


def test_cli_read_only_base_shared_by_two_servers(lbd_server, tmp_path: Path) -> None:
    base = flat(tmp_path)
    a = lbd_server(["-s", "16M", "-f", base, "-E", str(tmp_path / "a.lbd")])
    b = lbd_server(["-s", "16M", "-f", base, "-E", str(tmp_path / "b.lbd")])
    c = lbd_server(["-s", "16M", "-f", base])
    for srv in (a, b, c):
        assert nbdsh(srv.uri, "print(h.get_size())").strip() == str(16 * MiB)


def test_cli_writable_flat_in_use(lbd_server, tmp_path: Path) -> None:
    """A flat image served writable (-F) is not served again, writable or not."""
    base = flat(tmp_path)
    srv = lbd_server(["-s", "16M", "-F", base])
    err = serve_fails(tmp_path, "-s", "16M", "-F", base)
    assert "locked" in err, err
    err = serve_fails(tmp_path, "-s", "16M", "-f", base, "-E", str(tmp_path / "c.lbd"))
    assert "locked" in err, err
    nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0)")


def test_cli_base_under_a_stack_not_served_writable(lbd_server, tmp_path: Path) -> None:
    """The base of a running stack must not be written by another server: the
    change file on top of it would then hold sectors over changed data."""
    base = flat(tmp_path)
    srv = lbd_server(["-s", "16M", "-f", base, "-E", str(tmp_path / "c.lbd")])
    err = serve_fails(tmp_path, "-s", "16M", "-F", base)
    assert "locked" in err, err
    nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0)")
