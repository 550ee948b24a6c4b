#!/usr/bin/env python3
"""Read benchmark: the reads analysts do, from our Zarr output (zarr-python 3) and from the
extracted source tree (numpy), for a few chunk/shard/codec layouts of the default pipeline.

For every layout: convert SOURCE with a pipeline variant (timed: wall and CPU), then time
  trial    one whole trial (responses + video), 8 random trials
  neuron   one neuron across every trial (responses[:, j, :]), 4 random neurons
  batch    32 random trials, each with a random 64-frame window (responses + video)
and the same reads from the extracted tree (np.load, mmap where it helps). Warm page cache.

    python benches/reads.py SOURCE.zip [--work /tmp/sensorium-reads] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "target" / "release" / "sensorium-ingest"
DEFAULT = (REPO / "pipelines" / "sensorium2023.yaml").read_text()

RESP_ANCHOR = "    chunk_shape: [1, 512, full]\n    shard_shape: [4, full, full]\n"
VID_ANCHOR = "    chunk_shape: [1, full, full, full]\n    shard_shape: [16, full, full, full]\n"

# name -> (responses chunk, responses shard, videos chunk, videos shard, zstd level or a whole
# `compression` mapping for videos, responses and statistics)
LAYOUTS = {
    "r512-s4-z1": ("[1, 512, full]", "[4, full, full]", None, None, 1),
    "r512-s4-z3": ("[1, 512, full]", "[4, full, full]", None, None, 3),
    "r128-s4-z1": ("[1, 128, full]", "[4, full, full]", None, None, 1),
    "rtrial-s4-z1": ("[1, full, full]", "[4, full, full]", None, None, 1),
    "r512f64-s4-z1": ("[1, 512, 64]", "[4, full, full]", "[1, full, full, 64]", None, 1),
    "r512-s16-z1": ("[1, 512, full]", "[16, full, full]", None, None, 1),
    "r512-s4-z-1": ("[1, 512, full]", "[4, full, full]", None, None, -1),
    "r512-s4-blosc-lz4": ("[1, 512, full]", "[4, full, full]", None, None,
                          "{codec: blosc_lz4, level: 5}"),
    "r512-s4-blosc-zstd1": ("[1, 512, full]", "[4, full, full]", None, None,
                            "{codec: blosc_zstd, level: 1}"),
}


def pipeline_text(rc, rs, vc, vs, level) -> str:
    codec = level if isinstance(level, str) else f"{{codec: zstd, level: {level}}}"
    text = re.sub(r"compression: \{codec: zstd, level: -?\d+\}(?=\n    dimension_names:|"
                  r"\n    attributes:)", f"compression: {codec}", DEFAULT)
    assert RESP_ANCHOR in text and VID_ANCHOR in text, "default pipeline changed: update anchors"
    text = text.replace(RESP_ANCHOR, f"    chunk_shape: {rc}\n    shard_shape: {rs}\n")
    if vc or vs:
        text = text.replace(VID_ANCHOR, f"    chunk_shape: {vc or '[1, full, full, full]'}\n"
                                        f"    shard_shape: {vs or '[16, full, full, full]'}\n")
    return text


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def reads(get_resp, get_vid, n, N, T, reps, seed=1):
    rng = np.random.default_rng(seed)
    trials = rng.integers(0, n, size=8)
    neurons = rng.integers(0, N, size=4)
    batch = rng.choice(n, size=min(32, n), replace=False)
    starts = rng.integers(0, T - 64, size=len(batch))

    def trial():
        for p in trials:
            get_resp(int(p), slice(None), slice(None))
            get_vid(int(p), slice(None))

    def neuron():
        for j in neurons:
            get_resp(slice(None), int(j), slice(None))

    def window():
        for p, t in zip(batch, starts):
            get_resp(int(p), slice(None), slice(int(t), int(t) + 64))
            get_vid(int(p), slice(int(t), int(t) + 64))

    return {"trial": timed(trial, reps) / len(trials), "neuron": timed(neuron, reps) / len(neurons),
            "batch": timed(window, reps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sensorium-reads"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []

    tree = a.work / "tree"
    if not tree.exists():
        with zipfile.ZipFile(a.source) as zf:
            zf.extractall(tree)
    root = next(p for p in tree.iterdir() if p.is_dir())
    ids = sorted(int(p.stem) for p in (root / "data" / "responses").glob("*.npy"))
    r0 = np.load(root / "data" / "responses" / f"{ids[0]}.npy", mmap_mode="r")
    n, (N, T) = len(ids), r0.shape

    def src_resp(p, j, t):
        if isinstance(p, int):
            return np.array(np.load(root / "data" / "responses" / f"{ids[p]}.npy",
                                    mmap_mode="r")[j, t])
        return np.stack([np.array(np.load(root / "data" / "responses" / f"{i}.npy",
                                          mmap_mode="r")[j, t]) for i in ids])

    def src_vid(p, t):
        return np.array(np.load(root / "data" / "videos" / f"{ids[p]}.npy", mmap_mode="r")[..., t])

    r = reads(src_resp, src_vid, n, N, T, a.reps)
    rows.append(("source tree (numpy)", float("nan"), float("nan"), float("nan"), r))

    for name in a.layouts.split(","):
        pipe = a.work / f"{name}.yaml"
        pipe.write_text(pipeline_text(*LAYOUTS[name]))
        out = a.work / "out"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        p = subprocess.Popen([str(BIN), "convert", str(a.source), "--out", str(out), "--force",
                              "--pipeline", str(pipe)], stdout=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        assert os.waitstatus_to_exitcode(status) == 0, name
        ds = next(p for p in out.iterdir() if (p / "data.zarr").is_dir())
        size = sum(f.stat().st_size for f in (ds / "data.zarr").rglob("*") if f.is_file()
                   and "statistics" not in f.parts)
        g = zarr.open_group(ds / "data.zarr", mode="r")
        resp, vid = g["responses"], g["videos"]
        r = reads(lambda p, j, t: resp[p, j, t], lambda p, t: vid[p, ..., t], n, N, T, a.reps)
        rows.append((name, wall, ru.ru_utime + ru.ru_stime, size / 1e6, r))
        shutil.rmtree(out)

    print(f"\n{'layout':22} {'conv s':>7} {'cpu s':>7} {'MB':>7} {'trial ms':>9} {'neuron ms':>10} "
          f"{'batch32 ms':>11}")
    for name, wall, cpu, mb, r in rows:
        print(f"{name:22} {wall:7.2f} {cpu:7.2f} {mb:7.1f} {r['trial'] * 1e3:9.1f} "
              f"{r['neuron'] * 1e3:10.1f} {r['batch'] * 1e3:11.1f}")
    print(f"\n({n} trials, N={N}, T={T}; reads timed warm, median of {a.reps}; conv = convert "
          f"wall/CPU, MB = videos+responses on disk)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
