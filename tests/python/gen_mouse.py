#!/usr/bin/env python3
"""Deterministic generator of synthetic Sensorium 2023 ("dynamic") mice.

Writes a mouse in the real source format (see shared FORMAT.md): per-trial
``.npy`` files under ``data/<var>/<i>.npy`` plus ``meta/`` arrays, packed as a
zip (default) or written as an extracted folder.

    python tests/python/gen_mouse.py OUTDIR [options]      # prints the path written

or, from Python::

    from gen_mouse import generate
    path = generate(outdir, trials=12, neurons=50, frames=50, seed=1, dtype=">f8")

Same options + seed give byte-identical output: zip entries carry a fixed
timestamp and permissions and are written in sorted path order (which is
lexicographic, so ``10.npy`` comes before ``2.npy`` as real tools write them).
Only integer draws from numpy's PCG64 stream and IEEE arithmetic (+ - * / sqrt)
are used to make values, so the bytes do not depend on libm or SIMD paths.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 36, 64
VARIABLES = ("videos", "responses", "behavior", "pupil_center")
STATS = ("min", "max", "mean", "std")
NEW_TIERS = ("train", "oracle", "live_test_main", "live_test_bonus",
             "final_test_main", "final_test_bonus")
WITHHELD_TIERS = ("live_test_main", "live_test_bonus", "final_test_main",
                  "final_test_bonus", "none")
ZIP_DATE = (2023, 1, 1, 0, 0, 0)
CORRUPTIONS = ("truncated-npy", "bad-magic", "shape-mismatch", "frames-mismatch",
               "missing-trial", "tiers-length")

DEFAULTS = dict(
    trials=12, neurons=50, frames=50, seed=0,
    animal=90000, session=1, scan=1, hex=None,
    dtype="<f4", order="C",
    format="zip", no_top_folder=False, compression="deflate", zip64=False,
    junk=False, dir_entries=False,
    gaps=False, old_release=False, extra_meta=False, extra_stats=False,
    object_array=False, nan_payload=False, static_stats=False, corrupt=None,
)
# Options that change what the dataset holds (and so its name's hex). Packaging
# options (format, top folder, compression, zip64, junk, directory entries) do
# not, so a zip and the folder generated with the same content options share a name.
CONTENT_KEYS = ("trials", "neurons", "frames", "seed", "animal", "session", "scan",
                "dtype", "order", "gaps", "old_release", "extra_meta", "extra_stats",
                "object_array", "nan_payload", "static_stats", "corrupt")

# Junk entries (relative to the archive root / dataset root, see junk_paths()).
JUNK_CONTENT = {
    "macosx": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        junk",
    "ds_store": b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00junk",
    "appledouble": b"\x00\x05\x16\x07\x00\x02\x00\x00AppleDouble",
}

NAN_PAYLOAD_BITS = {2: 0x7E2A, 4: 0x7FC0_1234, 8: 0x7FF8_0000_0000_1234}


def dataset_stem(opts: dict) -> str:
    """`dynamic<animal>-<session>-<scan>-Video-<32 hex>` for these options."""
    hexpart = opts.get("hex")
    if not hexpart:
        content = {k: opts[k] for k in CONTENT_KEYS}
        hexpart = hashlib.md5(json.dumps(content, sort_keys=True).encode()).hexdigest()
    hexpart = hexpart.lower()
    if len(hexpart) != 32 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"--hex must be 32 hex digits, got {hexpart!r}")
    return f"dynamic{opts['animal']}-{opts['session']}-{opts['scan']}-Video-{hexpart}"


def junk_paths(stem: str, top_folder: bool) -> list[str]:
    """Junk entries a zip gets with --junk (paths as stored in the archive)."""
    pre = f"{stem}/" if top_folder else ""
    return [f"__MACOSX/{pre}data/videos/._0.npy", f"{pre}.DS_Store",
            f"{pre}data/responses/._1.npy"]


# --------------------------------------------------------------------------- values

def _npy_bytes(arr: np.ndarray, order: str = "C") -> bytes:
    buf = io.BytesIO()
    if order == "F" and arr.ndim >= 2:
        arr = np.asfortranarray(arr)
    else:
        arr = np.ascontiguousarray(arr)
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _to_dtype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float64 values to `dtype` keeping NaN bits: cast natively, then swap bytes."""
    native = dtype.newbyteorder("=")
    out = a.astype(native)
    if dtype.byteorder not in ("=", "|") and dtype != native:
        out = out.byteswap().view(dtype)
    return out


def _nan_value(dtype: np.dtype, payload: bool) -> np.ndarray:
    """A one-element native array holding the NaN to use for tails."""
    native = dtype.newbyteorder("=")
    if not payload:
        return np.array([np.nan], dtype=native)
    bits = NAN_PAYLOAD_BITS[native.itemsize]
    return np.array([bits], dtype=f"u{native.itemsize}").view(native)


def _smooth(rng: np.random.Generator, length: int, step: int) -> np.ndarray:
    """Random walk of integer steps, scaled; integer draws only."""
    steps = rng.integers(-step, step + 1, size=length).astype(np.float64)
    return np.cumsum(steps) / 16.0


def _video(rng: np.random.Generator, T: int) -> np.ndarray:
    """(36, 64, T) grey levels 0..255: drifting triangle grating + moving blob + noise."""
    y = np.arange(HEIGHT, dtype=np.float64)[:, None, None]
    x = np.arange(WIDTH, dtype=np.float64)[None, :, None]
    t = np.arange(T, dtype=np.float64)[None, None, :]
    kx = int(rng.integers(-4, 5)) / 64.0
    ky = int(rng.integers(-4, 5)) / 36.0
    if kx == 0 and ky == 0:
        kx = 2 / 64.0
    speed = int(rng.integers(1, 6)) / 100.0
    phase = np.mod(x * kx + y * ky + t * speed, 1.0)
    tri = np.abs(2.0 * phase - 1.0)                       # 0..1, piecewise linear
    contrast = int(rng.integers(40, 110))
    base = int(rng.integers(90, 150))
    cx0, cy0 = int(rng.integers(10, 54)), int(rng.integers(8, 28))
    vx, vy = int(rng.integers(-3, 4)) / 10.0, int(rng.integers(-3, 4)) / 10.0
    cx, cy = cx0 + vx * t, cy0 + vy * t
    dist = np.sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy))
    blob = np.maximum(0.0, 1.0 - dist / 9.0) * int(rng.integers(-60, 61))
    # sparse sensor noise: about one pixel in six is off by one grey level
    noise = rng.integers(-1, 2, size=(HEIGHT, WIDTH, T)) * (rng.integers(0, 3, size=(HEIGHT, WIDTH, T)) == 0)
    v = base + contrast * (tri - 0.5) + blob + noise
    return np.clip(np.round(v), 0.0, 255.0)


def _responses(rng: np.random.Generator, N: int, T: int, rates: np.ndarray) -> np.ndarray:
    """(N, T) sparse non-negative responses: many exact zeros."""
    active = rng.integers(0, 1000, size=(N, T)) < rates[:, None]
    u = rng.integers(1, 1 << 20, size=(N, T)).astype(np.float64) / float(1 << 20)
    amp = u * u * u * 12.0 + u * 0.5
    return np.where(active, amp, 0.0)


def _behavior(rng: np.random.Generator, T: int) -> np.ndarray:
    """(2, T): pupil dilation (positive, smooth), running speed (mostly >= 0)."""
    pupil = 18.0 + _smooth(rng, T, 6)
    pupil = np.maximum(pupil, 2.0)
    run = np.abs(_smooth(rng, T, 20)) - rng.integers(0, 3) / 4.0
    return np.stack([pupil, run])


def _pupil_center(rng: np.random.Generator, T: int) -> np.ndarray:
    x = 310.0 + _smooth(rng, T, 10) + rng.integers(-200, 201) / 10.0
    y = 245.0 + _smooth(rng, T, 10) + rng.integers(-200, 201) / 10.0
    return np.stack([x, y])


def _valid_length(rng: np.random.Generator, position: int, T: int) -> int:
    """Frames before the NaN tail; some trials have no tail at all."""
    if position % 4 == 0:
        return T
    if T > 300:
        return 300 if position % 4 != 3 else int(rng.integers(240, T))
    low = -(-3 * T // 4)                                    # ceil(0.75 T)
    return int(rng.integers(low, T)) if low < T else T


def _neuron_positions(rng: np.random.Generator, N: int) -> tuple[np.ndarray, np.ndarray]:
    """`cell_motor_coordinates` (N, 3) int64 in microns and sorted, gapped `unit_ids`."""
    coords = np.stack([rng.integers(-700, 701, size=N), rng.integers(-700, 701, size=N),
                       rng.integers(50, 451, size=N)], axis=1).astype(np.int64)
    unit_ids = (int(rng.integers(1, 40)) + np.cumsum(rng.integers(1, 6, size=N))).astype(np.int64)
    return coords, unit_ids


def _trial_numbers(rng: np.random.Generator, n: int, gaps: bool) -> list[int]:
    if not gaps:
        return list(range(n))
    k = max(3, n // 3)
    top = n + k - 1                      # keep the highest number so a gap is certain
    rest = rng.choice(top, size=n - 1, replace=False)
    return sorted(int(i) for i in rest) + [top]


def _tiers(rng: np.random.Generator, n: int, old_release: bool) -> list[str]:
    if old_release:
        seed_tiers = ["oracle", "live_test_main", "none", "none", "oracle"]
    else:
        seed_tiers = ["oracle", "live_test_main", "live_test_bonus",
                      "final_test_main", "final_test_bonus", "oracle"]
    tiers = (seed_tiers + ["train"] * n)[:n]
    if n > 0 and "train" not in tiers:
        tiers[-1] = "train"
    return [tiers[i] for i in rng.permutation(n)]


def _trial_idx(rng: np.random.Generator, n: int) -> list[str]:
    out, cur = [], int(rng.integers(0, 50))
    for _ in range(n):
        cur += int(rng.integers(1, 9))
        if rng.integers(0, 4) == 0:
            k = int(rng.integers(2, 4))
            out.append("--".join(str(cur + j) for j in range(k)))
            cur += k
        else:
            out.append(str(cur))
    # file numbers say nothing about recording order: shuffle against them
    return [out[i] for i in rng.permutation(n)]


def _fixed_unicode(values: list[str]) -> np.ndarray:
    width = max([len(v) for v in values] + [1])
    return np.array(values, dtype=f"<U{width}")


def _time_stats(stack: np.ndarray, with_median: bool) -> dict[str, np.ndarray]:
    """NaN-ignoring statistics over the trial axis (axis 0), in float64.

    Sums run trial by trial (fixed order, plain IEEE adds) to stay bit-reproducible.
    """
    valid = ~np.isnan(stack)
    zero = np.where(valid, stack, 0.0)
    count = valid.sum(axis=0).astype(np.float64)
    total = np.zeros(stack.shape[1:])
    for a in zero:
        total = total + a
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        sq = np.zeros(stack.shape[1:])
        for a, ok in zip(stack, valid):
            d = np.where(ok, a - mean, 0.0)
            sq = sq + d * d
        std = np.sqrt(sq / count)
    mn = np.where(valid, stack, np.inf).min(axis=0)
    mx = np.where(valid, stack, -np.inf).max(axis=0)
    none = count == 0
    out = {"min": np.where(none, np.nan, mn), "max": np.where(none, np.nan, mx),
           "mean": np.where(none, np.nan, mean), "std": np.where(none, np.nan, std)}
    if with_median:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["median"] = np.nanmedian(stack, axis=0)
    return out


# --------------------------------------------------------------------------- build

def build_entries(**options) -> tuple[str, dict[str, bytes], dict]:
    """Make the dataset in memory.

    Returns (stem, {path relative to the dataset root: bytes}, info) where info
    describes what was generated (trial numbers, tiers, valid lengths, ...).
    """
    opts = dict(DEFAULTS)
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unknown option(s): {sorted(unknown)}")
    opts.update(options)
    n, N, T = int(opts["trials"]), int(opts["neurons"]), int(opts["frames"])
    if n < 1 or N < 1 or T < 2:
        raise ValueError("need trials >= 1, neurons >= 1, frames >= 2")
    dtype = np.dtype(opts["dtype"])
    if dtype.kind != "f":
        raise ValueError(f"--dtype must be a float dtype, got {dtype.str}")
    if opts["order"] not in ("C", "F"):
        raise ValueError("--order must be C or F")
    if opts["corrupt"] is not None and opts["corrupt"] not in CORRUPTIONS:
        raise ValueError(f"--corrupt must be one of {CORRUPTIONS}")
    old = bool(opts["old_release"])
    gaps = bool(opts["gaps"]) or old
    order = opts["order"]
    stem = dataset_stem(opts)
    rng = np.random.default_rng(int(opts["seed"]))

    ids = _trial_numbers(rng, n, gaps)
    tiers = _tiers(rng, n, old)
    withheld = [t in WITHHELD_TIERS for t in tiers]
    lengths = [_valid_length(rng, p, T) for p in range(n)]
    nan = _nan_value(dtype, bool(opts["nan_payload"]))
    rates = rng.integers(80, 400, size=N)                 # per-mille activity per neuron

    def with_tail(values: np.ndarray, length: int) -> np.ndarray:
        arr = values.astype(dtype.newbyteorder("="))
        arr[..., length:] = nan[0]
        return arr

    data: dict[str, list[np.ndarray]] = {v: [] for v in VARIABLES}
    for p in range(n):
        L = lengths[p]
        data["videos"].append(with_tail(_video(rng, T), L))
        resp = _responses(rng, N, T, rates)
        if withheld[p]:
            data["responses"].append(np.zeros((N, T), dtype=dtype.newbyteorder("=")))
        else:
            data["responses"].append(with_tail(resp, L))
        data["behavior"].append(_behavior(rng, T).astype(dtype.newbyteorder("=")))
        data["pupil_center"].append(with_tail(_pupil_center(rng, T), L))

    entries: dict[str, bytes] = {}

    def put(path: str, arr: np.ndarray, float_cast: bool = False) -> None:
        if float_cast:
            arr = _to_dtype(arr, dtype)
        entries[path] = _npy_bytes(arr, order)

    for var in VARIABLES:
        for p, i in enumerate(ids):
            put(f"data/{var}/{i}.npy", _to_dtype(data[var][p], dtype))

    # meta/neurons
    coords, unit_ids = _neuron_positions(rng, N)
    put("meta/neurons/cell_motor_coordinates.npy", coords)
    put("meta/neurons/unit_ids.npy", unit_ids)
    info_extra_neurons = {}
    if opts["extra_meta"]:
        areas = ["V1", "LM", "AL", "RL"]
        area = np.array([areas[i] for i in rng.choice(4, size=N, p=[0.7, 0.15, 0.1, 0.05])],
                        dtype="<U2")
        layers = [b"L2/3", b"L4", b"L5"]
        layer = np.array([layers[i] for i in rng.integers(0, 3, size=N)], dtype="|S4")
        animal_ids = np.full(N, int(opts["animal"]), dtype=np.int64)
        put("meta/neurons/area.npy", area)
        put("meta/neurons/layer.npy", layer)
        put("meta/neurons/animal_ids.npy", animal_ids)
        info_extra_neurons = {"area": area, "layer": layer, "animal_ids": animal_ids}
    if opts["object_array"]:
        bad = np.empty(N, dtype=object)
        for j in range(N):
            bad[j] = {"neuron": j} if j % 2 else f"cell-{j}"
        buf = io.BytesIO()
        np.save(buf, bad, allow_pickle=True)
        entries["meta/neurons/bad.npy"] = buf.getvalue()

    # meta/trials
    tier_arr = _fixed_unicode(tiers)
    if opts["corrupt"] == "tiers-length":
        tier_arr = tier_arr[:-1]
    put("meta/trials/tiers.npy", tier_arr)
    trial_idx = None
    if not old:
        trial_idx = _fixed_unicode(_trial_idx(rng, n))
        put("meta/trials/trial_idx.npy", trial_idx)
    info_extra_trials = {}
    if opts["extra_meta"]:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        hashes = ["".join(alphabet[j] for j in rng.integers(0, 64, size=20)) for _ in range(n)]
        condition_hash = np.array(hashes, dtype="<U20")
        session_frame = np.cumsum(rng.integers(T + 30, T + 400, size=n)).astype(np.int32)
        is_repeat = np.array([t == "oracle" for t in tiers], dtype=np.bool_)
        put("meta/trials/condition_hash.npy", condition_hash)
        put("meta/trials/session_frame.npy", session_frame)
        put("meta/trials/is_repeat.npy", is_repeat)
        info_extra_trials = {"condition_hash": condition_hash,
                             "session_frame": session_frame, "is_repeat": is_repeat}

    # meta/statistics
    subsets = {"all": list(range(n))}
    if opts["extra_stats"]:
        subsets["train"] = [p for p in range(n) if tiers[p] == "train"]
    for var in VARIABLES:
        stack = np.stack([a.astype(np.float64) for a in data[var]])
        for subset, positions in subsets.items():
            stats = _time_stats(stack[positions], bool(opts["extra_stats"]))
            for stat, values in stats.items():
                put(f"meta/statistics/{var}/{subset}/{stat}.npy", values, float_cast=True)
        if opts["static_stats"]:
            # not time-resolved (as in the 2022 static release): the frame axis averaged away
            frames = np.moveaxis(stack, -1, 1).reshape(-1, *stack.shape[1:-1])
            stats = _time_stats(frames, False)
            for stat in ("mean", "std"):
                put(f"meta/statistics/{var}/static/{stat}.npy", stats[stat], float_cast=True)

    # corruptions for error tests
    victim = ids[len(ids) // 2]
    corrupt = opts["corrupt"]
    if corrupt == "truncated-npy":
        path = f"data/responses/{victim}.npy"
        entries[path] = entries[path][: len(entries[path]) // 2]
    elif corrupt == "bad-magic":
        path = f"data/videos/{victim}.npy"
        entries[path] = b"NOTNUMPY" + entries[path][8:]
    elif corrupt == "shape-mismatch":
        put(f"data/responses/{victim}.npy", _to_dtype(data["responses"][len(ids) // 2][:-1], dtype))
    elif corrupt == "frames-mismatch":
        put(f"data/behavior/{victim}.npy", _to_dtype(data["behavior"][len(ids) // 2][:, :-1], dtype))
    elif corrupt == "missing-trial":
        del entries[f"data/pupil_center/{ids[-1]}.npy"]

    info = {
        "stem": stem, "options": opts, "trial_ids": ids, "tiers": tiers,
        "valid_lengths": lengths, "withheld": withheld, "dtype": dtype.str,
        "trial_idx": None if trial_idx is None else trial_idx.tolist(),
        "extra_trials": info_extra_trials, "extra_neurons": info_extra_neurons,
        "corrupt_victim": victim if corrupt else None,
    }
    return stem, entries, info


def _dir_entries(paths: list[str]) -> list[str]:
    dirs = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:k]) + "/")
    return sorted(dirs)


def _write_zip(path: Path, files: dict[str, bytes], opts: dict) -> None:
    compress = {"deflate": zipfile.ZIP_DEFLATED, "stored": zipfile.ZIP_STORED}[opts["compression"]]
    names = sorted(files)
    if opts["dir_entries"]:
        names = sorted(names + _dir_entries(names))
    tmp = path.with_name(path.name + ".tmp")
    saved = zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT
    if opts["zip64"]:
        # As in a >4 GiB archive: zip64 extra fields in the central directory too
        # (sizes, offsets) and a zip64 end-of-central-directory record + locator.
        # zipfile reads these module constants when writing, so lower them meanwhile.
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = 0, 0
    try:
        _write_entries(tmp, names, files, compress, bool(opts["zip64"]))
    finally:
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = saved
    tmp.replace(path)


def _write_entries(tmp: Path, names: list[str], files: dict[str, bytes], compress: int,
                   zip64: bool) -> None:
    with zipfile.ZipFile(tmp, "w") as zf:
        for name in names:
            zi = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            zi.create_system = 3
            if name.endswith("/"):
                zi.external_attr = (0o40755 << 16) | 0x10
                zi.compress_type = zipfile.ZIP_STORED
                zf.writestr(zi, b"")
                continue
            zi.external_attr = 0o100644 << 16
            zi.compress_type = compress
            data = files[name]
            zi.file_size = len(data)
            with zf.open(zi, "w", force_zip64=zip64) as f:
                f.write(data)


def generate(outdir, **options) -> Path:
    """Generate one mouse into `outdir`; return the zip file or dataset folder written."""
    stem, entries, _info = build_entries(**options)
    opts = dict(DEFAULTS)
    opts.update(options)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    top = not opts["no_top_folder"]
    if opts["format"] == "zip":
        files = {(f"{stem}/" if top else "") + p: b for p, b in entries.items()}
        if opts["junk"]:
            j = junk_paths(stem, top)
            files[j[0]] = JUNK_CONTENT["macosx"]
            files[j[1]] = JUNK_CONTENT["ds_store"]
            files[j[2]] = JUNK_CONTENT["appledouble"]
        path = outdir / f"{stem}.zip"
        _write_zip(path, files, opts)
        return path
    if opts["format"] != "folder":
        raise ValueError("--format must be zip or folder")
    root = outdir / stem
    if root.exists():
        shutil.rmtree(root)
    files = dict(entries)
    if opts["junk"]:  # only the junk that lives inside the dataset folder
        files[".DS_Store"] = JUNK_CONTENT["ds_store"]
        files["data/responses/._1.npy"] = JUNK_CONTENT["appledouble"]
    for rel in sorted(files):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[rel])
    return root


def describe(**options) -> dict:
    """What `generate` with these options produces (trial numbers, tiers, ...)."""
    return build_entries(**options)[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("outdir", type=Path, help="folder to write the zip / dataset folder into")
    ap.add_argument("--trials", type=int, default=DEFAULTS["trials"], help="number of trials")
    ap.add_argument("--neurons", type=int, default=DEFAULTS["neurons"], help="N")
    ap.add_argument("--frames", type=int, default=DEFAULTS["frames"], help="T (frames per trial)")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--animal", type=int, default=DEFAULTS["animal"])
    ap.add_argument("--session", type=int, default=DEFAULTS["session"])
    ap.add_argument("--scan", type=int, default=DEFAULTS["scan"])
    ap.add_argument("--hex", default=None,
                    help="32 hex digits for the name; without it, the md5 of the content options")
    ap.add_argument("--dtype", default=DEFAULTS["dtype"],
                    help="numpy float dtype of the per-trial and statistics arrays (<f4, <f8, >f8, >f4, ...)")
    ap.add_argument("--order", choices=("C", "F"), default="C",
                    help="memory order of every npy with ndim >= 2")
    ap.add_argument("--format", choices=("zip", "folder"), default="zip")
    ap.add_argument("--no-top-folder", action="store_true",
                    help="zip entries at the root (data/..., meta/...) instead of <stem>/...")
    ap.add_argument("--compression", choices=("deflate", "stored"), default="deflate")
    ap.add_argument("--zip64", action="store_true",
                    help="zip64 everywhere: force_zip64 on every entry, zip64 sizes/offsets in "
                         "the central directory and a zip64 end record")
    ap.add_argument("--junk", action="store_true",
                    help="add __MACOSX/, .DS_Store and ._* entries")
    ap.add_argument("--dir-entries", action="store_true",
                    help="add explicit directory entries to the zip (as `zip -r` does)")
    ap.add_argument("--gaps", action="store_true", help="trial numbers with gaps")
    ap.add_argument("--old-release", action="store_true",
                    help="tiers include 'none', no meta/trials/trial_idx.npy; implies --gaps")
    ap.add_argument("--extra-meta", action="store_true",
                    help="extra per-neuron (area <U, layer |S, animal_ids int64) and per-trial "
                         "(condition_hash <U, session_frame int32, is_repeat bool) files")
    ap.add_argument("--extra-stats", action="store_true",
                    help="add median.npy and a second statistics subset train/")
    ap.add_argument("--object-array", action="store_true",
                    help="add meta/neurons/bad.npy, a pickled object array (error tests)")
    ap.add_argument("--static-stats", action="store_true",
                    help="add a subset static/ whose mean/std have no frame axis "
                         "(videos (36, 64), responses (N,), others (2,))")
    ap.add_argument("--nan-payload", action="store_true",
                    help="NaN tails use a non-default NaN bit pattern")
    ap.add_argument("--corrupt", choices=CORRUPTIONS, default=None,
                    help="damage the dataset on purpose (error tests)")
    args = vars(ap.parse_args(argv))
    outdir = args.pop("outdir")
    print(generate(outdir, **args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
