#!/usr/bin/env python3
"""Read benchmark: the reads analysts and training loaders do, from our Zarr output and from the
extracted source tree, for a few chunk/shard/codec layouts of the default pipeline.

For every layout: convert SOURCE with a pipeline variant (timed: wall and CPU), then
- analyst reads (part `reads`), with zarr-python 3 and from the tree with numpy:
    trial    one whole trial (responses + video), 8 random trials
    neuron   one neuron across every trial (responses[:, j, :]), 4 random neurons
    batch    32 random trials, each with a random 64-frame window (responses + video)
- training samples (part `training`): what recipe 4 of docs/recipes.md returns for one item.
  A sample is one random train trial and a random window of 50-80 frames inside its valid
  frames: videos, responses (all neurons), behavior and pupil_center, time first. The same
  seeded samples are read by every reader:
    npy          np.load of the trial's .npy files (the official loaders' way)
    npy-mmap     np.load(mmap_mode="r") of the same files
    zarr         zarr-python 3 on the layout's store
    zarrs        zarr-python with the zarrs codec pipeline (`pip install zarrs`)
    tensorstore  tensorstore's zarr3 driver on a file kvstore (`pip install tensorstore`)
  The store readers take behavior and pupil_center from the Parquet tables, loaded once when
  the reader opens, as the recipe does; the npy readers load them per sample. Before timing,
  every reader reads every sample once and must return exactly np.load's values (the run
  stops otherwise). The readers then take turns within each repetition (the order rotates),
  so the ratios against np.load are measured in the same minutes. CPU is the process's user +
  system time (all threads) per sample.
Reads are timed with the page cache warm (every file is read once first); with --cold, the
training part drops the tree and the stores from the page cache before each reader's turn.

    python benches/reads.py SOURCE.zip [--work /tmp/sensorium-reads] [--reps 3]
        [--layouts r512-s4-z1,...] [--parts reads,training] [--samples 64] [--sample-reps 7]
        [--readers npy,npy-mmap,zarr,zarrs,tensorstore] [--window 50-80] [--cold]
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
TRAINING = (REPO / "pipelines" / "sensorium2023-training.yaml").read_text()

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
    "r512f32-s4-z1": ("[1, 512, 32]", "[4, full, full]", "[1, full, full, 32]", None, 1),
    "rtrialf32-s4-z1": ("[1, full, 32]", "[4, full, full]", "[1, full, full, 32]", None, 1),
    "r512-s16-z1": ("[1, 512, full]", "[16, full, full]", None, None, 1),
    "r512-s4-z-1": ("[1, 512, full]", "[4, full, full]", None, None, -1),
    "r512-s4-blosc-lz4": ("[1, 512, full]", "[4, full, full]", None, None,
                          "{codec: blosc_lz4, level: 5}"),
    "r512-s4-blosc-zstd1": ("[1, 512, full]", "[4, full, full]", None, None,
                            "{codec: blosc_zstd, level: 1}"),
    "r512-s4-none": ("[1, 512, full]", "[4, full, full]", None, None, "{codec: none}"),
    # The embedded sensorium2023-training pipeline, as it is.
    "training": None,
    "rtrialf32-s4-lz4": ("[1, full, 32]", "[4, full, full]", "[1, full, full, 32]", None,
                         "{codec: blosc_lz4, level: 5}"),
    "rtrialf32-s4-lz4bit": ("[1, full, 32]", "[4, full, full]", "[1, full, full, 32]", None,
                            "{codec: blosc_lz4, level: 5, shuffle: bit}"),
    "rtrialf64-s4-lz4": ("[1, full, 64]", "[4, full, full]", "[1, full, full, 64]", None,
                         "{codec: blosc_lz4, level: 5}"),
    "r512f32-s4-lz4": ("[1, 512, 32]", "[4, full, full]", "[1, full, full, 32]", None,
                       "{codec: blosc_lz4, level: 5}"),
    "rtrialf32-s4-z-1": ("[1, full, 32]", "[4, full, full]", "[1, full, full, 32]", None, -1),
    "rtrialf32-s4-none": ("[1, full, 32]", "[4, full, full]", "[1, full, full, 32]", None,
                          "{codec: none}"),
    "r512f64-s4-none": ("[1, 512, 64]", "[4, full, full]", "[1, full, full, 64]", None,
                        "{codec: none}"),
}

READERS = ("npy", "npy-mmap", "zarr", "zarrs", "tensorstore")
SOURCE_READERS = ("npy", "npy-mmap")
ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
TABLES = {"behavior": ("pupil_dilation", "running_speed"), "pupil_center": ("x", "y")}


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


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (clean pages; no root needed)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(folder: Path) -> None:
    """Read every file once: the converter writes its shards with O_DIRECT, so a fresh store is
    not in the page cache, and the first timed repetition would pay for the disk."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


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


# ----------------------------------------------------------------------------- training samples

def time_first(x: np.ndarray) -> np.ndarray:
    """The recipe's item layout: frame axis first, contiguous (what a DataLoader collates)."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def draw_samples(tree: Path, ids: list[int], count: int, window: tuple[int, int], seed: int):
    """(position, start, stop) of `count` windows: a random train trial (as the recipe's default
    tiers), a length drawn from `window`, a start inside the trial's valid frames (before the
    video's trailing all-NaN frames, i.e. `valid_frames` of trials.parquet)."""
    lo, hi = window
    tiers = np.load(tree / "meta" / "trials" / "tiers.npy")
    valid = []
    for i in ids:
        v = np.load(tree / "data" / "videos" / f"{i}.npy", mmap_mode="r")
        nan = np.isnan(v).all(axis=(0, 1))
        tail = int(np.argmin(nan[::-1])) if not nan.all() else len(nan)
        valid.append(len(nan) - tail)
    pool = [p for p, (t, v) in enumerate(zip(tiers, valid)) if t == "train" and v >= lo]
    if not pool:
        raise SystemExit(f"no train trial has {lo} valid frames: nothing to sample")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        p = int(pool[rng.integers(len(pool))])
        length = int(rng.integers(lo, min(hi, valid[p]) + 1))
        start = int(rng.integers(0, valid[p] - length + 1))
        out.append((p, start, start + length))
    return out


def npy_reader(tree: Path, ids: list[int], mmap: bool):
    mode = "r" if mmap else None

    def sample(p, a, b):
        return {var: time_first(np.load(tree / "data" / var / f"{ids[p]}.npy",
                                        mmap_mode=mode)[..., a:b])
                for var in ("videos", "responses", "behavior", "pupil_center")}
    return sample


def long_tables(ds: Path, n: int, T: int) -> dict[str, np.ndarray]:
    """behavior / pupil_center as (trial, channel, frame), loaded once as the recipe does (the
    long tables hold every frame of every trial, ordered by trial position then frame)."""
    import pyarrow.parquet as pq
    out = {}
    for var, columns in TABLES.items():
        table = pq.read_table(ds / f"{var}.parquet", columns=list(columns))
        values = np.stack([table[c].to_numpy() for c in columns], axis=-1)
        out[var] = values.reshape(n, T, len(columns)).transpose(0, 2, 1)
    return out


def store_reader(kind: str, ds: Path, n: int, T: int):
    """One of the store readers on dataset folder `ds`; raises SystemExit when its package is
    missing (leave the reader out with --readers)."""
    tables = long_tables(ds, n, T)

    def with_tables(p, a, b, videos, responses):
        return {"videos": time_first(videos), "responses": time_first(responses),
                **{var: time_first(t[p, :, a:b]) for var, t in tables.items()}}

    if kind in ("zarr", "zarrs"):
        if kind == "zarrs":
            try:
                import zarrs  # noqa: F401
            except ImportError:
                raise SystemExit("reader zarrs: `pip install zarrs`, or leave it out with "
                                 "--readers") from None
        # The codec pipeline is chosen when an array is opened.
        with zarr.config.set(ZARRS if kind == "zarrs" else {}):
            g = zarr.open_group(ds / "data.zarr", mode="r")
            videos, responses = g["videos"], g["responses"]
        pipeline = type(responses._async_array.codec_pipeline).__name__
        want = "ZarrsCodecPipeline" if kind == "zarrs" else "BatchedCodecPipeline"
        if pipeline != want:
            raise SystemExit(f"reader {kind}: opened with codec pipeline {pipeline}, not {want}")

        def sample(p, a, b):
            return with_tables(p, a, b, videos[p, :, :, a:b], responses[p, :, a:b])
        return sample

    if kind == "tensorstore":
        try:
            import tensorstore as ts
        except ImportError:
            raise SystemExit("reader tensorstore: `pip install tensorstore`, or leave it out "
                             "with --readers") from None

        def open_ts(name):
            spec = {"driver": "zarr3", "kvstore": {"driver": "file",
                                                   "path": str(ds / "data.zarr" / name)}}
            return ts.open(spec, read=True).result()
        videos, responses = open_ts("videos"), open_ts("responses")

        # As recipe 4 reads (np.asarray of an indexed view). Issuing both reads before waiting
        # on either measured no faster.
        def sample(p, a, b):
            return with_tables(p, a, b, np.asarray(videos[p, :, :, a:b]),
                               np.asarray(responses[p, :, a:b]))
        return sample

    raise SystemExit(f"unknown reader {kind!r}: one of {', '.join(READERS)}")


def check_same(name: str, got: dict, want: dict, sample) -> None:
    """Every array of a reader's sample bit-identical to np.load's (NaN payloads included)."""
    if sorted(got) != sorted(want):
        raise SystemExit(f"reader {name}, sample {sample}: variables {sorted(got)} != "
                         f"{sorted(want)}")
    for var, w in want.items():
        g = got[var]
        if g.shape != w.shape or g.dtype != w.dtype or g.tobytes() != w.tobytes():
            raise SystemExit(f"reader {name}, sample {sample} (trial position, start, stop): "
                             f"{var} differs from np.load's: {g.dtype}{g.shape} against "
                             f"{w.dtype}{w.shape}")


def training(readers: dict, samples: list, reps: int, before_turn=None) -> dict[str, dict]:
    """Checks every reader against the first (np.load), then times them taking turns
    (`before_turn()` runs, untimed, before each turn); returns per reader the median
    samples/s, CPU ms per sample and the per-repetition ratios of its samples/s to the
    reference's."""
    names = list(readers)
    ref = readers[names[0]]
    for s in samples:  # also the warm-up: every file a sample touches is read once
        want = ref(*s)
        for name in names[1:]:
            check_same(name, readers[name](*s), want, s)
    rate = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            fn = readers[name]
            if before_turn is not None:
                before_turn()
            c0, t0 = time.process_time(), time.perf_counter()
            for s in samples:
                fn(*s)
            wall, used = time.perf_counter() - t0, time.process_time() - c0
            rate[name].append(len(samples) / wall)
            cpu[name].append(used / len(samples))
        print(f"rep {rep}: " + ", ".join(f"{n} {rate[n][-1]:.1f}/s" for n in names),
              file=sys.stderr)
    base = rate[names[0]]
    return {name: {"rate": statistics.median(rate[name]), "cpu": statistics.median(cpu[name]),
                   "ratios": [r / b for r, b in zip(rate[name], base)]} for name in names}


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sensorium-reads"))
    ap.add_argument("--bin", type=Path, default=BIN)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the analyst reads")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--parts", default="reads,training", help="reads, training or both")
    ap.add_argument("--readers", default=",".join(READERS),
                    help="training-sample readers; npy (the reference) always runs")
    ap.add_argument("--samples", type=int, default=64, help="training samples per repetition")
    ap.add_argument("--sample-reps", type=int, default=7)
    ap.add_argument("--window", default="50-80", help="training window length range, frames")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cold", action="store_true",
                    help="training part: drop the tree and the stores from the page cache before "
                         "each reader's turn (reads then come from the disk)")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if not parts or parts - {"reads", "training"}:
        ap.error("--parts takes reads, training or reads,training")
    layouts = a.layouts.split(",")
    if unknown := [name for name in layouts if name not in LAYOUTS]:
        ap.error(f"unknown layouts {unknown}: one of {', '.join(LAYOUTS)}")
    kinds = ["npy"] + [r for r in a.readers.split(",") if r != "npy"]
    if unknown := [r for r in kinds if r not in READERS]:
        ap.error(f"unknown readers {unknown}: one of {', '.join(READERS)}")
    lo, hi = (int(x) for x in a.window.split("-"))
    a.work.mkdir(parents=True, exist_ok=True)

    tree = a.work / "tree"
    if not tree.exists():
        with zipfile.ZipFile(a.source) as zf:
            zf.extractall(tree)
    root = next(p for p in tree.iterdir() if p.is_dir())
    warm(root)
    ids = sorted(int(p.stem) for p in (root / "data" / "responses").glob("*.npy"))
    r0 = np.load(root / "data" / "responses" / f"{ids[0]}.npy", mmap_mode="r")
    n, (N, T) = len(ids), r0.shape

    rows = []
    if "reads" in parts:
        def src_resp(p, j, t):
            if isinstance(p, int):
                return np.array(np.load(root / "data" / "responses" / f"{ids[p]}.npy",
                                        mmap_mode="r")[j, t])
            return np.stack([np.array(np.load(root / "data" / "responses" / f"{i}.npy",
                                              mmap_mode="r")[j, t]) for i in ids])

        def src_vid(p, t):
            return np.array(np.load(root / "data" / "videos" / f"{ids[p]}.npy",
                                    mmap_mode="r")[..., t])

        r = reads(src_resp, src_vid, n, N, T, a.reps)
        rows.append(("source tree (numpy)", float("nan"), float("nan"), float("nan"), r))

    # Each layout's output stays until the training part has read it.
    outs = {}
    for name in layouts:
        pipe = a.work / f"{name}.yaml"
        pipe.write_text(TRAINING if name == "training" else pipeline_text(*LAYOUTS[name]))
        out = a.work / f"out-{name}"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        p = subprocess.Popen([str(a.bin), "-q", "convert", str(a.source), "--out", str(out),
                              "--force", "--pipeline", str(pipe)], stdout=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"convert with layout {name} failed")
        ds = next(p for p in out.iterdir() if (p / "data.zarr").is_dir())
        outs[name] = ds
        warm(ds)
        size = sum(f.stat().st_size for f in (ds / "data.zarr").rglob("*") if f.is_file()
                   and "statistics" not in f.parts)
        r = {}
        if "reads" in parts:
            g = zarr.open_group(ds / "data.zarr", mode="r")
            resp, vid = g["responses"], g["videos"]
            r = reads(lambda p, j, t: resp[p, j, t], lambda p, t: vid[p, ..., t], n, N, T, a.reps)
        rows.append((name, wall, ru.ru_utime + ru.ru_stime, size / 1e6, r))

    print(f"\n{'layout':22} {'conv s':>7} {'cpu s':>7} {'MB':>7} {'trial ms':>9} {'neuron ms':>10} "
          f"{'batch32 ms':>11}")
    for name, wall, cpu, mb, r in rows:
        cells = (f"{r['trial'] * 1e3:9.1f} {r['neuron'] * 1e3:10.1f} {r['batch'] * 1e3:11.1f}"
                 if r else f"{'-':>9} {'-':>10} {'-':>11}")
        print(f"{name:22} {wall:7.2f} {cpu:7.2f} {mb:7.1f} {cells}")
    reps = f"reads timed warm, median of {a.reps}; " if "reads" in parts else ""
    print(f"\n({n} trials, N={N}, T={T}; {reps}conv = convert wall/CPU, MB = videos+responses "
          f"on disk)", file=sys.stderr)

    if "training" in parts:
        samples = draw_samples(root, ids, a.samples, (lo, hi), a.seed)
        readers = {}
        for kind in kinds:
            if kind in SOURCE_READERS:
                readers[kind] = npy_reader(root, ids, mmap=kind == "npy-mmap")
            else:
                for name in layouts:
                    readers[f"{kind} {name}"] = store_reader(kind, outs[name], n, T)
        def drop_caches():
            for folder in [root, *outs.values()]:
                evict(folder)

        res = training(readers, samples, a.sample_reps, drop_caches if a.cold else None)
        print(f"\ntraining samples: {len(samples)} per repetition, median of {a.sample_reps}; "
              f"one train trial, a {lo}-{hi} frame window, all {N} neurons, videos, behavior "
              f"and pupil_center, time first; page cache {'cold' if a.cold else 'warm'}")
        print(f"{'reader':34} {'samples/s':>10} {'x np.load':>10} {'(reps)':>13} "
              f"{'cpu ms/sample':>14}")
        for name, m in res.items():
            ratios = m["ratios"]
            spread = f"({min(ratios):.2f}-{max(ratios):.2f})"
            print(f"{name:34} {m['rate']:10.1f} {statistics.median(ratios):10.2f} "
                  f"{spread:>13} {m['cpu'] * 1e3:14.2f}")
        print(f"all {len(readers)} readers returned np.load's values for all {len(samples)} "
              f"samples")

    for ds in outs.values():
        shutil.rmtree(ds.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
