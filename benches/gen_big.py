#!/usr/bin/env python3
"""Streaming generator of real-size synthetic mice, for benchmarks.

`tests/python/gen_mouse.py` builds a whole mouse in memory (fine for test sizes, not for a
9.4 GB mouse). This writes the same layout (`<stem>/data/<var>/<i>.npy`, `<stem>/meta/...`,
deflate level 6, entries in sorted path order, zip64 where needed) trial by trial, with the
same value generators (`gen_mouse._video`, `_responses`, ...), so memory stays flat. Trials are
generated and deflated by a process pool; the zip is assembled in the main process.

    python benches/gen_big.py OUTDIR --trials 64 [--neurons 7863 --frames 324 --jobs 2]

Prints the path of the zip written. Same options give the same bytes.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
import gen_mouse as gm  # noqa: E402

DOS_TIME = 0
DOS_DATE = ((2023 - 1980) << 9) | (1 << 5) | 1
LEVEL = 6


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def deflate(raw: bytes) -> tuple[bytes, int, int]:
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    data = c.compress(raw) + c.flush()
    return data, zlib.crc32(raw), len(raw)


def trial_array(var: str, args) -> np.ndarray:
    """One variable of one trial, from its own seeded stream (independent of order)."""
    seed, p, N, T, withheld, length, rates = args
    rng = np.random.default_rng([seed, p, gm.VARIABLES.index(var)])
    f4 = np.dtype("<f4")
    if var == "videos":
        a = gm._video(rng, T).astype(f4)
    elif var == "responses":
        if withheld:
            return np.zeros((N, T), dtype=f4)
        a = gm._responses(rng, N, T, rates).astype(f4)
    elif var == "behavior":
        return gm._behavior(rng, T).astype(f4)
    else:
        a = gm._pupil_center(rng, T).astype(f4)
    a[..., length:] = np.nan
    return a


class ZipWriter:
    """Minimal zip writer taking pre-deflated entries (zip64 records when offsets need them)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.central: list[tuple[bytes, int, int, int, int]] = []

    def add(self, name: str, data: bytes, crc: int, size: int) -> None:
        name_b = name.encode()
        offset = self.f.tell()
        assert size < 0xFFFFFFFF and len(data) < 0xFFFFFFFF
        self.f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, DOS_TIME, DOS_DATE,
                                 crc, len(data), size, len(name_b), 0))
        self.f.write(name_b)
        self.f.write(data)
        self.central.append((name_b, crc, len(data), size, offset))

    def close(self) -> None:
        cd_start = self.f.tell()
        for name_b, crc, csize, size, offset in self.central:
            extra = b""
            off32 = offset
            if offset >= 0xFFFFFFFF:
                extra = struct.pack("<HHQ", 0x0001, 8, offset)
                off32 = 0xFFFFFFFF
            self.f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45, 0, 8,
                                     DOS_TIME, DOS_DATE, crc, csize, size, len(name_b),
                                     len(extra), 0, 0, 0, 0o100644 << 16, off32))
            self.f.write(name_b)
            self.f.write(extra)
        cd_end = self.f.tell()
        n, cd_size = len(self.central), cd_end - cd_start
        if cd_start >= 0xFFFFFFFF or n >= 0xFFFF:
            self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size,
                                     cd_start))
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                 min(cd_size, 0xFFFFFFFF), min(cd_start, 0xFFFFFFFF), 0))
        self.f.close()


class RunningStats:
    """NaN-ignoring min/max/mean/std over trials, in float64, one trial at a time."""

    def __init__(self, shape):
        self.n = np.zeros(shape)
        self.s = np.zeros(shape)
        self.ss = np.zeros(shape)
        self.mn = np.full(shape, np.inf)
        self.mx = np.full(shape, -np.inf)

    def add(self, a: np.ndarray) -> None:
        a = a.astype(np.float64)
        ok = ~np.isnan(a)
        z = np.where(ok, a, 0.0)
        self.n += ok
        self.s += z
        self.ss += z * z
        self.mn = np.minimum(self.mn, np.where(ok, a, np.inf))
        self.mx = np.maximum(self.mx, np.where(ok, a, -np.inf))

    def result(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))
        none = self.n == 0
        return {"min": np.where(none, np.nan, self.mn), "max": np.where(none, np.nan, self.mx),
                "mean": np.where(none, np.nan, mean), "std": np.where(none, np.nan, std)}


def generate(outdir: Path, trials: int, neurons: int, frames: int, seed: int, jobs: int) -> Path:
    n, N, T = trials, neurons, frames
    rng = np.random.default_rng(seed)
    tiers = gm._tiers(rng, n, False)
    withheld = [t in gm.WITHHELD_TIERS for t in tiers]
    lengths = [gm._valid_length(rng, p, T) for p in range(n)]
    rates = rng.integers(80, 400, size=N)
    trial_idx = gm._trial_idx(rng, n)
    coords = np.stack([rng.integers(-700, 701, size=N), rng.integers(-700, 701, size=N),
                       rng.integers(50, 451, size=N)], axis=1).astype(np.int64)
    unit_ids = (int(rng.integers(1, 40)) + np.cumsum(rng.integers(1, 6, size=N))).astype(np.int64)
    stem = f"dynamic{90100 + n}-1-1-Video-" + f"{seed:08x}{n:08x}{N:08x}{T:08x}"
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{stem}.zip"
    tmp = path.with_name(path.name + ".tmp")

    # Sorted path order, as real archives: data/behavior/*, data/pupil_center/*,
    # data/responses/*, data/videos/* (each lexicographic: 10.npy before 2.npy), then meta/.
    order = sorted(range(n), key=str)
    stats = {"videos": RunningStats((36, 64, T)), "responses": RunningStats((N, T)),
             "behavior": RunningStats((2, T)), "pupil_center": RunningStats((2, T))}
    zw = ZipWriter(tmp)
    tasks = [(seed, p, N, T, withheld[p], lengths[p], rates) for p in order]
    # One pass per variable keeps entries in sorted order without holding a variable's trials.
    with Pool(jobs) as pool:
        for var in ("behavior", "pupil_center", "responses", "videos"):
            for p, entry in zip(order, pool.imap(_Var(var), tasks, chunksize=1)):
                data, crc, size, arr = entry
                zw.add(f"{stem}/data/{var}/{p}.npy", data, crc, size)
                stats[var].add(arr)
            print(f"  {var}: {n} trials", file=sys.stderr)
    meta: dict[str, np.ndarray] = {
        "meta/neurons/cell_motor_coordinates.npy": coords,
        "meta/neurons/unit_ids.npy": unit_ids,
        "meta/trials/tiers.npy": gm._fixed_unicode(tiers),
        "meta/trials/trial_idx.npy": gm._fixed_unicode(trial_idx),
    }
    for var, st in stats.items():
        for stat, values in st.result().items():
            meta[f"meta/statistics/{var}/all/{stat}.npy"] = values.astype("<f4")
    for rel in sorted(meta):
        data, crc, size = deflate(npy_bytes(meta[rel]))
        zw.add(f"{stem}/{rel}", data, crc, size)
    zw.close()
    tmp.replace(path)
    return path


class _Var:
    def __init__(self, var: str):
        self.var = var

    def __call__(self, args):
        a = trial_array(self.var, args)
        data, crc, size = deflate(npy_bytes(a))
        # Statistics need the values: the array travels back too (at most one trial, ~10 MB).
        return data, crc, size, a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--neurons", type=int, default=7863)
    ap.add_argument("--frames", type=int, default=324)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    print(generate(a.outdir, a.trials, a.neurons, a.frames, a.seed, a.jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
