"""lbd-merge round trips: serve, write with real clients, stop, merge, serve the result."""

from __future__ import annotations

import hashlib
import os
import pty
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from support import TOOL_PATH, random_file, run
from toolsupport import MiB, Stack, qemu_compare, serve_and_compare, tool, tool_json

SIZE = 32 * MiB


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_commit_two_change_files_into_the_base(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    c1 = st.add_layer(lbd_server, "c1.lbd")
    c2 = st.add_layer(lbd_server, "c2.lbd")
    out = tool("merge", "-f", str(st.base), "-e", str(c1), "-e", str(c2), "--verify").stdout
    assert "merged" in out and "verified" in out
    assert not os.path.exists(str(st.base) + ".lbd-merge")
    expected = st.expected_file()
    qemu_compare(expected, st.base)  # type: ignore[arg-type]
    # the merged base alone serves what the stack served
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base)], expected)
    # the change files are kept but no longer belong on the changed base
    p = tool("inspect", "-f", str(st.base), "-e", str(c1), check=False)
    assert p.returncode == 1 and "do not belong together" in p.stderr
    # --remove deletes what was merged
    (tmp_path / "b").mkdir()
    st2 = Stack(tmp_path / "b", SIZE, seed=5)
    d1 = st2.add_layer(lbd_server, "d1.lbd")
    tool("merge", "-f", str(st2.base), "-e", str(d1), "--remove")
    assert not d1.exists()
    qemu_compare(st2.expected_file(), st2.base)  # type: ignore[arg-type]


def test_merge_into_new_files(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE, seed=2)
    c1 = st.add_layer(lbd_server, "c1.lbd")
    c2 = st.add_layer(lbd_server, "c2.lbd")
    base_sum = sha(st.base)  # type: ignore[arg-type]
    stack = ["-f", str(st.base), "-e", str(c1), "-e", str(c2)]
    # a flat image of the whole device
    tool("merge", *stack, "-o", str(tmp_path / "flat.img"), "--verify")
    qemu_compare(st.expected_file(), tmp_path / "flat.img")
    run(["lbd", "merge", *stack, "-o", str(tmp_path / "flat2.img")])  # the same as a subcommand
    qemu_compare(tmp_path / "flat.img", tmp_path / "flat2.img")
    # one change file replacing c1 + c2; it keeps c2's id
    tool("merge", *stack, "-o", str(tmp_path / "both.lbd"), "--verify")
    both = tool_json("inspect", str(tmp_path / "both.lbd"))
    assert both["id"] == tool_json("inspect", str(c2))["id"]
    assert both["parent"]["name"] == "base.img" and both["dead_bytes"] == 0
    assert sha(st.base) == base_sum, "writing a new file changed the base"  # type: ignore[arg-type]
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base), "-e",
                                   str(tmp_path / "both.lbd")], st.expected_file())
    # a change file created on c2 fits on the merged file too (same id)
    c3 = st.add_layer(lbd_server, "c3.lbd")
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base), "-e",
                                   str(tmp_path / "both.lbd"), "-e", str(c3)],
                      st.expected_file())
    # nothing is overwritten
    p = tool("merge", *stack, "-o", str(tmp_path / "flat.img"), check=False)
    assert p.returncode == 1 and "exists" in p.stderr
    assert not list(tmp_path.glob("*.lbd-tmp"))


def test_merge_upper_change_file_into_the_one_below(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE, seed=4)
    c1 = st.add_layer(lbd_server, "c1.lbd")
    c2 = st.add_layer(lbd_server, "c2.lbd")
    c3 = st.add_layer(lbd_server, "c3.lbd")
    id1 = tool_json("inspect", str(c1))["id"]
    tool("merge", "-e", str(c1), "-e", str(c2), "-e", str(c3), "--verify")
    d = tool_json("inspect", "--check", str(c1), expect_rc=3)  # the overwritten data is dead
    assert d["id"] == id1 and d["parent"]["name"] == "base.img"
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base), "-e", str(c1)],
                      st.expected_file())
    tool("compact", str(c1))
    assert tool_json("inspect", "--check", str(c1))["check"]["result"] == "clean"
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base), "-e", str(c1)],
                      st.expected_file())


def test_merge_refuses_files_that_do_not_belong_together(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE)
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=3)
    c2 = st.add_layer(lbd_server, "c2.lbd", n_writes=3)
    other = random_file(tmp_path / "other.img", SIZE, seed=42)
    before = sha(other), sha(c1), sha(c2)
    for args in (["-f", str(other), "-e", str(c1)],  # another base
                 ["-f", str(st.base), "-e", str(c2)],  # skipping c1
                 ["-e", str(c2), "-e", str(c1)],  # upside down
                 ["-f", str(st.base), "-e", str(c1), "-e", str(c1)]):  # twice
        p = tool("merge", *args, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert "do not belong together" in p.stderr or "twice" in p.stderr, p.stderr
    small = random_file(tmp_path / "small.img", SIZE // 2)
    p = tool("merge", "-f", str(small), "-e", str(c1), check=False)
    assert p.returncode == 1 and "bytes" in p.stderr
    assert (sha(other), sha(c1), sha(c2)) == before
    assert not list(tmp_path.glob("*.lbd-merge"))


def test_merge_killed_at_random_points_then_rerun(tmp_path: Path, lbd_server) -> None:
    """kill -9 at spread-out moments; the state is whole, untouched, or known half-merged."""
    st = Stack(tmp_path, 128 * MiB, seed=6)
    ops = [f"write -P {i + 1} {i * 6 * MiB} {4 * MiB}" for i in range(20)]
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=30, ops=ops)
    expected = st.expected_file()
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(st.base, pristine)  # type: ignore[arg-type]
    work = tmp_path / "work.img"
    args = ["lbd-merge", "-f", str(work), "-e", str(c1)]
    env = {**os.environ, "PATH": TOOL_PATH}
    shutil.copyfile(pristine, work)
    t0 = time.monotonic()
    run(args)
    full = time.monotonic() - t0
    outcomes = {"untouched": 0, "done": 0, "half": 0}
    rng = random.Random(11)
    intent = Path(str(work) + ".lbd-merge")
    for k in range(10):
        shutil.copyfile(pristine, work)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if k % 2:
            time.sleep(full * rng.random())  # anywhere in the run, start-up included
        else:  # anywhere once the merge has begun writing
            deadline = time.monotonic() + 60
            while not intent.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if intent.exists():
            outcomes["half"] += 1
            # the half-merged base is refused by the server and flagged by --check
            p = run(["lbd", "serve", "-s", str(st.size), "-f", str(work), "--unix",
                     str(tmp_path / "x.sock"), "-a", "none"], check=False, timeout=60)
            assert p.returncode == 2 and "interrupted" in p.stderr, p.stderr
            p = tool("inspect", "--check", str(work), check=False)
            assert p.returncode == 2 and "half-merged" in p.stdout
            # nor is it read as the base of a new image
            p = tool("merge", "-f", str(work), "-e", str(c1), "-o", str(tmp_path / "x.img"),
                     check=False)
            assert p.returncode == 1 and "interrupted" in p.stderr, p.stderr
            out = run(args).stdout  # the re-run finishes the job
            assert "resuming" in out
            assert not intent.exists()
            qemu_compare(expected, work)
        elif sha(work) == sha(pristine):
            outcomes["untouched"] += 1
            run(args)
            qemu_compare(expected, work)
        else:
            outcomes["done"] += 1
            qemu_compare(expected, work)
    print("kill outcomes:", outcomes)
    assert outcomes["half"] >= 1, outcomes  # the kills did land inside merges


def test_progress_bar_on_a_terminal_only(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE, seed=8)
    c1 = st.add_layer(lbd_server, "c1.lbd")
    # piped: nothing but the report
    p = tool("merge", "-f", str(st.base), "-e", str(c1), "-o", str(tmp_path / "a.img"))
    assert p.stderr == "" and "%" not in p.stdout
    # a terminal: a bar with sizes and a rate
    master, slave = pty.openpty()
    env = {**os.environ, "PATH": TOOL_PATH}
    proc = subprocess.Popen(["lbd-merge", "-f", str(st.base), "-e", str(c1), "-o",
                             str(tmp_path / "b.img")], stdout=subprocess.PIPE, stderr=slave,
                            env=env)
    os.close(slave)
    seen = bytearray()

    def drain() -> None:  # a pty's buffer is small: read while the tool runs
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the tool has exited and closed its end
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    proc.communicate(timeout=120)
    reader.join(60)
    os.close(master)
    assert proc.returncode == 0
    text = seen.decode()
    assert "writing b.img" in text and "100.0%" in text and "/s" in text and "MiB" in text, text
    qemu_compare(tmp_path / "a.img", tmp_path / "b.img")
