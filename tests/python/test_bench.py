"""The README's benchmark command works from a fresh clone: it builds two synthetic mice with
benches/gen_big.py (4 and 6 real-size trials here), runs every command it compares and checks our
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
        [sys.executable, str(helpers.REPO / "benches" / "bench.py"), "--trials", "4", "--big", "6",
         "--reps", "1", "--scaling-blocks", "2", "--work", str(tmp_path), "--bin",
         str(helpers.binary()), "--check"],
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
    # The 2-thread speedup comes from two ABBA blocks: 2 threads, 1, 1, 2, then 1, 2, 2, 1, all
    # adjacent, after an unmeasured warm-up conversion.
    assert re.search(r"\(median of 2 ABBA blocks: \d+\.\d+, \d+\.\d+\)", proc.stdout), proc.stdout
    runs = re.findall(r"^rep 0\s+4 trials (ours|ours-1t)\s", proc.stderr, re.M)
    assert runs == ["ours", "ours-1t", "ours-1t", "ours", "ours-1t", "ours", "ours", "ours-1t"], \
        proc.stderr
    assert "warm-up    4 trials (unmeasured)" in proc.stderr, proc.stderr
    # `verify` runs on the output of the scaling blocks and its throughput is reported.
    assert re.search(r"^rep 0\s+4 trials verify\s+\d+\.\d+ GB/s$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^\s+verify\s+\d+\.\d+ GB/s of decoded values  \[reported\]  \(median of 1,",
                     proc.stdout, re.M), proc.stdout
    # Peaks: the largest of the runs; the flatness ratio from as many runs at each size (four
    # 2-thread runs at 4 trials, in the blocks, and four at 6 trials).
    assert re.search(r"^\s+peak RSS ours\s+\d+\.\d+ MB \[<= 256\]  \(largest of the runs; "
                     r"median \d+\.\d+\)", proc.stdout, re.M), proc.stdout
    assert len(re.findall(r"^rep 0\s+6 trials ours\s", proc.stderr, re.M)) == 4, proc.stderr
    assert re.search(r"^\s+peak RSS 6 / 4 trials\s+\d+\.\d+\s+\[within 1\.10\]  \(largest of 4 "
                     r"runs each\)", proc.stdout, re.M), proc.stdout


def test_ab_benchmark_compares_two_builds_in_blocks_and_their_data(tmp_path):
    """benches/ab.py: the same build as A and B gives the block ratios, both medians, and says
    the two wrote the same data; a build that writes other data makes it fail."""
    source = helpers.REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
    args = [sys.executable, str(helpers.REPO / "benches" / "ab.py"), "--a", str(helpers.binary()),
            "--b", str(helpers.binary()), "--source", str(source), "--blocks", "2",
            "--work", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^block \d: (\w+) wall", proc.stderr, re.M) == ["ABBA", "BAAB"], proc.stderr
    assert re.search(r"^wall B/A: median of blocks \d+\.\d+ \(blocks \d+\.\d+-\d+\.\d+\)$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"^A .*: wall median \d+\.\d+ s, cpu median \d+\.\d+ s, peak rss max "
                     r"\d+\.\d+ MB$", proc.stdout, re.M), proc.stdout
    assert "same data: yes" in proc.stdout, proc.stdout

    # B: the same binary with a pipeline that compresses harder, so its shard files differ.
    text = subprocess.run([str(helpers.binary()), "default-pipeline"], capture_output=True,
                          text=True, check=True).stdout
    pipeline = tmp_path / "level9.yaml"
    pipeline.write_text(text.replace("{codec: zstd, level: 1}", "{codec: zstd, level: 9}"))
    other = tmp_path / "other-build"
    other.write_text(f'#!/bin/sh\nexec "{helpers.binary()}" "$@" --pipeline "{pipeline}"\n')
    other.chmod(0o755)
    args[args.index("--b") + 1] = str(other)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "same data: NO" in proc.stdout, proc.stdout + proc.stderr


def test_cold_cache_benchmark_runs_and_restores_the_machine(tmp_path):
    """benches/cold_cache.py (root only: it drops the page cache, sets a cgroup read limit and
    the disk's readahead) converts with every binary given and leaves the readahead and cgroups
    as they were."""
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.skip("benches/cold_cache.py needs root")
    sys.path.insert(0, str(helpers.REPO / "benches"))
    from cold_cache import disk_of

    helpers.binary()
    work = tmp_path / "work"
    work.mkdir()
    readahead = disk_of(work) / "queue" / "read_ahead_kb"
    before = readahead.read_text()
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "benches" / "cold_cache.py"), "--bin",
         str(helpers.binary()), "--trials", "4", "--reps", "1", "--threads", "1",
         "--readahead-kb", "64", "--work", str(work)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if "cannot limit reads" in proc.stderr:  # no blkio / io controller here
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"readahead 64 KiB, 1 threads, 4 trials", proc.stdout), proc.stdout
    wall, cpu = map(float, re.search(r"wall\s+(\d+\.\d+) s\s+cpu\s+(\d+\.\d+) s",
                                      proc.stdout).groups())
    assert wall > 0 and cpu > 0, proc.stdout
    # Every stage of the default pipeline, timed from the run's run.json.
    line = re.search(r"stages \(s\): (.*)$", proc.stdout, re.M)
    assert line, proc.stdout
    stages = dict(item.split() for item in line.group(1).split(", "))
    assert list(stages) == ["videos", "responses", "behavior", "pupil_center", "statistics",
                            "trials", "neurons"], proc.stdout
    assert float(stages["responses"]) > 0, proc.stdout
    assert readahead.read_text() == before
    assert not (work / "cold-out").exists()
    for group in ("/sys/fs/cgroup/blkio/sensorium-cold", "/sys/fs/cgroup/sensorium-cold"):
        assert not os.path.exists(group), f"{group} left behind"


def _tiny_mouse(tmp_path) -> str:
    """A 6-trial mouse from benches/gen_big.py, small enough for a test (64 neurons, 120 frames:
    every valid length is at least 90 frames, so 50-80 frame windows fit)."""
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "benches" / "gen_big.py"), str(tmp_path / "src"),
         "--trials", "6", "--neurons", "64", "--frames", "120"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_read_benchmark_readers_all_return_np_loads_values(tmp_path):
    """benches/reads.py, both parts, one repetition, two layouts: the analyst reads run, and every
    training-sample reader (np.load, mmap, zarr-python, zarrs, tensorstore) runs on every layout
    and returns np.load's values (the benchmark checks that itself and stops otherwise). Speed is
    the benchmark's business: no timing is asserted."""
    layouts = ["r512-s4-z1", "r512f64-s4-z1"]
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(helpers.REPO / "benches" / "reads.py"), _tiny_mouse(tmp_path),
         "--work", str(work), "--bin", str(helpers.binary()), "--reps", "1",
         "--sample-reps", "1", "--samples", "8", "--layouts", ",".join(layouts)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = "|".join(re.escape(n) for n in ["source tree (numpy)", *layouts])
    analyst = {m.group(1): m.group(2).split()
               for m in re.finditer(rf"^({names})\s+(\S.*)$", proc.stdout, re.M)}
    assert sorted(analyst) == sorted(["source tree (numpy)", *layouts]), proc.stdout
    assert all(float(x) > 0 for x in analyst[layouts[0]]), proc.stdout
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(npy|npy-mmap|(?:zarr|zarrs|tensorstore) r\S+)\s+(\d+\.\d+)\s+\d+\.\d+\s+\(", proc.stdout,
        re.M)}
    readers = ["npy", "npy-mmap"] + [f"{r} {l}" for r in ("zarr", "zarrs", "tensorstore")
                                     for l in layouts]
    assert sorted(rows) == sorted(readers), proc.stdout
    assert all(rate > 0 for rate in rows.values()), proc.stdout
    assert re.search(r"^npy\s+\d+\.\d+\s+1\.00\s", proc.stdout, re.M), proc.stdout
    assert "all 8 readers returned np.load's values for all 8 samples" in proc.stdout, proc.stdout
    assert not list(work.glob("out-*")), "the layouts' outputs are removed at the end"


def test_read_benchmark_stops_when_a_reader_returns_other_values():
    import importlib.util

    import numpy as np
    import pytest

    spec = importlib.util.spec_from_file_location("bench_reads",
                                                  helpers.REPO / "benches" / "reads.py")
    reads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reads)

    def right(p, a, b):
        return {"responses": np.arange(a, b, dtype=np.float32)}

    def wrong(p, a, b):  # one value off in the last sample
        x = right(p, a, b)
        if p == 2:
            x["responses"][-1] += 1
        return x

    samples = [(0, 0, 4), (1, 2, 6), (2, 1, 5)]
    assert set(reads.training({"npy": right, "same": right}, samples, 1)) == {"npy", "same"}
    with pytest.raises(SystemExit, match=r"reader wrong, sample \(2, 1, 5\).*responses differs"):
        reads.training({"npy": right, "wrong": wrong}, samples, 1)
