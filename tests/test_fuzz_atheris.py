"""Coverage-guided fuzzing with atheris (libFuzzer) of the sans-I/O protocol code.

Runs ``tests/fuzz/fuzz_protocol.py`` for a bounded number of inputs per
target (the NBD handshake, the management protocol); a crash or a broken
invariant is a failure and leaves the input in the test's directory.  A
planted bug (``LBD_FUZZ_PLANT``) proves the harness finds what it is for.

``LBD_LONG_TESTS=1`` fuzzes each target for 10 minutes instead
(docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "fuzz" / "fuzz_protocol.py"
LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
RUNS = 200000


def fuzz(target: str, tmp_path: Path, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    budget = ["-max_total_time=600"] if LONG else [f"-runs={RUNS}", "-seed=1"]
    cmd = [sys.executable, str(HARNESS), target, *budget, f"-dict={HERE / 'fuzz' / target}.dict",
           f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})}, cwd=tmp_path)


@pytest.mark.parametrize("target", ["nbd", "mgmt"])
def test_atheris(target: str, tmp_path: Path) -> None:
    p = fuzz(target, tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"the fuzzer found a failure:\n{out[-4000:]}"
    m = re.search(r"Done (\d+) runs", out)
    assert m, out[-2000:]
    runs = int(m.group(1))
    assert runs >= (RUNS if not LONG else 1000), out[-2000:]
    cov = re.findall(r"cov: (\d+)", out)
    print(f"\natheris {target}: {runs} inputs, final coverage {cov[-1] if cov else '?'} edges")


def test_atheris_finds_a_planted_bug(tmp_path: Path) -> None:
    p = fuzz("nbd", tmp_path, "-runs=20000", env={"LBD_FUZZ_PLANT": "1"})
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "AssertionError" in out, out[-2000:]
    assert list(tmp_path.glob("crash-*")), "no crashing input was saved"
