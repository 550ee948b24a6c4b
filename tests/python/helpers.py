"""Test helpers: read a source mouse with plain numpy, run the binary, compare bits.

Nothing here uses the generator's internal state: expected values come from
the source bytes as numpy loads them, so the tests check the converter against
an independent reading of the input.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import zipfile
from functools import cached_property
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VARIABLES = ("videos", "responses", "behavior", "pupil_center")
DATASET_FILES = {"data.zarr", "trials.parquet", "neurons.parquet", "behavior.parquet",
                 "pupil_center.parquet", "manifest.json", "run.json", "lock.json"}
KV_KEYS = ("sensorium_ingest.version", "sensorium_ingest.dataset", "sensorium_ingest.source",
           "sensorium_ingest.pipeline",
           "sensorium_ingest.stage", "sensorium_ingest.stage_hash")
STAT_DIMS = {"videos": ["height", "width", "frame"], "responses": ["neuron", "frame"],
             "behavior": ["channel", "frame"], "pupil_center": ["channel", "frame"]}
LONG_TABLES = {"behavior": ("pupil_dilation", "running_speed"), "pupil_center": ("x", "y")}
EXIT = {"ok": 0, "usage": 2, "data": 65, "internal": 70, "exists": 73, "io": 74, "pipeline": 78}


def binary() -> Path:
    env = os.environ.get("SENSORIUM_INGEST_BIN")
    p = Path(env) if env else REPO / "target" / "release" / "sensorium-ingest"
    return p if p.is_absolute() else (REPO / p)


def run(*args, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run the binary; returns the CompletedProcess (text mode)."""
    cmd = [str(binary())] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def describe_run(proc: subprocess.CompletedProcess) -> str:
    return (f"command: {' '.join(map(str, proc.args))}\nexit code: {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")


def dataset_name(source_name: str) -> str:
    """Source stem without a trailing -<Stimulus>-<32 hex> (Video, GrayImageNet, ...)."""
    return re.sub(r"-[A-Za-z][A-Za-z0-9_]*-[0-9a-fA-F]{32}$", "", source_name)


def is_junk(path: str) -> bool:
    base = path.rsplit("/", 1)[-1]
    return path.startswith("__MACOSX/") or "/__MACOSX/" in path or base.startswith("._") \
        or base == ".DS_Store"


def stat_dims(var: str, ndim: int) -> list[str]:
    """Dimension names of a statistics array: the variable's, or dim_0.. if they don't fit."""
    names = STAT_DIMS[var]
    return names if len(names) == ndim else [f"dim_{i}" for i in range(ndim)]


def to_le(a: np.ndarray) -> np.ndarray:
    """Same bits, little-endian, C-contiguous (byte swap, never a float cast)."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def le_dtype(dt) -> np.dtype:
    dt = np.dtype(dt)
    return dt.newbyteorder("<") if dt.byteorder in (">", "=") and dt.itemsize > 1 else dt


def assert_bits_equal(actual, expected, what: str) -> None:
    """Values equal bit for bit (NaN payloads included), shape and float kind equal."""
    a, e = to_le(actual), to_le(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    if a.tobytes() != e.tobytes():
        ai = a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a
        ei = e.view(f"u{e.dtype.itemsize}") if e.dtype.kind == "f" else e
        bad = np.argwhere(ai != ei)
        first = tuple(int(i) for i in bad[0])
        raise AssertionError(f"{what}: {len(bad)} of {a.size} values differ; first at "
                             f"{first}: got {a[first]!r} expected {e[first]!r}")


def npy_strings(arr: np.ndarray) -> list[str]:
    """Fixed-width numpy strings as Python str (numpy strips the trailing NULs)."""
    if arr.dtype.kind == "S":
        return [b.decode("utf-8") for b in arr.tolist()]
    return [str(s) for s in arr.tolist()]


def column_values(arr: np.ndarray) -> list:
    """Python values a 1-D meta array should become in Parquet."""
    if arr.dtype.kind in "US":
        return npy_strings(arr)
    return arr.tolist()


def npy_descr(raw: bytes) -> str:
    """The dtype string written in an npy header (e.g. '<f4', '>f8')."""
    return np.lib.format.descr_to_dtype(_npy_header(raw)["descr"]).str


def _npy_header(raw: bytes) -> dict:
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return {"descr": dtype.str if dtype.names is None else dtype.descr, "shape": shape,
            "fortran_order": fortran}


class Source:
    """A source mouse (zip or folder) read with zipfile/pathlib + numpy only."""

    def __init__(self, path):
        self.path = Path(path)
        raw: dict[str, bytes] = {}
        if self.path.is_dir():
            self.name = self.path.name
            for p in sorted(self.path.rglob("*")):
                if p.is_file():
                    raw[p.relative_to(self.path).as_posix()] = p.read_bytes()
            prefix = ""
        else:
            self.name = self.path.name[:-4] if self.path.name.endswith(".zip") else self.path.stem
            with zipfile.ZipFile(self.path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        raw[info.filename] = zf.read(info)
            tops = {k.split("/", 1)[0] for k in raw if "/" in k and not is_junk(k)}
            prefix = f"{tops.pop()}/" if len(tops) == 1 and not any(
                k.startswith(("data/", "meta/")) for k in raw) else ""
        self.prefix = prefix
        self.raw = raw                     # archive path -> bytes (files only)
        # dataset-relative path (as the manifest should list it) -> bytes
        self.entries = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                        for k, v in raw.items()}
        self.dataset = dataset_name(self.name)

    # --- paths
    @cached_property
    def junk(self) -> list[str]:
        return sorted(p for p in self.entries if is_junk(p))

    @cached_property
    def real(self) -> list[str]:
        return sorted(p for p in self.entries if not is_junk(p))

    def load(self, rel: str) -> np.ndarray:
        return np.load(io.BytesIO(self.entries[rel]), allow_pickle=False)

    def files_under(self, folder: str) -> list[str]:
        return sorted(p for p in self.real if p.startswith(folder + "/"))

    # --- trials
    @cached_property
    def trial_ids(self) -> list[int]:
        ids = sorted(int(p.rsplit("/", 1)[-1][:-4]) for p in self.files_under("data/videos"))
        for var in VARIABLES[1:]:
            other = sorted(int(p.rsplit("/", 1)[-1][:-4]) for p in self.files_under(f"data/{var}"))
            assert other == ids, f"source has different trial sets in data/videos and data/{var}"
        return ids

    @property
    def n_trials(self) -> int:
        return len(self.trial_ids)

    def trial(self, var: str, trial_id: int) -> np.ndarray:
        return self.load(f"data/{var}/{trial_id}.npy")

    def stack(self, var: str) -> np.ndarray:
        """np.stack of data/<var>/<i>.npy in numeric trial order (source dtype kept)."""
        return np.stack([self.trial(var, i) for i in self.trial_ids])

    @cached_property
    def source_dtype(self) -> np.dtype:
        return self.trial("videos", self.trial_ids[0]).dtype

    @cached_property
    def float_dtype(self) -> np.dtype:
        """Source float kind as stored by the converter (little-endian)."""
        return le_dtype(self.source_dtype)

    @cached_property
    def shape(self) -> tuple[int, int, int]:
        """(n_trials, N, T)."""
        r = self.trial("responses", self.trial_ids[0])
        return self.n_trials, r.shape[0], r.shape[1]

    @cached_property
    def tiers(self) -> list[str]:
        return npy_strings(self.load("meta/trials/tiers.npy"))

    @cached_property
    def valid_frames(self) -> list[int]:
        """Frames before the trailing all-NaN video frames, computed with numpy."""
        out = []
        for i in self.trial_ids:
            v = self.trial("videos", i)
            all_nan = np.isnan(v).all(axis=(0, 1))
            k = len(all_nan)
            while k > 0 and all_nan[k - 1]:
                k -= 1
            out.append(k)
        return out

    @cached_property
    def withheld(self) -> list[bool]:
        return [bool((self.trial("responses", i) == 0).all()) for i in self.trial_ids]

    # The meta files the contract names, by folder; every other 1-D file is an extra column.
    NAMED_META = {"trials": {"tiers", "trial_idx"},
                  "neurons": {"unit_ids", "cell_motor_coordinates"}}

    def extra_meta(self, kind: str) -> list[str]:
        """1-D meta/<kind>/*.npy stems other than the named columns, sorted by name."""
        named = self.NAMED_META[kind]
        out = []
        for p in self.files_under(f"meta/{kind}"):
            stem = p.rsplit("/", 1)[-1][:-4]
            if stem in named or not p.endswith(".npy"):
                continue
            if self.load(p).ndim == 1:
                out.append(stem)
        return sorted(out)

    def statistics(self) -> dict[str, str]:
        """'var/subset/stat' -> source path, for every statistics npy."""
        out = {}
        for p in self.files_under("meta/statistics"):
            if p.endswith(".npy"):
                out[p[len("meta/statistics/"):-4]] = p
        return out

    # --- expected tables
    def expected_trials(self) -> dict[str, list]:
        cols: dict[str, list] = {
            "trial": list(range(self.n_trials)),
            "trial_id": list(self.trial_ids),
            "tier": self.tiers,
        }
        if "meta/trials/trial_idx.npy" in self.entries:
            cols["trial_idx"] = npy_strings(self.load("meta/trials/trial_idx.npy"))
        for stem in self.extra_meta("trials"):
            cols[stem] = column_values(self.load(f"meta/trials/{stem}.npy"))
        cols["valid_frames"] = self.valid_frames
        cols["responses_withheld"] = self.withheld
        return cols

    def expected_neurons(self) -> dict[str, list]:
        coords = self.load("meta/neurons/cell_motor_coordinates.npy")
        cols: dict[str, list] = {
            "neuron": list(range(coords.shape[0])),
            "unit_id": self.load("meta/neurons/unit_ids.npy").tolist(),
            "x": coords[:, 0].tolist(), "y": coords[:, 1].tolist(), "z": coords[:, 2].tolist(),
        }
        for stem in self.extra_meta("neurons"):
            cols[stem] = column_values(self.load(f"meta/neurons/{stem}.npy"))
        return cols

    def expected_long(self, var: str) -> dict[str, np.ndarray]:
        stack = self.stack(var)                       # (n, 2, T)
        n, _, T = stack.shape
        a, b = LONG_TABLES[var]
        return {
            "trial_id": np.repeat(np.array(self.trial_ids, dtype=np.int32), T),
            "frame": np.tile(np.arange(T, dtype=np.int32), n),
            a: to_le(stack[:, 0, :]).reshape(-1),
            b: to_le(stack[:, 1, :]).reshape(-1),
        }


def npy_arrow_type(dt: np.dtype):
    """The Arrow type a 1-D meta array of numpy dtype `dt` should become."""
    import pyarrow as pa
    if dt.kind in "US":
        return "string"
    if dt.kind == "b":
        return pa.bool_()
    return pa.from_numpy_dtype(dt.newbyteorder("="))


def is_string_type(t) -> bool:
    import pyarrow as pa
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def type_matches(actual, expected) -> bool:
    if expected == "string":
        return is_string_type(actual)
    return actual == expected


def polars_table(path: Path, expected: dict, what: str):
    """The Parquet table at `path` read with polars, checked to hold exactly the `expected`
    columns, in order, with their values; returned for further checks."""
    import polars as pl
    df = pl.read_parquet(path)
    assert df.columns == list(expected), what
    for name, values in expected.items():
        assert df[name].to_list() == list(values), f"{what}.{name}"
    return df


def tree_files(root: Path) -> dict[str, bytes]:
    """relative path -> bytes for every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (bytes, mtime_ns) for every file; dirs listed too."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = (p.read_bytes() if p.is_file() else None,
                                              st.st_mtime_ns)
    return out


def assert_same_outputs(a: Path, b: Path, ignore=("run.json",)) -> None:
    """Every file under dataset dirs a and b byte-identical, except `ignore` at the top."""
    for d in (a, b):
        assert (d / "manifest.json").is_file(), f"{d} is not a complete dataset (no manifest.json)"
    fa = {k: v for k, v in tree_files(a).items() if k not in ignore}
    fb = {k: v for k, v in tree_files(b).items() if k not in ignore}
    assert sorted(fa) == sorted(fb), (
        f"file sets differ: only in {a}: {sorted(set(fa) - set(fb))[:10]}, "
        f"only in {b}: {sorted(set(fb) - set(fa))[:10]}")
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:10]}"


def find_key(obj, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(find_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(find_key(v, key) for v in obj)
    return False


def strip_algo(h: str) -> str:
    return h.split(":", 1)[1] if isinstance(h, str) and h.startswith("blake3:") else h


def read_json(p: Path):
    return json.loads(Path(p).read_text())


# ----------------------------------------------------------------------------- FileTree family
# (Sensorium 2022 static mice, colour mice, lab exports: see gen_family.py, test_family.py)

STATIC_VARIABLES = ("images", "responses", "behavior", "pupil_center")
STATIC_TABLES = {"behavior": ("pupil_dilation", "pupil_dilation_derivative", "running_speed"),
                 "pupil_center": ("x", "y")}


def family_dataset_name(source_name: str) -> str:
    """Source stem without a trailing -<Stimulus>-<32 hex> (Video, GrayImageNet, ...)."""
    return re.sub(r"-[A-Za-z][A-Za-z0-9]*-[0-9a-fA-F]{32}$", "", source_name)


class StaticSource(Source):
    """A Sensorium 2022-style source (one image per trial, no frame axis), read with
    zipfile/pathlib + numpy only."""

    NAMED_META = {"trials": {"tiers", "frame_image_id"},
                  "neurons": {"unit_ids", "cell_motor_coordinates"}}

    def __init__(self, path):
        super().__init__(path)
        self.dataset = family_dataset_name(self.name)

    @cached_property
    def trial_ids(self) -> list[int]:
        def numbers(var):
            return sorted(int(p.rsplit("/", 1)[-1][:-4]) for p in self.files_under(f"data/{var}")
                          if p.endswith(".npy"))
        ids = numbers("images")
        for var in STATIC_VARIABLES[1:]:
            assert numbers(var) == ids, f"source has different trial sets in data/images and data/{var}"
        return ids

    @cached_property
    def source_dtype(self) -> np.dtype:
        """The images' dtype as stored in the npy (uint8 or a float, either byte order)."""
        return self.trial("images", self.trial_ids[0]).dtype

    @cached_property
    def image_dtype(self) -> np.dtype:
        return le_dtype(self.source_dtype)

    @cached_property
    def float_dtype(self) -> np.dtype:
        """The responses' float kind as stored by the converter (little-endian)."""
        return le_dtype(self.trial("responses", self.trial_ids[0]).dtype)

    @cached_property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.trial("images", self.trial_ids[0]).shape)

    @cached_property
    def shape(self) -> tuple[int, int]:
        """(n_trials, N)."""
        return self.n_trials, self.trial("responses", self.trial_ids[0]).shape[0]

    @cached_property
    def frame_image_id(self) -> list:
        return self.load("meta/trials/frame_image_id.npy").tolist()

    def expected_trials(self) -> dict[str, list]:
        cols: dict[str, list] = {
            "trial": list(range(self.n_trials)),
            "trial_id": list(self.trial_ids),
            "tier": self.tiers,
            "frame_image_id": self.frame_image_id,
        }
        for stem in self.extra_meta("trials"):
            cols[stem] = column_values(self.load(f"meta/trials/{stem}.npy"))
        cols["responses_withheld"] = self.withheld
        return cols

    def expected_table(self, var: str) -> dict[str, np.ndarray]:
        """behavior / pupil_center: one row per trial, a column per value of the (k,) array."""
        stack = to_le(self.stack(var))                      # (n, k)
        names = STATIC_TABLES[var]
        assert stack.shape[1] == len(names), f"{var}: {stack.shape[1]} values per trial"
        out = {"trial_id": np.array(self.trial_ids, dtype=np.int32)}
        for k, name in enumerate(names):
            out[name] = np.ascontiguousarray(stack[:, k])
        return out
