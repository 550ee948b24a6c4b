#!/usr/bin/env python3
"""Deterministic generators of the rest of the FileTree family (shared FORMAT.md).

Kinds:

* ``static2022``: a Sensorium 2022 ("static") mouse,
  ``static<animal>-<session>-<scan>-GrayImageNet-<32 hex>``: one grey image per trial,
  ``data/images/<i>.npy`` (1, H, W), ``data/responses/<i>.npy`` (N,),
  ``data/behavior/<i>.npy`` (3,), ``data/pupil_center/<i>.npy`` (2,), ``meta/...``.
* ``color``: the Franke et al. 2022 variant, ``...-ColorImageNet-<32 hex>``, images (2, H, W)
  (UV and green).
* ``lab_export``: a lab's own export, named freely (``GCaMP6s1234_FOV1_day1``), with the
  2023 ("dynamic") tree of gen_mouse.py plus ``data/eye_position/<i>.npy`` (2, T),
  ``meta/trials/stimulus_type.npy`` and a ``config.json`` at the top.

    python tests/python/gen_family.py KIND OUTDIR [options]     # prints the path written

or, from Python::

    from gen_family import generate
    path = generate("static2022", outdir, trials=12, neurons=40, seed=1, image_dtype="<f4")

As in gen_mouse.py: same kind + options give byte-identical output (fixed zip timestamps and
permissions, entries in sorted path order); values come from integer draws of numpy's PCG64
stream and IEEE arithmetic only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_mouse  # noqa: E402
from gen_mouse import (_neuron_positions, _npy_bytes, _smooth, _time_stats,  # noqa: E402
                      _to_dtype, _trial_numbers)

KINDS = ("static2022", "color", "lab_export")
STIMULUS = {"static2022": "GrayImageNet", "color": "ColorImageNet"}
CHANNELS = {"static2022": 1, "color": 2}
STATIC_VARIABLES = ("images", "responses", "behavior", "pupil_center")
STATIC_TIERS = ("train", "validation", "test", "final_test")
STATIC_WITHHELD = ("test", "final_test")
STATIC_STATS = ("min", "max", "mean", "std", "median")
BEHAVIOR_COLUMNS = ("pupil_dilation", "pupil_dilation_derivative", "running_speed")
PUPIL_COLUMNS = ("x", "y")
LAB_VARIABLES = gen_mouse.VARIABLES + ("eye_position",)
STIMULUS_TYPES = ("NaturalVideo", "GaussianDot", "Gabor", "PinkNoise", "RandomDots")
IMAGE_CLASSES = ("tench", "goldfinch", "tree_frog", "leatherback", "tabby", "ice_bear",
                 "monarch", "daisy", "volcano", "barn")

PACKAGING = dict(format="zip", no_top_folder=False, compression="deflate", zip64=False,
                 junk=False, dir_entries=False)

STATIC_DEFAULTS = dict(
    trials=12, neurons=40, height=36, width=64, seed=0,
    animal=21067, session=10, scan=18, hex=None,
    image_dtype="uint8", dtype="<f4", order="C",
    gaps=False, extra_meta=False, extra_stats=False,
    **PACKAGING,
)
# Options that change what the dataset holds (and so the hex of its name).
STATIC_CONTENT_KEYS = ("trials", "neurons", "height", "width", "seed", "animal", "session",
                       "scan", "image_dtype", "dtype", "order", "gaps", "extra_meta",
                       "extra_stats")

LAB_DEFAULTS = dict(
    trials=12, neurons=40, frames=50, seed=0, name="GCaMP6s1234_FOV1_day1",
    dtype="<f4", order="C", gaps=False, extra_meta=False, extra_stats=False,
    nan_payload=False, eye_stats=False,
    **dict(PACKAGING, format="folder"),
)
# Passed on to gen_mouse.build_entries for the 2023 part of a lab export.
LAB_MOUSE_KEYS = ("trials", "neurons", "frames", "seed", "dtype", "order", "gaps",
                  "extra_meta", "extra_stats", "nan_payload")


def defaults(kind: str) -> dict:
    if kind in CHANNELS:
        return dict(STATIC_DEFAULTS)
    if kind == "lab_export":
        return dict(LAB_DEFAULTS)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _options(kind: str, options: dict) -> dict:
    opts = defaults(kind)
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unknown option(s) for {kind}: {sorted(unknown)}")
    opts.update(options)
    return opts


def dataset_stem(kind: str, opts: dict) -> str:
    """The source's name: `static<animal>-<session>-<scan>-<Stimulus>-<32 hex>`, or the
    lab export's free name."""
    if kind == "lab_export":
        name = str(opts["name"])
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"--name must be a plain folder name, got {name!r}")
        return name
    hexpart = opts.get("hex")
    if not hexpart:
        content = {k: opts[k] for k in STATIC_CONTENT_KEYS}
        content["kind"] = kind
        hexpart = hashlib.md5(json.dumps(content, sort_keys=True).encode()).hexdigest()
    hexpart = hexpart.lower()
    if len(hexpart) != 32 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"--hex must be 32 hex digits, got {hexpart!r}")
    return (f"static{opts['animal']}-{opts['session']}-{opts['scan']}-{STIMULUS[kind]}-"
            f"{hexpart}")


def junk_paths(kind: str, stem: str, top_folder: bool) -> list[str]:
    """Junk entries a zip gets with junk=True (paths as stored in the archive)."""
    if kind == "lab_export":
        return gen_mouse.junk_paths(stem, top_folder)
    pre = f"{stem}/" if top_folder else ""
    return [f"__MACOSX/{pre}data/images/._0.npy", f"{pre}.DS_Store",
            f"{pre}data/responses/._1.npy"]


# --------------------------------------------------------------------------- static values

def _image(rng: np.random.Generator, channels: int, H: int, W: int) -> np.ndarray:
    """(channels, H, W) grey levels 0..255 (float64 holding integers): a grating, blobs, noise.

    Each channel draws its own pattern, so the UV and green channels of a colour image differ.
    """
    y = np.arange(H, dtype=np.float64)[:, None]
    x = np.arange(W, dtype=np.float64)[None, :]
    out = []
    for _ in range(channels):
        kx = int(rng.integers(-6, 7)) / W
        ky = int(rng.integers(-6, 7)) / H
        if kx == 0 and ky == 0:
            kx = 3.0 / W
        phase = np.mod(x * kx + y * ky + int(rng.integers(0, 100)) / 100.0, 1.0)
        tri = np.abs(2.0 * phase - 1.0)
        v = int(rng.integers(80, 160)) + int(rng.integers(40, 120)) * (tri - 0.5)
        radius = max(2.0, min(H, W) / 4.0)
        for _blob in range(3):
            cx, cy = int(rng.integers(0, W)), int(rng.integers(0, H))
            dist = np.sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy))
            v = v + np.maximum(0.0, 1.0 - dist / radius) * int(rng.integers(-90, 91))
        v = v + rng.integers(-2, 3, size=(H, W))
        out.append(np.clip(np.round(v), 0.0, 255.0))
    return np.stack(out)


def _static_tiers(rng: np.random.Generator, n: int) -> list[str]:
    seed_tiers = ["test", "final_test", "validation", "test", "final_test", "test",
                  "final_test", "validation"]
    tiers = (seed_tiers + ["train"] * n)[:n]
    if n > 0 and "train" not in tiers:
        tiers[-1] = "train"
    return [tiers[i] for i in rng.permutation(n)]


def _frame_image_ids(rng: np.random.Generator, tiers: list[str]) -> list[int]:
    """Train/validation images are shown once; each test tier cycles over a pool of about
    half as many images as it has trials, so its images repeat (as in the real release)."""
    n = len(tiers)
    pool_sizes = {t: (tiers.count(t) + 1) // 2 for t in STATIC_WITHHELD}
    unique = sum(1 for t in tiers if t not in STATIC_WITHHELD)
    drawn = rng.choice(10 * n + 1000, size=unique + sum(pool_sizes.values()), replace=False)
    drawn = [int(d) for d in drawn]
    pools = {}
    for t in STATIC_WITHHELD:
        pools[t], drawn = drawn[:pool_sizes[t]], drawn[pool_sizes[t]:]
    seen = {t: 0 for t in STATIC_WITHHELD}
    out = []
    for t in tiers:
        if t in STATIC_WITHHELD:
            out.append(pools[t][seen[t] % len(pools[t])])
            seen[t] += 1
        else:
            out.append(drawn.pop(0))
    return out


def _static_responses(rng: np.random.Generator, N: int, rates: np.ndarray) -> np.ndarray:
    """(N,) sparse non-negative responses with many exact zeros."""
    active = rng.integers(0, 1000, size=N) < rates
    u = rng.integers(1, 1 << 20, size=N).astype(np.float64) / float(1 << 20)
    return np.where(active, u * u * u * 12.0 + u * 0.5, 0.0)


def _static_behavior(rng: np.random.Generator) -> np.ndarray:
    """(3,): pupil dilation, its derivative, running speed."""
    pupil = 10.0 + int(rng.integers(0, 301)) / 10.0
    deriv = int(rng.integers(-200, 201)) / 1000.0
    run = int(rng.integers(-40, 400)) / 16.0
    return np.array([pupil, deriv, run])


def _static_pupil_center(rng: np.random.Generator) -> np.ndarray:
    return np.array([150.0 + int(rng.integers(0, 1001)) / 10.0,
                     150.0 + int(rng.integers(0, 1001)) / 10.0])


def _image_dtype(spec) -> np.dtype:
    dt = np.dtype(spec)
    if not (dt.kind == "f" or (dt.kind == "u" and dt.itemsize == 1)):
        raise ValueError(f"--image-dtype must be uint8 or a float dtype, got {dt.str}")
    return dt


def _static_entries(kind: str, opts: dict) -> tuple[str, dict[str, bytes], dict]:
    n, N = int(opts["trials"]), int(opts["neurons"])
    H, W, C = int(opts["height"]), int(opts["width"]), CHANNELS[kind]
    if n < 1 or N < 1 or H < 1 or W < 1:
        raise ValueError("need trials, neurons, height, width >= 1")
    dtype = np.dtype(opts["dtype"])
    if dtype.kind != "f":
        raise ValueError(f"--dtype must be a float dtype, got {dtype.str}")
    image_dtype = _image_dtype(opts["image_dtype"])
    order = opts["order"]
    if order not in ("C", "F"):
        raise ValueError("--order must be C or F")
    stem = dataset_stem(kind, opts)
    rng = np.random.default_rng(int(opts["seed"]))

    ids = _trial_numbers(rng, n, bool(opts["gaps"]))
    tiers = _static_tiers(rng, n)
    withheld = [t in STATIC_WITHHELD for t in tiers]
    image_ids = _frame_image_ids(rng, tiers)
    rates = rng.integers(80, 400, size=N)
    images_by_id: dict[int, np.ndarray] = {}
    data: dict[str, list[np.ndarray]] = {v: [] for v in STATIC_VARIABLES}
    for p in range(n):
        if image_ids[p] not in images_by_id:
            images_by_id[image_ids[p]] = _image(rng, C, H, W)
        data["images"].append(images_by_id[image_ids[p]])
        resp = _static_responses(rng, N, rates)
        data["responses"].append(np.zeros(N) if withheld[p] else resp)
        data["behavior"].append(_static_behavior(rng))
        data["pupil_center"].append(_static_pupil_center(rng))

    entries: dict[str, bytes] = {}

    def put(path: str, arr: np.ndarray) -> None:
        entries[path] = _npy_bytes(arr, order)

    def image_bytes(values: np.ndarray) -> np.ndarray:
        if image_dtype.kind == "u":
            return values.astype(np.uint8)
        return _to_dtype(values, image_dtype)

    for p, i in enumerate(ids):
        put(f"data/images/{i}.npy", image_bytes(data["images"][p]))
        for var in STATIC_VARIABLES[1:]:
            put(f"data/{var}/{i}.npy", _to_dtype(data[var][p], dtype))

    # meta/trials
    put("meta/trials/tiers.npy", gen_mouse._fixed_unicode(tiers))
    frame_image_id = np.array(image_ids, dtype=np.int64)
    put("meta/trials/frame_image_id.npy", frame_image_id)
    recorded = np.sort(rng.choice(n + n // 2 + 5, size=n, replace=False))
    trial_idx = recorded[rng.permutation(n)].astype(np.int64)   # unrelated to file numbers
    put("meta/trials/trial_idx.npy", trial_idx)
    extra_trials = {}
    if opts["extra_meta"]:
        extra_trials = {
            "animal_ids": np.full(n, int(opts["animal"]), dtype=np.int64),
            "scan_idx": np.full(n, int(opts["scan"]), dtype=np.int64),
            "session": np.full(n, int(opts["session"]), dtype=np.int64),
            "frame_image_class": gen_mouse._fixed_unicode(
                [IMAGE_CLASSES[k % len(IMAGE_CLASSES)] for k in image_ids]),
        }
        for stem_, arr in extra_trials.items():
            put(f"meta/trials/{stem_}.npy", arr)

    # meta/neurons
    coords, unit_ids = _neuron_positions(rng, N)
    put("meta/neurons/cell_motor_coordinates.npy", coords)
    put("meta/neurons/unit_ids.npy", unit_ids)
    extra_neurons = {}
    if opts["extra_meta"]:
        areas = ["V1", "LM", "AL", "RL"]
        layers = ["L2/3", "L4", "L5"]
        extra_neurons = {
            "area": np.array([areas[i] for i in rng.choice(4, size=N, p=[0.7, 0.15, 0.1, 0.05])],
                             dtype="<U2"),
            "layer": np.array([layers[i] for i in rng.integers(0, 3, size=N)], dtype="<U4"),
            "animal_ids": np.full(N, int(opts["animal"]), dtype=np.int64),
            "scan_idx": np.full(N, int(opts["scan"]), dtype=np.int64),
            "sessions": np.full(N, int(opts["session"]), dtype=np.int64),
        }
        for stem_, arr in extra_neurons.items():
            put(f"meta/neurons/{stem_}.npy", arr)

    # meta/statistics: over trials, one trial's shape, float
    subsets = {"all": list(range(n))}
    if opts["extra_stats"]:
        subsets["train"] = [p for p in range(n) if tiers[p] == "train"]
    for var in STATIC_VARIABLES:
        stack = np.stack([a.astype(np.float64) for a in data[var]])
        for subset, positions in subsets.items():
            stats = _time_stats(stack[positions], True)
            for stat in STATIC_STATS:
                put(f"meta/statistics/{var}/{subset}/{stat}.npy", _to_dtype(stats[stat], dtype))

    info = {
        "kind": kind, "stem": stem, "options": opts, "trial_ids": ids, "tiers": tiers,
        "withheld": withheld, "frame_image_id": image_ids, "trial_idx": trial_idx.tolist(),
        "dtype": dtype.str, "image_dtype": image_dtype.str, "image_shape": (C, H, W),
        "extra_trials": extra_trials, "extra_neurons": extra_neurons,
    }
    return stem, entries, info


# --------------------------------------------------------------------------- lab export

def _lab_entries(opts: dict) -> tuple[str, dict[str, bytes], dict]:
    stem = dataset_stem("lab_export", opts)
    _mouse_stem, entries, info = gen_mouse.build_entries(**{k: opts[k] for k in LAB_MOUSE_KEYS})
    dtype = np.dtype(opts["dtype"])
    native = dtype.newbyteorder("=")
    nan = gen_mouse._nan_value(dtype, bool(opts["nan_payload"]))
    n, T = int(opts["trials"]), int(opts["frames"])
    # A stream of its own, so the 2023 part stays byte-identical to gen_mouse's mouse.
    rng = np.random.default_rng([int(opts["seed"]), 2022])
    eyes = []
    for p, i in enumerate(info["trial_ids"]):
        # horizontal and vertical gaze angle (degrees); NaN after the stimulus ended, over the
        # tail the video, responses (unless withheld) and pupil_center share
        eye = np.stack([_smooth(rng, T, 8) + int(rng.integers(-100, 101)) / 10.0,
                        _smooth(rng, T, 8) + int(rng.integers(-100, 101)) / 10.0])
        eye = eye.astype(native)
        eye[:, info["valid_lengths"][p]:] = nan[0]
        eyes.append(eye)
        entries[f"data/eye_position/{i}.npy"] = _npy_bytes(_to_dtype(eye, dtype), opts["order"])
    if opts["eye_stats"]:
        stack = np.stack([e.astype(np.float64) for e in eyes])
        for stat, values in _time_stats(stack, False).items():
            entries[f"meta/statistics/eye_position/all/{stat}.npy"] = _npy_bytes(
                _to_dtype(values, dtype), opts["order"])
    stimulus = [STIMULUS_TYPES[0] if L == T or L == 300 else
                STIMULUS_TYPES[1 + int(rng.integers(0, len(STIMULUS_TYPES) - 1))]
                for L in info["valid_lengths"]]
    stimulus_type = gen_mouse._fixed_unicode(stimulus)
    entries["meta/trials/stimulus_type.npy"] = _npy_bytes(stimulus_type, opts["order"])
    config = {
        "name": stem, "exported_by": "lab-export 0.3.1", "indicator": "GCaMP6s",
        "frame_rate_hz": 30.0, "trials": n, "neurons": int(opts["neurons"]), "frames": T,
        "variables": list(LAB_VARIABLES), "video_shape": [gen_mouse.HEIGHT, gen_mouse.WIDTH],
    }
    entries["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    info = dict(info, kind="lab_export", stem=stem, options=opts, stimulus_type=stimulus,
                config=config)
    return stem, entries, info


# --------------------------------------------------------------------------- build + write

def build_entries(kind: str, **options) -> tuple[str, dict[str, bytes], dict]:
    """(stem, {path relative to the dataset root: bytes}, info) for one family member."""
    opts = _options(kind, options)
    if kind == "lab_export":
        return _lab_entries(opts)
    return _static_entries(kind, opts)


def describe(kind: str, **options) -> dict:
    """What `generate(kind, ...)` produces (trial numbers, tiers, image ids, ...)."""
    return build_entries(kind, **options)[2]


def generate(kind: str, outdir, **options) -> Path:
    """Generate one member into `outdir`; return the zip file or dataset folder written."""
    stem, entries, _info = build_entries(kind, **options)
    opts = _options(kind, options)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    top = not opts["no_top_folder"]
    junk = junk_paths(kind, stem, top)
    if opts["format"] == "zip":
        files = {(f"{stem}/" if top else "") + p: b for p, b in entries.items()}
        if opts["junk"]:
            files[junk[0]] = gen_mouse.JUNK_CONTENT["macosx"]
            files[junk[1]] = gen_mouse.JUNK_CONTENT["ds_store"]
            files[junk[2]] = gen_mouse.JUNK_CONTENT["appledouble"]
        path = outdir / f"{stem}.zip"
        gen_mouse._write_zip(path, files, opts)
        return path
    if opts["format"] != "folder":
        raise ValueError("--format must be zip or folder")
    root = outdir / stem
    if root.exists():
        shutil.rmtree(root)
    files = dict(entries)
    if opts["junk"]:  # only the junk that lives inside the dataset folder
        pre = f"{stem}/" if top else ""
        files[junk[1][len(pre):]] = gen_mouse.JUNK_CONTENT["ds_store"]
        files[junk[2][len(pre):]] = gen_mouse.JUNK_CONTENT["appledouble"]
    for rel in sorted(files):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[rel])
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("outdir", type=Path, help="folder to write the zip / dataset folder into")
    ap.add_argument("--trials", type=int, default=None, help="number of trials (12)")
    ap.add_argument("--neurons", type=int, default=None, help="N (40)")
    ap.add_argument("--seed", type=int, default=None, help="(0)")
    ap.add_argument("--dtype", default=None,
                    help="float dtype of responses, behavior, pupil_center, statistics "
                         "(and videos, eye_position of a lab export): <f4, <f8, >f8, ... (<f4)")
    ap.add_argument("--order", choices=("C", "F"), default=None,
                    help="memory order of every npy with ndim >= 2 (C)")
    ap.add_argument("--gaps", action="store_true", help="trial numbers with gaps")
    ap.add_argument("--extra-meta", action="store_true",
                    help="extra per-trial and per-neuron meta files")
    ap.add_argument("--extra-stats", action="store_true",
                    help="a second statistics subset train/ (and median.npy for a lab export)")
    g = ap.add_argument_group("static2022 / color")
    g.add_argument("--height", type=int, default=None, help="image height (36; real: 144)")
    g.add_argument("--width", type=int, default=None, help="image width (64; real: 256)")
    g.add_argument("--image-dtype", default=None, help="uint8, <f4, <f8, >f8, ... (uint8)")
    g.add_argument("--animal", type=int, default=None, help="(21067)")
    g.add_argument("--session", type=int, default=None, help="(10)")
    g.add_argument("--scan", type=int, default=None, help="(18)")
    g.add_argument("--hex", default=None,
                   help="32 hex digits for the name; without it, the md5 of the content options")
    g = ap.add_argument_group("lab_export")
    g.add_argument("--frames", type=int, default=None, help="T (50)")
    g.add_argument("--name", default=None, help="folder / zip name (GCaMP6s1234_FOV1_day1)")
    g.add_argument("--nan-payload", action="store_true",
                   help="NaN tails use a non-default NaN bit pattern")
    g.add_argument("--eye-stats", action="store_true",
                   help="add meta/statistics/eye_position/all/{min,max,mean,std}.npy")
    g = ap.add_argument_group("packaging")
    g.add_argument("--format", choices=("zip", "folder"), default=None,
                   help="(zip; folder for lab_export)")
    g.add_argument("--no-top-folder", action="store_true",
                   help="zip entries at the root (data/..., meta/...) instead of <stem>/...")
    g.add_argument("--compression", choices=("deflate", "stored"), default=None,
                   help="(deflate)")
    g.add_argument("--zip64", action="store_true", help="zip64 records everywhere")
    g.add_argument("--junk", action="store_true", help="add __MACOSX/, .DS_Store and ._* entries")
    g.add_argument("--dir-entries", action="store_true",
                   help="add explicit directory entries to the zip (as `zip -r` does)")
    args = vars(ap.parse_args(argv))
    kind, outdir = args.pop("kind"), args.pop("outdir")
    allowed = defaults(kind)
    options = {}
    for key, value in args.items():
        if value is None or value is False:
            continue
        if key not in allowed:
            ap.error(f"--{key.replace('_', '-')} does not apply to {kind}")
        options[key] = value
    print(generate(kind, outdir, **options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
