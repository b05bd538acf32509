"""lbd-compact on change files with dead space written by real clients."""

from __future__ import annotations

import os
from pathlib import Path

from toolsupport import MiB, Stack, serve_and_compare, tool, tool_json

SIZE = 32 * MiB


def test_compaction_reclaims_dead_space_and_keeps_the_id(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE, seed=9)
    # the same 4 MiB rewritten after flushes: each synced copy becomes dead space
    ops = []
    for i in range(6):
        ops += [f"write -P {i + 1} 0 {4 * MiB}", "flush"]
    ops += [f"discard {8 * MiB} {MiB}", f"write -P 9 {8 * MiB} {2 * MiB}", "flush",
            f"discard {8 * MiB} {MiB}"]
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=6, ops=ops)
    c2 = st.add_layer(lbd_server, "c2.lbd", n_writes=4)  # created on c1: records c1's id
    before = tool_json("inspect", "--check", str(c1), expect_rc=3)
    assert before["dead_bytes"] >= 20 * MiB
    alloc_before = os.stat(c1).st_blocks * 512
    out = tool("compact", str(c1)).stdout
    assert "compacted" in out and "reclaimed" in out
    after = tool_json("inspect", "--check", str(c1))
    assert after["check"]["result"] == "clean" and after["dead_bytes"] == 0
    assert after["id"] == before["id"] and after["parent"] == before["parent"]
    assert after["created_ns"] == before["created_ns"]
    assert after["data_bytes"] == before["data_bytes"]
    assert after["zero_bytes"] == before["zero_bytes"]
    assert os.stat(c1).st_blocks * 512 <= alloc_before - 20 * MiB
    assert not list(tmp_path.glob("*.lbd-tmp"))
    # the compacted file serves the same device, and c2 still fits on it
    serve_and_compare(lbd_server, st.layer_args(), st.expected_file())
    del c2


def test_compaction_to_another_file(tmp_path: Path, lbd_server) -> None:
    st = Stack(tmp_path, SIZE, seed=10)
    c1 = st.add_layer(lbd_server, "c1.lbd", n_writes=12)
    orig = c1.read_bytes()
    new = tmp_path / "new.lbd"
    tool("compact", str(c1), "-o", str(new))
    assert c1.read_bytes() == orig
    assert tool_json("inspect", str(new))["id"] == tool_json("inspect", str(c1))["id"]
    serve_and_compare(lbd_server, ["-s", str(SIZE), "-f", str(st.base), "-e", str(new)],
                      st.expected_file())
    p = tool("compact", str(c1), "-o", str(new), check=False)
    assert p.returncode == 1 and "exists" in p.stderr
    p = tool("compact", str(st.base), check=False)
    assert p.returncode == 1 and "not an LBD change file" in p.stderr
    p = tool("compact", str(tmp_path / "missing.lbd"), check=False)
    assert p.returncode == 1 and "no such file" in p.stderr
