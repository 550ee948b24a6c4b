#!/usr/bin/env python3
"""A/B of two builds of the converter on one mouse, in the same minutes: did a change cost speed?

Runs `convert` of the same source with binary A and binary B in ABBA blocks (A B B A, the next
block B A A B), after one unmeasured warm-up of each, so the machine's drift falls on both
equally; each block's ratio B/A comes from its own sums, and the median over the blocks is the
figure to quote. Also prints each binary's median wall and CPU seconds and largest peak RSS,
and checks that both wrote the same data (benches/output_hashes.py).

    python benches/ab.py --a OLD_BINARY --b target/release/sensorium-ingest \\
        [--source ZIP | --trials 64] [--blocks 6] [--threads N] [--work /tmp/sensorium-ab]

Without --source, a real-size 64-trial mouse is generated with benches/gen_big.py (cached in
--work).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def workload(work: Path, trials: int) -> Path:
    d = work / f"mouse-{trials}"
    found = sorted(d.glob("*.zip"))
    if found:
        return found[0]
    d.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([PY, str(REPO / "benches" / "gen_big.py"), str(d), "--trials",
                          str(trials)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def run(binary: Path, source: Path, store: Path, threads: int | None) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    cmd = [str(binary), "-q", "convert", str(source), "--out", str(store)]
    if threads:
        cmd += ["--threads", str(threads)]
    wall0 = os.times().elapsed
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = os.times().elapsed - wall0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}


def data_hash(store: Path) -> str:
    dataset = next(p for p in store.iterdir() if (p / "manifest.json").exists())
    out = subprocess.run([PY, str(REPO / "benches" / "output_hashes.py"), str(dataset)],
                         check=True, capture_output=True, text=True)
    return out.stdout.splitlines()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="baseline binary")
    ap.add_argument("--b", type=Path, required=True, help="binary under test")
    ap.add_argument("--source", type=Path)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sensorium-ab"))
    a = ap.parse_args()
    source = a.source or workload(a.work, a.trials)
    stores = {"a": a.work / "out-a", "b": a.work / "out-b"}
    binaries = {"a": a.a, "b": a.b}
    for k in "ab":
        run(binaries[k], source, stores[k], a.threads)  # warm-up: source in the page cache
    same = data_hash(stores["a"]) == data_hash(stores["b"])
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    ratios = []
    for block in range(a.blocks):
        order = "abba" if block % 2 == 0 else "baab"
        walls = {"a": 0.0, "b": 0.0}
        for k in order:
            r = run(binaries[k], source, stores[k], a.threads)
            runs[k].append(r)
            walls[k] += r["wall"]
        ratios.append(walls["b"] / walls["a"])
        print(f"block {block}: {order.upper()} wall B/A {ratios[-1]:.3f}", file=sys.stderr)
    print(f"source: {source} ({a.blocks} ABBA blocks, {len(runs['a'])} runs each)")
    for k in "ab":
        rs = runs[k]
        print(f"{k.upper()} {binaries[k]}: wall median {statistics.median(r['wall'] for r in rs):.3f} s, "
              f"cpu median {statistics.median(r['cpu'] for r in rs):.3f} s, "
              f"peak rss max {max(r['rss'] for r in rs) / 1e6:.1f} MB")
    print(f"wall B/A: median of blocks {statistics.median(ratios):.3f} "
          f"(blocks {min(ratios):.3f}-{max(ratios):.3f})")
    cpu = statistics.median(r["cpu"] for r in runs["b"]) / statistics.median(r["cpu"] for r in runs["a"])
    print(f"cpu B/A: ratio of medians {cpu:.3f}")
    print(f"same data: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
