"""The README's benchmark command works from a fresh clone: it builds a synthetic mouse with
benches/gen_big.py (4 real-size trials here), runs every command it compares and checks our
output value for value. Speed is the benchmark's business: no timing is asserted here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import helpers

COMMANDS = ["ours", "ours-1t", "two-1t", "python"] + (["unzip"] if shutil.which("unzip") else [])


def test_benchmark_runs_every_command_and_checks_our_output(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "benches" / "bench.py"), "--trials", "4", "--big", "0",
         "--reps", "1", "--work", str(tmp_path), "--bin", str(helpers.binary()), "--check"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {m.group(1): [float(x) for x in m.group(2).split()]
             for m in re.finditer(r"^\s+4 tr (\S+)\s+(.*)$", proc.stdout, re.M)}
    assert sorted(table) == sorted(COMMANDS), proc.stdout
    for name, (wall, cpu, rss, gbps) in table.items():
        assert wall > 0 and cpu > 0 and rss > 0 and gbps > 0, (name, proc.stdout)
    for label in ("ours / python", "1 thread / 2 threads", "two 1-thread jobs", "peak RSS ours"):
        assert re.search(rf"^\s+{re.escape(label)}\s+\d+\.\d+", proc.stdout, re.M), proc.stdout
    assert "matches the source value for value (4 trials" in proc.stdout, proc.stdout
