#!/usr/bin/env python3
"""The plain-Python converter the benchmark compares against.

What a competent analyst would write with numpy + zarr-python 3 + pyarrow: read the zip in
place, write the same layout as `sensorium-ingest convert` with the same codecs and levels
(sharded Zarr v3, zstd 1 inside, crc32c index; zstd 3 Parquet), whole shards at once. No manifest,
no checksums, no validation: the baseline is given every advantage.

    python benches/baseline.py SOURCE.zip OUTDIR
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec  # noqa: F401

LEVEL = 1          # arrays: as pipelines/sensorium2023.yaml
TABLE_LEVEL = 3    # Parquet tables


def load(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.load(io.BytesIO(zf.read(name)), allow_pickle=False)


def sharded(group, name, shape, chunks, shards, dtype, dims, attrs):
    return group.create_array(
        name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
        fill_value=np.nan, compressors=[ZstdCodec(level=LEVEL)], dimension_names=dims,
        attributes=attrs, overwrite=True)


def main(src: str, out: str) -> int:
    zf = zipfile.ZipFile(src)
    names = [n for n in zf.namelist() if not n.endswith("/")]
    top = names[0].split("/", 1)[0] + "/"
    ids = sorted(int(n.rsplit("/", 1)[1][:-4]) for n in names
                 if n.startswith(top + "data/videos/") and n.endswith(".npy"))
    stem = Path(src).name[:-4]
    dataset = re.sub(r"-Video-[0-9a-fA-F]{32}$", "", stem)
    dest = Path(out) / dataset
    dest.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(dest / "data.zarr", mode="w", zarr_format=3,
                           attributes={"dataset": dataset, "source": stem})
    first_v = load(zf, f"{top}data/videos/{ids[0]}.npy")
    first_r = load(zf, f"{top}data/responses/{ids[0]}.npy")
    n, (N, T) = len(ids), first_r.shape
    dt = first_r.dtype.newbyteorder("<")

    videos = sharded(root, "videos", (n, *first_v.shape), (1, *first_v.shape),
                     (16, *first_v.shape), dt, ["trial", "height", "width", "frame"],
                     {"source_variable": "data/videos"})
    # As in the converter: a `full` shard extent rounds up to whole chunks (zarr requires it).
    responses = sharded(root, "responses", (n, N, T), (1, 512, T), (4, -(-N // 512) * 512, T), dt,
                        ["trial", "neuron", "frame"], {"source_variable": "data/responses"})
    valid_frames, withheld = [], []
    for arr, per in ((videos, 16), (responses, 4)):
        var = arr.basename
        for s in range(0, n, per):
            block = np.stack([load(zf, f"{top}data/{var}/{i}.npy") for i in ids[s:s + per]])
            if var == "videos":
                has = ~np.isnan(block).all(axis=(1, 2))            # (trials, T)
                valid_frames += [int(np.flatnonzero(h)[-1] + 1) if h.any() else 0 for h in has]
            else:
                withheld += [bool((b == 0).all()) for b in block]
            arr[s:s + len(block)] = block

    stats = zarr.open_group(dest / "data.zarr" / "statistics", mode="w", zarr_format=3)
    for name in names:
        rel = name[len(top):]
        if rel.startswith("meta/statistics/") and rel.endswith(".npy"):
            a = load(zf, name)
            path = rel[len("meta/statistics/"):-4]
            stats.create_array(path, shape=a.shape, chunks=a.shape, dtype=a.dtype,
                               compressors=[ZstdCodec(level=LEVEL)], overwrite=True)[...] = a

    for var, cols in (("behavior", ("pupil_dilation", "running_speed")),
                      ("pupil_center", ("x", "y"))):
        stack = np.stack([load(zf, f"{top}data/{var}/{i}.npy") for i in ids])  # (n, 2, T)
        table = pa.table({
            "trial_id": np.repeat(np.array(ids, dtype=np.int32), T),
            "frame": np.tile(np.arange(T, dtype=np.int32), n),
            cols[0]: stack[:, 0, :].reshape(-1), cols[1]: stack[:, 1, :].reshape(-1)})
        pq.write_table(table, dest / f"{var}.parquet", compression="zstd",
                       compression_level=TABLE_LEVEL)

    tiers = load(zf, f"{top}meta/trials/tiers.npy")
    trials = {"trial": np.arange(n, dtype=np.int32), "trial_id": np.array(ids, dtype=np.int32),
              "tier": tiers.tolist()}
    if f"{top}meta/trials/trial_idx.npy" in names:
        trials["trial_idx"] = load(zf, f"{top}meta/trials/trial_idx.npy").tolist()
    trials["valid_frames"] = np.array(valid_frames, dtype=np.int32)
    trials["responses_withheld"] = withheld
    pq.write_table(pa.table(trials), dest / "trials.parquet", compression="zstd",
                   compression_level=TABLE_LEVEL)
    coords = load(zf, f"{top}meta/neurons/cell_motor_coordinates.npy")
    neurons = {"neuron": np.arange(N, dtype=np.int32),
               "unit_id": load(zf, f"{top}meta/neurons/unit_ids.npy"),
               "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]}
    pq.write_table(pa.table(neurons), dest / "neurons.parquet", compression="zstd",
                   compression_level=TABLE_LEVEL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
