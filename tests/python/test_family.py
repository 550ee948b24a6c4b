"""The rest of the FileTree family (shared FORMAT.md): Sensorium 2022 static mice (grey
images), colour mice (two-channel images) and lab exports.

The generator tests need no binary. The conversion tests convert with the default
`--pipeline auto`, which must pick the embedded `sensorium2022` pipeline by content, then read
the output back with zarr-python, xarray, pyarrow, DuckDB and polars and compare every value
with the source as numpy loads it straight from the generated tree."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import gen_family
import gen_mouse
import helpers
from helpers import (DATASET_FILES, STATIC_TABLES, StaticSource, assert_bits_equal,
                     assert_same_outputs, family_dataset_name, is_junk, npy_arrow_type,
                     npy_descr, read_json, strip_algo, to_le, type_matches)

PIPELINE = "sensorium2022"
HERE = Path(__file__).resolve().parent

# Conversion variants: (kind, options). Small: 12-13 trials, 33-40 neurons, 36x64 images,
# plus one at the real image size (1, 144, 256).
VARIANTS: dict[str, tuple[str, dict]] = {
    "grey-u8-zip": ("static2022", dict(seed=101, junk=True)),
    "grey-f4-folder": ("static2022", dict(seed=102, image_dtype="<f4", format="folder",
                                          extra_meta=True)),
    "grey-f8-big-endian-fortran": ("static2022", dict(
        trials=13, neurons=33, seed=103, image_dtype=">f8", dtype=">f8", order="F", gaps=True,
        no_top_folder=True, compression="stored", dir_entries=True, extra_stats=True)),
    "grey-u8-real-size": ("static2022", dict(trials=6, neurons=20, height=144, width=256,
                                             seed=104, zip64=True)),
    "color-u8-folder": ("color", dict(seed=105, format="folder", extra_meta=True, junk=True)),
    "color-f4-zip": ("color", dict(seed=106, image_dtype="<f4", dtype="<f8", extra_stats=True,
                                   extra_meta=True)),
}


def _one_message(proc) -> str:
    err = proc.stderr.strip()
    assert err, "no message on stderr"
    assert "panicked" not in err, f"the binary panicked:\n{err}"
    return err


def ok(proc):
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert "panicked" not in proc.stderr, proc.stderr
    return proc


# ============================================================================ generator
# (no binary needed)

GEN_CASES: dict[str, tuple[str, dict]] = {
    "grey": ("static2022", dict(trials=12, neurons=40, seed=1)),
    "grey-gaps-f8-big-fortran": ("static2022", dict(trials=12, neurons=30, seed=2, gaps=True,
                                                    image_dtype=">f8", dtype=">f8", order="F",
                                                    extra_meta=True, extra_stats=True)),
    "grey-real-size": ("static2022", dict(trials=3, neurons=10, height=144, width=256, seed=3)),
    "color-f4": ("color", dict(trials=12, neurons=40, seed=4, image_dtype="<f4", junk=True,
                               dir_entries=True, zip64=True, compression="stored")),
    "lab": ("lab_export", dict(trials=12, neurons=40, frames=44, seed=5, format="zip")),
    "lab-f8-gaps": ("lab_export", dict(trials=12, neurons=30, frames=40, seed=6, dtype=">f8",
                                       order="F", gaps=True, extra_meta=True, eye_stats=True,
                                       nan_payload=True, format="zip", junk=True)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {k: gen_family.generate(kind, tmp_path_factory.mktemp(f"famgen-{k}"), **opts)
            for k, (kind, opts) in GEN_CASES.items()}


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generator_is_deterministic(tmp_path, built, case):
    kind, opts = GEN_CASES[case]
    again = gen_family.generate(kind, tmp_path, **opts)
    assert again.name == built[case].name
    assert again.read_bytes() == built[case].read_bytes()


def test_generator_seed_and_content_change_output(tmp_path):
    a = gen_family.generate("static2022", tmp_path / "a", trials=3, neurons=5, seed=1)
    b = gen_family.generate("static2022", tmp_path / "b", trials=3, neurons=5, seed=2)
    c = gen_family.generate("static2022", tmp_path / "c", trials=3, neurons=5, seed=1,
                            image_dtype="<f4")
    d = gen_family.generate("color", tmp_path / "d", trials=3, neurons=5, seed=1)
    assert len({a.name, b.name, c.name, d.name}) == 4
    assert a.read_bytes() != b.read_bytes()
    # packaging options do not change the name: zip and folder of the same content share it
    f = gen_family.generate("static2022", tmp_path / "f", trials=3, neurons=5, seed=1,
                            format="folder", junk=True, compression="stored")
    assert f.name == a.name[:-4]


@pytest.mark.parametrize("case", [c for c in GEN_CASES if GEN_CASES[c][0] != "lab_export"])
def test_static_tree_follows_the_format(built, case):
    kind, opts = GEN_CASES[case]
    src = StaticSource(built[case])
    n, N = src.shape
    C, H, W = gen_family.CHANNELS[kind], opts.get("height", 36), opts.get("width", 64)
    stim = {"static2022": "GrayImageNet", "color": "ColorImageNet"}[kind]
    assert src.name.startswith("static21067-10-18-" + stim + "-") and len(src.name.split("-")[-1]) == 32
    assert src.dataset == "static21067-10-18"
    assert (n, N) == (opts["trials"], opts["neurons"])
    info = gen_family.describe(kind, **opts)
    assert src.trial_ids == info["trial_ids"]
    assert (src.trial_ids != list(range(n))) == bool(opts.get("gaps"))
    idt = np.dtype(opts.get("image_dtype", "uint8"))
    fdt = np.dtype(opts.get("dtype", "<f4"))
    tiers = src.tiers
    assert set(tiers) <= set(gen_family.STATIC_TIERS) and "train" in tiers
    if n >= 8:      # every tier, and test images that repeat
        assert {"test", "final_test", "validation"} <= set(tiers)
    for pos, i in enumerate(src.trial_ids):
        img, r = src.trial("images", i), src.trial("responses", i)
        b, pc = src.trial("behavior", i), src.trial("pupil_center", i)
        assert img.shape == (C, H, W) and r.shape == (N,) and b.shape == (3,) and pc.shape == (2,)
        assert img.dtype.str == idt.str
        assert r.dtype.str == b.dtype.str == pc.dtype.str == fdt.str
        if opts.get("order") == "F":
            assert img.flags.f_contiguous and not img.flags.c_contiguous
        v = img.astype(np.float64)
        assert (v == np.round(v)).all() and v.min() >= 0 and v.max() <= 255 and v.std() > 5
        assert not np.isnan(r).any() and not np.isnan(b).any() and not np.isnan(pc).any()
        if tiers[pos] in gen_family.STATIC_WITHHELD:
            assert (r == 0).all() and src.withheld[pos]
        else:
            assert (r >= 0).all() and 0.05 < (r == 0).mean() < 0.99 and not src.withheld[pos]
        assert 10 <= b[0] <= 40 and 150 <= pc.min() and pc.max() <= 250
    if C == 2:
        img = src.trial("images", src.trial_ids[0])
        assert not (img[0] == img[1]).all(), "UV and green channels should differ"
    # test images repeat, with the same image each time; train/validation images do not
    fid = src.load("meta/trials/frame_image_id.npy")
    assert fid.dtype.kind == "i" and fid.shape == (n,)
    by_id: dict[int, list[int]] = {}
    for pos, i in enumerate(fid.tolist()):
        by_id.setdefault(i, []).append(pos)
    assert any(len(p) > 1 for p in by_id.values()) or n < 8, "no repeated image"
    for positions in by_id.values():
        if len(positions) > 1:
            assert {tiers[p] for p in positions} <= set(gen_family.STATIC_WITHHELD)
            first = src.trial("images", src.trial_ids[positions[0]])
            for p in positions[1:]:
                assert src.trial("images", src.trial_ids[p]).tobytes() == first.tobytes()
    ti = src.load("meta/trials/trial_idx.npy")
    assert ti.dtype.kind == "i" and ti.shape == (n,) and len(set(ti.tolist())) == n
    tr = src.load("meta/trials/tiers.npy")
    assert tr.dtype.kind == "U" and tr.shape == (n,)
    coords = src.load("meta/neurons/cell_motor_coordinates.npy")
    assert coords.shape == (N, 3) and coords.dtype == np.int64
    uid = src.load("meta/neurons/unit_ids.npy")
    assert uid.dtype == np.int64 and (np.diff(uid) > 0).all() and (np.diff(uid) > 1).any()
    subsets = ["all"] + (["train"] if opts.get("extra_stats") else [])
    for var, shape in (("images", (C, H, W)), ("responses", (N,)), ("behavior", (3,)),
                       ("pupil_center", (2,))):
        for subset in subsets:
            for stat in gen_family.STATIC_STATS:
                s = src.load(f"meta/statistics/{var}/{subset}/{stat}.npy")
                assert s.shape == shape and s.dtype.str == fdt.str, (var, subset, stat)
        mean = src.load(f"meta/statistics/{var}/all/mean.npy").astype(np.float64)
        np.testing.assert_allclose(mean, src.stack(var).astype(np.float64).mean(axis=0),
                                   rtol=1e-6)
    assert len(src.statistics()) == 4 * 5 * len(subsets)
    if opts.get("extra_meta"):
        assert src.extra_meta("trials") == ["animal_ids", "frame_image_class", "scan_idx",
                                            "session", "trial_idx"]
        assert src.extra_meta("neurons") == ["animal_ids", "area", "layer", "scan_idx",
                                             "sessions"]
        assert src.load("meta/neurons/area.npy").dtype.kind == "U"
    else:
        assert src.extra_meta("trials") == ["trial_idx"] and src.extra_meta("neurons") == []


@pytest.mark.parametrize("case", ["lab", "lab-f8-gaps"])
def test_lab_export_tree(built, case):
    kind, opts = GEN_CASES[case]
    path = built[case]
    assert path.name == "GCaMP6s1234_FOV1_day1.zip"
    src = helpers.Source(path)
    assert src.dataset == family_dataset_name(src.name) == "GCaMP6s1234_FOV1_day1"
    n, N, T = src.shape
    assert (n, N, T) == (opts["trials"], opts["neurons"], opts["frames"])
    dt = np.dtype(opts.get("dtype", "<f4"))
    # the 2023 part is exactly gen_mouse's mouse
    mouse_opts = {k: opts[k] for k in gen_family.LAB_MOUSE_KEYS if k in opts}
    _, mouse_entries, _ = gen_mouse.build_entries(**mouse_opts)
    extras = {p for p in src.real if p not in mouse_entries}
    for p, raw in mouse_entries.items():
        assert src.entries[p] == raw, p
    eye = {f"data/eye_position/{i}.npy" for i in src.trial_ids}
    want = eye | {"meta/trials/stimulus_type.npy", "config.json"}
    if opts.get("eye_stats"):
        want |= {f"meta/statistics/eye_position/all/{s}.npy" for s in ("min", "max", "mean", "std")}
    assert extras == want
    for pos, i in enumerate(src.trial_ids):
        e = src.trial("eye_position", i)
        assert e.shape == (2, T) and e.dtype.str == dt.str
        L = src.valid_frames[pos]
        assert not np.isnan(e[:, :L]).any() and np.isnan(e[:, L:]).all()
        pc = src.trial("pupil_center", i)
        assert (np.isnan(pc) == np.isnan(e)).all(), "eye_position's NaN tail is pupil_center's"
        if not src.withheld[pos]:
            r = src.trial("responses", i)
            assert (np.isnan(r).any(axis=0) == np.isnan(e).any(axis=0)).all()
    assert src.withheld.count(True) > 0 and min(src.valid_frames) < T
    st = src.load("meta/trials/stimulus_type.npy")
    assert st.dtype.kind == "U" and st.shape == (n,)
    assert set(st.tolist()) <= set(gen_family.STIMULUS_TYPES)
    config = json.loads(src.entries["config.json"])
    assert config["name"] == "GCaMP6s1234_FOV1_day1" and config["trials"] == n
    assert "eye_position" in config["variables"]
    if opts.get("junk"):
        assert src.junk and all(is_junk(p) for p in src.junk)


def test_lab_export_folder(tmp_path):
    f = gen_family.generate("lab_export", tmp_path, trials=5, neurons=6, frames=20, seed=3,
                            name="Thy1GC1_FOV2_day3")
    assert f.is_dir() and f.name == "Thy1GC1_FOV2_day3"
    assert (f / "config.json").is_file() and (f / "data" / "eye_position" / "4.npy").is_file()
    z = gen_family.generate("lab_export", tmp_path / "z", trials=5, neurons=6, frames=20, seed=3,
                            name="Thy1GC1_FOV2_day3", format="zip")
    assert helpers.Source(z).entries == helpers.Source(f).entries


@pytest.mark.parametrize("case", ["grey", "color-f4", "lab-f8-gaps"])
def test_zip_layout(built, case):
    kind, opts = GEN_CASES[case]
    with zipfile.ZipFile(built[case]) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names), "entries are written in sorted (lexicographic) order"
    assert all(i.date_time == gen_mouse.ZIP_DATE for i in infos)
    stem = built[case].name[:-4]
    assert all(nm.startswith((stem + "/", "__MACOSX/")) for nm in names)
    want = zipfile.ZIP_STORED if opts.get("compression") == "stored" else zipfile.ZIP_DEFLATED
    assert all(i.compress_type == want for i in infos if not i.is_dir())
    if opts.get("dir_entries"):
        assert f"{stem}/data/images/" in names
    if opts.get("junk"):
        assert set(gen_family.junk_paths(kind, stem, True)) <= set(names)
    if opts.get("zip64"):
        raw = built[case].read_bytes()
        assert b"PK\x06\x06" in raw[-200:] and b"PK\x06\x07" in raw[-200:], "zip64 end record"
    var = "videos" if kind == "lab_export" else "images"
    numbers = [int(nm.rsplit("/", 1)[1][:-4]) for nm in names
               if f"/data/{var}/" in nm and nm.endswith(".npy") and not is_junk(nm)]
    assert numbers != sorted(numbers), "archive order must be lexicographic, not numeric"


def test_no_top_folder_and_folder_have_the_same_entries(tmp_path):
    opts = dict(trials=4, neurons=5, seed=9, junk=True, image_dtype="<f8")
    z = gen_family.generate("color", tmp_path / "z", no_top_folder=True, **opts)
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert all(nm.startswith(("data/", "meta/", "__MACOSX/data/", ".DS_Store")) for nm in names)
        f = gen_family.generate("color", tmp_path / "f", format="folder", **opts)
        assert f.is_dir() and f.name == z.name[:-4]
        assert (f / ".DS_Store").is_file() and (f / "data" / "responses" / "._1.npy").is_file()
        for rel in ("data/images/1.npy", "meta/trials/tiers.npy", "meta/statistics/images/all/std.npy"):
            assert (f / rel).read_bytes() == zf.read(rel)
    assert {k: v for k, v in StaticSource(z).entries.items() if not k.startswith("__MACOSX/")} \
        == StaticSource(f).entries


def test_uint8_images_are_uint8_npy(built):
    src = StaticSource(built["grey"])
    raw = src.entries[f"data/images/{src.trial_ids[0]}.npy"]
    assert npy_descr(raw) == "|u1"
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (1, 36, 64)


@pytest.mark.parametrize("argv,name", [
    (["static2022", "--trials", "3", "--neurons", "4", "--format", "folder"], "static21067-10-18-GrayImageNet-"),
    (["color", "--trials", "3", "--neurons", "4", "--image-dtype", "<f4", "--junk"], "static21067-10-18-ColorImageNet-"),
    (["lab_export", "--trials", "3", "--neurons", "4", "--frames", "12", "--format", "zip"], "GCaMP6s1234_FOV1_day1.zip"),
])
def test_cli(tmp_path, argv, name):
    proc = subprocess.run([sys.executable, str(HERE / "gen_family.py"), argv[0], str(tmp_path),
                           *argv[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip())
    assert out.exists() and out.name.startswith(name)
    bad = subprocess.run([sys.executable, str(HERE / "gen_family.py"), "color", str(tmp_path),
                          "--frames", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not apply" in bad.stderr


# ============================================================================ conversions

class Converted:
    def __init__(self, variant, src_path, store, proc):
        self.variant = variant
        self.kind, self.options = VARIANTS[variant]
        self.source_path = src_path
        self.source = StaticSource(src_path)
        self.store = store
        self.dataset_dir = store / self.source.dataset
        self.proc = proc


@pytest.fixture(scope="module")
def converted(ingest_bin, family, tmp_path_factory):
    """converted(variant) -> Converted; each variant generated and converted once."""
    cache: dict[str, object] = {}

    def get(variant: str) -> Converted:
        if variant not in cache:
            kind, options = VARIANTS[variant]
            src = family(f"conv-{variant}", kind, **options)
            store = tmp_path_factory.mktemp(f"famstore-{variant}")
            proc = helpers.run("convert", src, "--out", store)
            name = StaticSource(src).dataset
            if proc.returncode != 0:
                cache[variant] = f"conversion of {variant!r} failed\n" + helpers.describe_run(proc)
            elif not (store / name / "manifest.json").is_file():
                cache[variant] = (f"conversion of {variant!r} exited 0 but wrote no "
                                  f"{store / name}/manifest.json\n" + helpers.describe_run(proc))
            else:
                cache[variant] = Converted(variant, src, store, proc)
        got = cache[variant]
        if isinstance(got, str):
            pytest.fail(got, pytrace=False)
        return got

    return get


conversion = pytest.mark.parametrize("variant", list(VARIANTS))


def _group(c):
    import zarr
    return zarr.open_group(str(c.dataset_dir / "data.zarr"), mode="r")


@conversion
def test_layout_and_manifest(converted, variant):
    import blake3
    c = converted(variant)
    src = c.source
    n, N = src.shape
    assert src.dataset == "static21067-10-18"
    assert sorted(p.name for p in c.store.iterdir()) == sorted([src.dataset, "catalog"])
    names = {p.name for p in c.dataset_dir.iterdir()}
    assert names == DATASET_FILES, f"unexpected dataset contents: {sorted(names ^ DATASET_FILES)}"
    m = read_json(c.dataset_dir / "manifest.json")
    assert m["dataset"] == src.dataset
    assert m["source"]["name"] == src.name
    assert m["pipeline"]["name"] == PIPELINE, "--pipeline auto did not pick sensorium2022"
    assert m["source"]["entries"] == len(src.entries)
    dims = m.get("dimensions", {})
    for dim, size in (("trial", n), ("neuron", N)):
        assert dims.get(dim, size) == size, (dim, dims)
    paths = [e["path"] for e in m["entries"]]
    assert paths == sorted(set(paths)) and set(paths) == set(src.entries)
    for e in m["entries"]:
        p = e["path"]
        if p in src.junk:
            assert e["status"] == "skipped" and e.get("reason"), e
            continue
        assert e["status"] == "converted", e
        assert strip_algo(e["blake3"]) == blake3.blake3(src.entries[p]).hexdigest(), p
        if p.startswith("data/"):
            arr = src.load(p)
            assert e["stage"] == p.split("/")[1] and e["dtype"] == arr.dtype.str, e
            assert e["shape"] == list(arr.shape), e
    if c.options.get("junk"):
        assert src.junk


@conversion
def test_zarr_images(converted, variant):
    c = converted(variant)
    src = c.source
    n = src.n_trials
    C, H, W = src.image_shape
    arr = _group(c)["images"]
    assert arr.shape == (n, C, H, W)
    assert list(arr.metadata.dimension_names) == ["trial", "channel", "height", "width"]
    assert np.dtype(arr.dtype) == src.image_dtype, f"{arr.dtype} != {src.image_dtype}"
    expected = src.stack("images")
    assert_bits_equal(arr[...], expected, "data.zarr/images")
    le = to_le(expected)
    k = n // 2
    assert_bits_equal(arr[k], le[k], f"images[{k}]")
    assert_bits_equal(arr[:, -1, 3:H - 2, ::3], le[:, -1, 3:H - 2, ::3], "images[:, -1, 3:-2, ::3]")
    meta = json.loads((c.dataset_dir / "data.zarr" / "images" / "zarr.json").read_text())
    assert meta["data_type"] == src.image_dtype.name
    assert "frame" not in meta["dimension_names"]


@conversion
def test_zarr_responses(converted, variant):
    c = converted(variant)
    src = c.source
    n, N = src.shape
    arr = _group(c)["responses"]
    assert arr.shape == (n, N)
    assert list(arr.metadata.dimension_names) == ["trial", "neuron"]
    assert np.dtype(arr.dtype) == src.float_dtype
    expected = src.stack("responses")
    assert_bits_equal(arr[...], expected, "data.zarr/responses")
    le = to_le(expected)
    for j in (0, N // 2, N - 1):
        assert_bits_equal(arr[:, j], le[:, j], f"responses[:, {j}]")
    withheld = np.array(src.withheld)
    assert (arr[...][withheld] == 0).all() and withheld.any()


@conversion
def test_zarr_statistics(converted, variant):
    import zarr
    c = converted(variant)
    g = _group(c)
    stats = c.source.statistics()
    assert stats
    for key, path in stats.items():
        arr = g[f"statistics/{key}"]
        expected = c.source.load(path)
        assert arr.shape == expected.shape, key
        assert np.dtype(arr.dtype) == np.dtype(npy_descr(c.source.entries[path])).newbyteorder("<"), key
        assert_bits_equal(arr[...], expected, f"statistics/{key}")
        assert len(arr.metadata.dimension_names) == expected.ndim, key
    written = set()
    for var, vg in g["statistics"].groups():
        for subset, sub in vg.groups():
            for stat, a in sub.arrays():
                assert isinstance(a, zarr.Array)
                written.add(f"{var}/{subset}/{stat}")
    assert written == set(stats)
    assert {k.split("/")[0] for k in written} == set(helpers.STATIC_VARIABLES)


@conversion
def test_zarr_root_attributes(converted, variant):
    c = converted(variant)
    attrs = dict(_group(c).attrs)
    assert attrs.get("source") == c.source.name
    assert attrs.get("dataset") == c.source.dataset
    assert attrs.get("pipeline") == PIPELINE


@conversion
def test_xarray(converted, variant):
    import xarray as xr
    c = converted(variant)
    src = c.source
    n, N = src.shape
    C, H, W = src.image_shape
    ds = xr.open_zarr(str(c.dataset_dir / "data.zarr"), consolidated=False)
    try:
        assert ds["images"].dims == ("trial", "channel", "height", "width")
        assert ds["responses"].dims == ("trial", "neuron")
        assert dict(ds.sizes) == {"trial": n, "channel": C, "height": H, "width": W, "neuron": N}
        for var in ("images", "responses"):
            got = ds[var].values
            assert_bits_equal(got, src.stack(var), f"xarray {var}")
        sel = ds["images"].isel(channel=C - 1, height=H // 2).values
        assert_bits_equal(sel, to_le(src.stack("images"))[:, C - 1, H // 2, :], "xarray images.isel")
        j = N // 3
        assert_bits_equal(ds["responses"].isel(neuron=j).values,
                          to_le(src.stack("responses"))[:, j], "xarray responses.isel")
    finally:
        ds.close()


def _read(c, table):
    import pyarrow.parquet as pq
    return pq.read_table(c.dataset_dir / f"{table}.parquet")


@conversion
def test_trials_table(converted, variant):
    import pyarrow as pa
    c = converted(variant)
    src = c.source
    expected = src.expected_trials()
    t = _read(c, "trials")
    assert t.column_names == list(expected), f"trials columns {t.column_names}"
    types = {"trial": pa.int32(), "trial_id": pa.int32(), "tier": "string",
             "frame_image_id": npy_arrow_type(src.load("meta/trials/frame_image_id.npy").dtype),
             "responses_withheld": pa.bool_()}
    for stem in src.extra_meta("trials"):
        types[stem] = npy_arrow_type(src.load(f"meta/trials/{stem}.npy").dtype)
    for name, want in types.items():
        got = t.schema.field(name).type
        assert type_matches(got, want), f"trials.{name}: type {got}, expected {want}"
    for name, values in expected.items():
        col = t.column(name)
        assert col.null_count == 0, f"trials.{name} has nulls"
        assert col.to_pylist() == list(values), f"trials.{name} values differ"
    assert any(expected["responses_withheld"]) and not all(expected["responses_withheld"])


@conversion
def test_neurons_table(converted, variant):
    import pyarrow as pa
    c = converted(variant)
    src = c.source
    expected = src.expected_neurons()
    t = _read(c, "neurons")
    assert t.column_names == list(expected), f"neurons columns {t.column_names}"
    coords_t = npy_arrow_type(src.load("meta/neurons/cell_motor_coordinates.npy").dtype)
    types = {"neuron": pa.int32(),
             "unit_id": npy_arrow_type(src.load("meta/neurons/unit_ids.npy").dtype),
             "x": coords_t, "y": coords_t, "z": coords_t}
    for stem in src.extra_meta("neurons"):
        types[stem] = npy_arrow_type(src.load(f"meta/neurons/{stem}.npy").dtype)
    for name, want in types.items():
        got = t.schema.field(name).type
        assert type_matches(got, want), f"neurons.{name}: type {got}, expected {want}"
    for name, values in expected.items():
        assert t.column(name).null_count == 0
        assert t.column(name).to_pylist() == list(values), f"neurons.{name} values differ"


@conversion
@pytest.mark.parametrize("table", list(STATIC_TABLES))
def test_per_trial_table(converted, variant, table):
    import pyarrow as pa
    c = converted(variant)
    src = c.source
    expected = src.expected_table(table)
    t = _read(c, table)
    assert t.column_names == list(expected), f"{table} columns {t.column_names}"
    assert t.num_rows == src.n_trials
    assert t.schema.field("trial_id").type == pa.int32()
    float_t = pa.from_numpy_dtype(src.float_dtype.newbyteorder("="))
    for name, want in expected.items():
        col = t.column(name)
        assert col.null_count == 0, f"{table}.{name} has nulls"
        if name != "trial_id":
            assert t.schema.field(name).type == float_t, f"{table}.{name}: {t.schema.field(name).type}"
        assert_bits_equal(col.to_numpy(), want, f"{table}.parquet:{name}")


@conversion
def test_parquet_metadata(converted, variant):
    import pyarrow.parquet as pq
    c = converted(variant)
    for table in ("trials", "neurons", "behavior", "pupil_center"):
        md = pq.ParquetFile(c.dataset_dir / f"{table}.parquet").metadata
        kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
        assert kv.get("sensorium_ingest.pipeline") == PIPELINE, (table, kv)
        assert kv.get("sensorium_ingest.dataset") == c.source.dataset, table
        assert kv.get("sensorium_ingest.source") == c.source.name, table
        assert kv.get("sensorium_ingest.stage") == table, table


@conversion
def test_duckdb(converted, variant):
    import duckdb
    c = converted(variant)
    src = c.source
    n, N = src.shape
    files = {t: str(c.dataset_dir / f"{t}.parquet")
             for t in ("trials", "neurons", "behavior", "pupil_center")}
    con = duckdb.connect()
    try:
        def q(sql, *params):
            return con.execute(sql, list(params)).fetchall()

        for t, rows in (("trials", n), ("neurons", N), ("behavior", n), ("pupil_center", n)):
            assert q("SELECT count(*) FROM read_parquet(?)", files[t]) == [(rows,)], t
        assert dict(q("SELECT tier, count(*) FROM read_parquet(?) GROUP BY tier", files["trials"])) \
            == dict(Counter(src.tiers))
        rows = q("SELECT trial, trial_id, tier, frame_image_id, responses_withheld "
                 "FROM read_parquet(?)", files["trials"])
        assert rows == list(zip(range(n), src.trial_ids, src.tiers, src.frame_image_id,
                                src.withheld))
        # repeated images: found with frame_image_id, as analyses do
        reps = q("SELECT frame_image_id, count(*) FROM read_parquet(?) GROUP BY 1 "
                 "HAVING count(*) > 1 ORDER BY 1", files["trials"])
        want = sorted((k, v) for k, v in Counter(src.frame_image_id).items() if v > 1)
        assert reps == want and reps
        rows = q("SELECT unit_id, x, y, z FROM read_parquet(?) ORDER BY neuron", files["neurons"])
        e = src.expected_neurons()
        assert rows == list(zip(e["unit_id"], e["x"], e["y"], e["z"]))
        for table, cols in STATIC_TABLES.items():
            res = con.execute(f"SELECT trial_id, {', '.join(cols)} FROM read_parquet(?)",
                              [files[table]]).fetchnumpy()
            exp = src.expected_table(table)
            for name in ("trial_id",) + cols:
                assert_bits_equal(np.asarray(res[name]), exp[name], f"duckdb {table}.{name}")
        # join per-trial behaviour with tiers: mean running speed per tier, SQL vs numpy
        rows = q("SELECT t.tier, avg(b.running_speed) FROM read_parquet(?) b "
                 "JOIN read_parquet(?) t USING (trial_id) GROUP BY t.tier ORDER BY t.tier",
                 files["behavior"], files["trials"])
        run = src.stack("behavior")[:, 2].astype(np.float64)
        tiers = np.array(src.tiers)
        want = [(t, float(run[tiers == t].mean())) for t in sorted(set(src.tiers))]
        assert [r[0] for r in rows] == [w[0] for w in want]
        np.testing.assert_allclose([r[1] for r in rows], [w[1] for w in want], rtol=1e-12)
    finally:
        con.close()


@conversion
def test_polars(converted, variant):
    import polars as pl
    c = converted(variant)
    src = c.source
    d = c.dataset_dir
    trials = helpers.polars_table(d / "trials.parquet", src.expected_trials(), "trials")
    assert trials.schema["trial"] == pl.Int32 and trials.schema["trial_id"] == pl.Int32
    assert trials.schema["tier"] in (pl.String, pl.Categorical)
    assert trials.schema["responses_withheld"] == pl.Boolean
    helpers.polars_table(d / "neurons.parquet", src.expected_neurons(), "neurons")
    float_pl = pl.Float32 if src.float_dtype.itemsize == 4 else pl.Float64
    for table in STATIC_TABLES:
        df = pl.read_parquet(d / f"{table}.parquet")
        exp = src.expected_table(table)
        assert df.columns == list(exp)
        assert df.schema["trial_id"] == pl.Int32
        for name, values in exp.items():
            if name != "trial_id":
                assert df.schema[name] == float_pl
            assert_bits_equal(df[name].to_numpy(), values, f"polars {table}.{name}")
    # a per-tier selection joined on trial_id
    test_ids = [i for i, t in zip(src.trial_ids, src.tiers) if t == "test"]
    joined = pl.read_parquet(d / "pupil_center.parquet").join(trials, on="trial_id") \
        .filter(pl.col("tier") == "test")
    assert sorted(joined["trial_id"].to_list()) == sorted(test_ids)


@conversion
def test_verify(converted, variant):
    c = converted(variant)
    ok(helpers.run("verify", c.dataset_dir))
    ok(helpers.run("verify", c.dataset_dir, "--against", c.source_path))


@pytest.mark.parametrize("variant", ["grey-u8-zip", "color-u8-folder"])
def test_plan_and_inspect_name_the_pipeline(ingest_bin, family, tmp_path, variant):
    kind, options = VARIANTS[variant]
    src = family(f"conv-{variant}", kind, **options)
    plan = ok(helpers.run("plan", src, "--out", tmp_path / "store"))
    assert PIPELINE in plan.stdout, plan.stdout
    assert not (tmp_path / "store" / StaticSource(src).dataset).exists(), "plan wrote a dataset"
    inspect = ok(helpers.run("inspect", src))
    assert PIPELINE in inspect.stdout, inspect.stdout
    as_json = ok(helpers.run("inspect", src, "--json"))
    assert PIPELINE in as_json.stdout
    json.loads(as_json.stdout)


# ---------------------------------------------------------------------------- shards

# More trials than two blocks (the sensorium2022 pipeline's shards hold 64 images and 256
# responses, so a part is a whole block of 256 trials): each of the three tasks gets trials.
SHARDED = {
    "grey-u8": ("static2022", dict(trials=600, neurons=12, height=9, width=16, seed=111,
                                   gaps=True, extra_meta=True, junk=True)),
    "color-f8-big-endian": ("color", dict(trials=530, neurons=10, height=9, width=16, seed=112,
                                          image_dtype=">f8", dtype=">f8", order="F",
                                          format="folder", extra_stats=True)),
}


@pytest.mark.parametrize("case", list(SHARDED))
def test_shards_then_finalize_equal_a_single_convert(ingest_bin, family, tmp_path, case):
    kind, options = SHARDED[case]
    src = family(f"sharded-{case}", kind, **options)
    name = StaticSource(src).dataset
    single = tmp_path / "single"
    ok(helpers.run("convert", src, "--out", single))
    store = tmp_path / "sharded"
    count = 3
    for k in reversed(range(count)):          # out of order: the result must not care
        out = ok(helpers.run("convert", src, "--out", store, "--shard", f"{k}/{count}")).stdout
        assert f"shard {k}/{count}" in out, out
        assert "no trials in this part" not in out, f"task {k}/{count} got no trials:\n{out}"
    assert not (store / name).exists(), "a shard task published the dataset"
    receipts = sorted((store / f".{name}.shards" / "receipts").iterdir())
    ranges = [json.loads(r.read_text())["trials"] for r in receipts]
    assert len(ranges) == count and ranges[0]["start"] == 0
    assert ranges[-1]["end"] == options["trials"]
    assert all(a["end"] == b["start"] for a, b in zip(ranges, ranges[1:]))
    ok(helpers.run("finalize", store / name))
    assert sorted(p.name for p in store.iterdir()) == ["catalog", name]
    assert_same_outputs(store / name, single / name)
    assert read_json(store / name / "manifest.json")["pipeline"]["name"] == PIPELINE
    ok(helpers.run("verify", store / name, "--against", src))


# ---------------------------------------------------------------------------- ingest

def test_ingest_converts_a_2023_and_a_2022_mouse(ingest_bin, mouse, family, tmp_path):
    """One inbox, three kinds: `--pipeline auto` picks per source, by content."""
    import pyarrow.dataset as pads
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    dynamic = mouse("family-ingest-2023", trials=11, neurons=22, frames=33, seed=121)
    grey = family("ingest-2022", "static2022", trials=11, neurons=25, seed=122)
    colour = family("ingest-color", "color", trials=9, neurons=15, seed=123, animal=22846,
                    format="folder")
    shutil.copy(dynamic, inbox / dynamic.name)
    shutil.copy(grey, inbox / grey.name)
    shutil.copytree(colour, inbox / colour.name)
    proc = helpers.run("ingest", inbox, "--out", store, "--min-age", "0", "--settle", "0")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert "3 added" in proc.stdout, proc.stdout
    want = {helpers.Source(dynamic).dataset: "sensorium2023",
            StaticSource(grey).dataset: PIPELINE,
            StaticSource(colour).dataset: PIPELINE}
    assert len(want) == 3
    datasets = sorted(p.name for p in store.iterdir()
                      if not p.name.startswith(".") and p.name != "catalog")
    assert datasets == sorted(want)
    for d, pipeline in want.items():
        m = read_json(store / d / "manifest.json")
        assert m["pipeline"]["name"] == pipeline, (d, m["pipeline"]["name"])
        ok(helpers.run("verify", store / d))
    rows = pads.dataset(store / "catalog", format="parquet").to_table().to_pylist()
    assert {r["dataset"]: r["pipeline"] for r in rows} == want
    # the grey mouse's images, read back from the ingested store, are the source's
    import zarr
    images = zarr.open_group(str(store / StaticSource(grey).dataset / "data.zarr"), mode="r")["images"]
    assert_bits_equal(images[...], StaticSource(grey).stack("images"), "ingested images")
    again = helpers.run("ingest", inbox, "--out", store, "--min-age", "0", "--settle", "0")
    assert again.returncode == 0 and "0 added" in again.stdout, helpers.describe_run(again)


# ---------------------------------------------------------------------------- lab export

@pytest.mark.parametrize("fmt", ["folder", "zip"])
@pytest.mark.parametrize("explicit", [False, True], ids=["default", "explicit-auto"])
def test_lab_export_under_auto_asks_for_a_pipeline_file(ingest_bin, family, tmp_path, fmt,
                                                        explicit):
    src = family(f"lab-{fmt}", "lab_export", trials=12, neurons=30, frames=40, seed=131,
                 format=fmt)
    store = tmp_path / "store"
    extra = ["--pipeline", "auto"] if explicit else []
    proc = helpers.run("convert", src, "--out", store, *extra)
    assert proc.returncode != 0, helpers.describe_run(proc)
    err = _one_message(proc)
    for needle in ("sensorium2023", "sensorium2022", "--pipeline"):
        assert needle in err, f"{needle!r} missing from the error:\n{err}"
    assert "FILE" in err or "file" in err, f"the error does not say how to pass a file:\n{err}"
    assert not (store / "GCaMP6s1234_FOV1_day1" / "manifest.json").exists()
    if store.exists():
        assert not [p for p in store.rglob("manifest.json")], "a failed run published a dataset"
