#!/usr/bin/env python3
"""Conversion from a cold page cache, reads limited to a network file system's bandwidth.

A first conversion reads an archive that is not in memory, often from a cluster file system.
This runs each given binary, interleaved, on the benchmark's synthetic mouse (benches/bench.py
builds it) with the page cache dropped before every run, in a cgroup that limits reads from the
archive's disk to --read-mbps, with the disk's readahead set to --readahead-kb (Linux's usual
128 KiB; restored afterwards). Prints each run and the medians, of the whole run and of each
stage (from the run's run.json), to see which stage the cold reads slow.

Needs root (drop_caches, cgroups, readahead). Changes nothing else; the output is removed.

    sudo python benches/cold_cache.py --bin target/release/sensorium-ingest [--bin OTHER] \\
        [--threads 2 --reps 3 --read-mbps 150 --readahead-kb 128 --work /tmp/sensorium-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import workload  # noqa: E402


def disk_of(path: Path) -> Path:
    """The sysfs folder of the whole disk holding `path` (the one with a `queue`)."""
    st = os.stat(path)
    d = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    return d if (d / "queue").exists() else d.parent


def limit_reads(disk: Path, mbps: int) -> Path:
    """A cgroup limiting reads from `disk` to `mbps` MB/s (cgroup v1 blkio or v2 io.max)."""
    dev = (disk / "dev").read_text().strip()
    v1 = Path("/sys/fs/cgroup/blkio")
    if v1.is_dir():
        group = v1 / "sensorium-cold"
        group.mkdir(exist_ok=True)
        (group / "blkio.throttle.read_bps_device").write_text(f"{dev} {mbps * 1_000_000}\n")
    else:
        root = Path("/sys/fs/cgroup")
        (root / "cgroup.subtree_control").write_text("+io\n")
        group = root / "sensorium-cold"
        group.mkdir(exist_ok=True)
        (group / "io.max").write_text(f"{dev} rbps={mbps * 1_000_000}\n")
    return group


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, action="append", required=True)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--read-mbps", type=int, default=150)
    ap.add_argument("--readahead-kb", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sensorium-bench"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it drops the page cache and sets a cgroup read limit")
    src = workload(a.work, a.trials)
    out = a.work / "cold-out"
    disk = disk_of(src)
    readahead = disk / "queue" / "read_ahead_kb"
    saved = readahead.read_text().strip()
    try:
        group = limit_reads(disk, a.read_mbps)
    except OSError as e:
        raise SystemExit(f"cannot limit reads from {disk.name} with a cgroup here: {e}")
    runs: dict[Path, list[tuple[float, float]]] = {b: [] for b in a.bin}
    stages: dict[Path, dict[str, list[float]]] = {b: {} for b in a.bin}
    try:
        readahead.write_text(f"{a.readahead_kb}\n")
        for rep in range(a.reps):
            for b in a.bin if rep % 2 == 0 else a.bin[::-1]:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                # The binary itself is read from disk outside the timing.
                subprocess.run([b, "--version"], check=True, stdout=subprocess.DEVNULL)
                cmd = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh",
                       str(b), "convert", str(src), "--out", str(out), "--threads", a.threads]
                t0 = time.perf_counter()
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, status, ru = os.wait4(p.pid, 0)
                wall = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status) != 0:
                    raise SystemExit(f"{b} failed:\n{p.stderr.read().decode()[-3000:]}")
                cpu = ru.ru_utime + ru.ru_stime
                runs[b].append((wall, cpu))
                for record in out.glob("*/run.json"):
                    for stage in json.loads(record.read_text())["stages"]:
                        stages[b].setdefault(stage["id"], []).append(stage["seconds"])
                print(f"rep {rep} {b}: wall {wall:.3f} s cpu {cpu:.3f} s", file=sys.stderr)
    finally:
        readahead.write_text(f"{saved}\n")
        shutil.rmtree(out, ignore_errors=True)
        try:
            group.rmdir()
        except OSError:
            pass
    print(f"\ncold page cache, reads <= {a.read_mbps} MB/s, readahead {a.readahead_kb} KiB, "
          f"{a.threads} threads, {a.trials} trials (median of {a.reps}):")
    for b, r in runs.items():
        print(f"  {str(b):50} wall {statistics.median(x[0] for x in r):6.3f} s  "
              f"cpu {statistics.median(x[1] for x in r):6.3f} s")
        print("    stages (s): " + ", ".join(f"{name} {statistics.median(v):.3f}"
                                          for name, v in stages[b].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
