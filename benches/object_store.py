#!/usr/bin/env python3
"""Conversion into object storage against conversion to local disk, in the same run.

Starts the S3-compatible server the tests use (moto's standalone server, on localhost; see
tests/python/s3server.py), then converts the real-size benchmark mouse (benches/bench.py's
64-trial workload) in ABBA blocks: `local` into a fresh local store, `s3` into a fresh prefix
of a bucket (built in a local work folder, then uploaded and committed). Reports wall and CPU
medians, the s3/local wall ratio per block and its median, and each command's largest peak
RSS. After the first s3 run the bucket's dataset is verified, so the figure is for a correct
upload.

    .venv-tests/bin/python benches/object_store.py [--trials 64 --blocks 3
                                                    --work /tmp/sensorium-bench]
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
sys.path.insert(0, str(REPO / "benches"))
sys.path.insert(0, str(REPO / "tests" / "python"))

import bench  # noqa: E402
import s3server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sensorium-bench"))
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "sensorium-ingest")
    a = ap.parse_args()
    src = bench.workload(a.work, a.trials)
    run_dir = a.work / "object-store"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    server = s3server.start(run_dir / "moto.log")
    try:
        server.make_bucket("bench")
        env = server.env(SENSORIUM_INGEST_WORK=str(run_dir / "work"))
        os.environ.update(env)
        results = measure(a, src, run_dir, server.proc.pid)
        verify = subprocess.run([str(a.bin), "verify", "s3://bench/run-0", "--against", str(src)],
                                capture_output=True, text=True)
        if verify.returncode != 0:
            raise SystemExit(f"verify of the bucket failed:\n{verify.stdout}{verify.stderr}")
    finally:
        server.stop()
    report(results)
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(a, src: Path, run_dir: Path, server_pid: int) -> dict[str, list[dict]]:
    """ABBA blocks: local, s3, s3, local; then s3, local, local, s3; and so on."""
    results: dict[str, list[dict]] = {"local": [], "s3": []}
    s3_runs = 0
    print(f"converting {src.name} ({a.trials} trials), {a.blocks} ABBA blocks", file=sys.stderr)
    bench.run_measured([[str(a.bin), "-q", "convert", str(src), "--out",
                         str(run_dir / "warm-up")]])
    for block in range(a.blocks):
        order = ["local", "s3", "s3", "local"] if block % 2 == 0 else ["s3", "local", "local", "s3"]
        for what in order:
            if what == "local":
                out = run_dir / "local"
                shutil.rmtree(out, ignore_errors=True)
                target = str(out)
            else:
                target = f"s3://bench/run-{s3_runs}"
                s3_runs += 1
            server_before = cpu_seconds(server_pid)
            r = bench.run_measured([[str(a.bin), "-q", "convert", str(src), "--out", target]])
            r["server_cpu"] = cpu_seconds(server_pid) - server_before
            r["block"] = block
            results[what].append(r)
            print(f"block {block} {what:5s} wall {r['wall']:6.2f} s cpu {r['cpu']:6.2f} s "
                  f"peak {r['rss']:6.1f} MB server cpu {r['server_cpu']:6.2f} s", file=sys.stderr)
    return results


def report(results: dict[str, list[dict]]) -> None:
    med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in results.items()}
    blocks = sorted({r["block"] for r in results["local"]})
    per_block = [sum(r["wall"] for r in results["s3"] if r["block"] == b)
                 / sum(r["wall"] for r in results["local"] if r["block"] == b) for b in blocks]
    print(f"{'command':8} {'wall s':>8} {'cpu s':>8} {'peak MB':>8}")
    for k in results:
        print(f"{k:8} {med[k]:8.2f} {cpu[k]:8.2f} {max(r['rss'] for r in results[k]):8.1f}")
    print(f"\ns3 / local wall, ABBA median  {statistics.median(per_block):6.3f}  [<= 1.5]  "
          f"(blocks {', '.join(f'{x:.3f}' for x in per_block)})")
    print(f"s3 / local cpu                {cpu['s3'] / cpu['local']:6.3f}")
    server = statistics.median(r["server_cpu"] for r in results["s3"])
    print(f"server cpu per s3 run         {server:6.2f} s  (the S3 server's own work, on the "
          "same cores)")


if __name__ == "__main__":
    sys.exit(main())
