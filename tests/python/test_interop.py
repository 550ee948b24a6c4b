"""Convert every variant of the source format, then read the output back with the
tools people use (zarr-python 3, xarray, pyarrow, DuckDB, polars) and compare every
value with the source as numpy loads it."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import VARIANTS
from helpers import (DATASET_FILES, KV_KEYS, LONG_TABLES, assert_bits_equal, polars_table,
                     stat_dims, is_string_type, npy_arrow_type, npy_descr, read_json,
                     strip_algo, to_le, type_matches)

pytestmark = pytest.mark.parametrize("variant", list(VARIANTS))

ARRAY_DIMS = {"videos": ["trial", "height", "width", "frame"],
              "responses": ["trial", "neuron", "frame"]}


# ----------------------------------------------------------------------------- layout

def test_layout(convert, variant):
    c = convert(variant)
    assert sorted(p.name for p in c.store.iterdir()) == sorted([c.source.dataset, "catalog"]), \
        f"store should hold exactly the dataset folder, has {sorted(p.name for p in c.store.iterdir())}"
    names = {p.name for p in c.dataset_dir.iterdir()}
    assert names == DATASET_FILES, f"unexpected dataset contents: {sorted(names ^ DATASET_FILES)}"
    assert (c.dataset_dir / "data.zarr").is_dir()
    run_record = read_json(c.dataset_dir / "run.json")
    assert isinstance(run_record, dict) and run_record


# ----------------------------------------------------------------------------- zarr

def _zarr_group(c):
    import zarr
    return zarr.open_group(str(c.dataset_dir / "data.zarr"), mode="r")


@pytest.mark.parametrize("var", ["videos", "responses"])
def test_zarr_data_arrays(convert, variant, var):
    c = convert(variant)
    src = c.source
    n, N, T = src.shape
    g = _zarr_group(c)
    arr = g[var]
    expected = src.stack(var)
    want_shape = (n, 36, 64, T) if var == "videos" else (n, N, T)
    assert arr.shape == want_shape
    assert np.dtype(arr.dtype) == src.float_dtype, f"{var}: {arr.dtype} != {src.float_dtype}"
    assert list(arr.metadata.dimension_names) == ARRAY_DIMS[var]
    assert_bits_equal(arr[...], expected, f"data.zarr/{var}")
    # typical partial reads: one neuron / one trial / a window of frames
    le = to_le(expected)
    if var == "responses":
        for j in (0, N // 2, N - 1):
            assert_bits_equal(arr[:, j, :], le[:, j, :], f"responses[:, {j}, :]")
    k = n // 2
    assert_bits_equal(arr[k], le[k], f"{var}[{k}]")
    assert_bits_equal(arr[..., 5:T - 3], le[..., 5:T - 3], f"{var}[..., 5:T-3]")
    assert np.isnan(arr.fill_value)

    attrs = dict(arr.attrs)
    assert attrs.get("frame_rate_hz") == 30.0
    assert isinstance(attrs.get("units"), str) and attrs["units"]
    assert attrs.get("source") == src.name
    assert attrs.get("source_variable") == f"data/{var}"
    assert attrs.get("source_dtype") == src.source_dtype.str

    meta = json.loads((c.dataset_dir / "data.zarr" / var / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
    assert meta["data_type"] == src.float_dtype.name
    assert meta["fill_value"] == "NaN"
    codecs = meta["codecs"]
    assert codecs[0]["name"] == "sharding_indexed", codecs
    inner = codecs[0]["configuration"]["codecs"]
    assert inner[0]["name"] == "bytes" and inner[0]["configuration"]["endian"] == "little", inner
    assert "zstd" in [x["name"] for x in inner], inner
    assert "crc32c" in [x["name"] for x in codecs[0]["configuration"]["index_codecs"]]


def test_zarr_statistics(convert, variant):
    import zarr
    c = convert(variant)
    g = _zarr_group(c)
    stats = c.source.statistics()
    assert stats, "the generated source always has statistics"
    for key, path in stats.items():
        arr = g[f"statistics/{key}"]
        raw = c.source.entries[path]
        expected = c.source.load(path)
        assert arr.shape == expected.shape, key
        assert np.dtype(arr.dtype).newbyteorder("<") == np.dtype(npy_descr(raw)).newbyteorder("<"), key
        assert_bits_equal(arr[...], expected, f"statistics/{key}")
        var = key.split("/")[0]
        assert list(arr.metadata.dimension_names) == stat_dims(var, expected.ndim), key
    # nothing more than the source's statistics
    written = set()
    sg = g["statistics"]
    for var, vg in sg.groups():
        for subset, sub in vg.groups():
            for stat, a in sub.arrays():
                assert isinstance(a, zarr.Array)
                written.add(f"{var}/{subset}/{stat}")
    assert written == set(stats)


def test_zarr_root_attributes(convert, variant):
    c = convert(variant)
    attrs = dict(_zarr_group(c).attrs)
    assert attrs.get("source") == c.source.name
    assert attrs.get("dataset") == c.source.dataset
    assert "pipeline" in attrs and attrs["pipeline"]


# ----------------------------------------------------------------------------- xarray

def test_xarray(convert, variant):
    import xarray as xr
    c = convert(variant)
    src = c.source
    n, N, T = src.shape
    ds = xr.open_zarr(str(c.dataset_dir / "data.zarr"), consolidated=False)
    try:
        assert ds["videos"].dims == ("trial", "height", "width", "frame")
        assert ds["responses"].dims == ("trial", "neuron", "frame")
        assert dict(ds.sizes) == {"trial": n, "height": 36, "width": 64, "neuron": N, "frame": T}
        for var in ("videos", "responses"):
            expected = to_le(src.stack(var))
            got = ds[var].values
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected, err_msg=var)
        # one neuron across all trials, the way analyses slice it
        j = N // 3
        np.testing.assert_array_equal(ds["responses"].isel(neuron=j).values,
                                      to_le(src.stack("responses"))[:, j, :])
        assert ds["videos"].attrs.get("frame_rate_hz") == 30.0
    finally:
        ds.close()


# ----------------------------------------------------------------------------- pyarrow

def _read(c, table):
    import pyarrow.parquet as pq
    return pq.read_table(c.dataset_dir / f"{table}.parquet")


def _check_table(table, expected: dict, types: dict, what: str):
    assert table.column_names == list(expected), f"{what}: columns {table.column_names}"
    for name, want in types.items():
        got = table.schema.field(name).type
        assert type_matches(got, want), f"{what}.{name}: type {got}, expected {want}"
    for name, values in expected.items():
        col = table.column(name)
        assert col.null_count == 0, f"{what}.{name} has nulls"
        assert col.to_pylist() == list(values), f"{what}.{name} values differ"


def test_trials_table(convert, variant):
    import pyarrow as pa
    c = convert(variant)
    src = c.source
    expected = src.expected_trials()
    types = {"trial": pa.int32(), "trial_id": pa.int32(), "tier": "string",
             "valid_frames": pa.int32(), "responses_withheld": pa.bool_()}
    if "trial_idx" in expected:
        types["trial_idx"] = "string"
    for stem in src.extra_meta("trials"):
        types[stem] = npy_arrow_type(src.load(f"meta/trials/{stem}.npy").dtype)
    _check_table(_read(c, "trials"), expected, types, "trials")
    # the generator always makes some short trials and some withheld ones
    assert min(expected["valid_frames"]) < src.shape[2] and any(expected["responses_withheld"])


def test_neurons_table(convert, variant):
    import pyarrow as pa
    c = convert(variant)
    src = c.source
    expected = src.expected_neurons()
    coords_t = npy_arrow_type(src.load("meta/neurons/cell_motor_coordinates.npy").dtype)
    types = {"neuron": pa.int32(),
             "unit_id": npy_arrow_type(src.load("meta/neurons/unit_ids.npy").dtype),
             "x": coords_t, "y": coords_t, "z": coords_t}
    for stem in src.extra_meta("neurons"):
        types[stem] = npy_arrow_type(src.load(f"meta/neurons/{stem}.npy").dtype)
    _check_table(_read(c, "neurons"), expected, types, "neurons")


@pytest.mark.parametrize("var", list(LONG_TABLES))
def test_long_table(convert, variant, var):
    import pyarrow as pa
    c = convert(variant)
    src = c.source
    expected = src.expected_long(var)
    t = _read(c, var)
    assert t.column_names == list(expected)
    assert t.num_rows == src.n_trials * src.shape[2]
    assert t.schema.field("trial_id").type == pa.int32()
    assert t.schema.field("frame").type == pa.int32()
    for name, want in expected.items():
        col = t.column(name)
        assert col.null_count == 0, f"{var}.{name} has nulls (NaN must stay NaN)"
        got = col.to_numpy()
        if name not in ("trial_id", "frame"):
            assert t.schema.field(name).type == pa.from_numpy_dtype(src.float_dtype.newbyteorder("="))
        assert_bits_equal(got, want, f"{var}.parquet:{name}")


@pytest.mark.parametrize("table", ["trials", "neurons", "behavior", "pupil_center"])
def test_parquet_conventions(convert, variant, table):
    import pyarrow.parquet as pq
    c = convert(variant)
    manifest = read_json(c.dataset_dir / "manifest.json")
    pf = pq.ParquetFile(c.dataset_dir / f"{table}.parquet")
    md = pf.metadata
    kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    missing = [k for k in KV_KEYS if k not in kv]
    assert not missing, f"{table}.parquet lacks key-value metadata {missing}"
    assert kv["sensorium_ingest.dataset"] == c.source.dataset
    assert kv["sensorium_ingest.source"] == c.source.name
    assert kv["sensorium_ingest.version"] == manifest["tool"]["version"]
    assert kv["sensorium_ingest.pipeline"] == manifest["pipeline"]["name"]
    # Tables name the stage and the hash of its settings (not the whole pipeline's), so editing
    # one stage leaves the other stages' files byte-identical.
    assert kv["sensorium_ingest.stage"] == table
    assert kv["sensorium_ingest.stage_hash"].startswith("blake3:")
    # The source checksum lives in the manifest only (docs/output-contract.md says why).
    assert "sensorium_ingest.source_checksum" not in kv
    schema = pf.schema_arrow
    for rg in range(md.num_row_groups):
        for ci in range(md.num_columns):
            col = md.row_group(rg).column(ci)
            assert col.compression == "ZSTD", f"{table}.{col.path_in_schema}: {col.compression}"
            if is_string_type(schema.field(col.path_in_schema).type):
                assert {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(col.encodings), \
                    f"{table}.{col.path_in_schema} not dictionary-encoded: {col.encodings}"


# ----------------------------------------------------------------------------- DuckDB

def test_duckdb(convert, variant):
    import duckdb
    c = convert(variant)
    src = c.source
    n, N, T = src.shape
    d = c.dataset_dir
    con = duckdb.connect()
    try:
        def q(sql, *params):
            return con.execute(sql, list(params)).fetchall()

        files = {t: str(d / f"{t}.parquet") for t in ("trials", "neurons", "behavior", "pupil_center")}
        for t, rows in (("trials", n), ("neurons", N), ("behavior", n * T), ("pupil_center", n * T)):
            assert q("SELECT count(*) FROM read_parquet(?)", files[t]) == [(rows,)], t

        got = dict(q("SELECT tier, count(*) FROM read_parquet(?) GROUP BY tier", files["trials"]))
        assert got == dict(Counter(src.tiers))

        rows = q("SELECT trial, trial_id, valid_frames, responses_withheld FROM read_parquet(?)",
                 files["trials"])
        assert rows == list(zip(range(n), src.trial_ids, src.valid_frames, src.withheld))

        rows = q("SELECT unit_id, x, y, z FROM read_parquet(?) ORDER BY neuron", files["neurons"])
        e = src.expected_neurons()
        assert rows == list(zip(e["unit_id"], e["x"], e["y"], e["z"]))

        # row order of the long tables is (trial position, frame), as written
        for var, (a, b) in LONG_TABLES.items():
            res = con.execute(f"SELECT trial_id, frame, {a}, {b} FROM read_parquet(?)",
                              [files[var]]).fetchnumpy()
            exp = src.expected_long(var)
            np.testing.assert_array_equal(res["trial_id"], exp["trial_id"])
            np.testing.assert_array_equal(res["frame"], exp["frame"])
            np.testing.assert_array_equal(np.asarray(res[a]), exp[a])
            np.testing.assert_array_equal(np.asarray(res[b]), exp[b])

        # NaN sits exactly in the video's tail for pupil_center, nowhere for behavior
        pc = src.stack("pupil_center")
        tail = np.arange(T)[None, :] >= np.array(src.valid_frames)[:, None]
        nan_in_valid = int((np.isnan(pc).any(axis=1) & ~tail).sum())
        nan_in_tail = int((np.isnan(pc).any(axis=1) & tail).sum())
        sql = ("SELECT count(*) FILTER (WHERE p.frame < t.valid_frames AND isnan(p.x)), "
               "       count(*) FILTER (WHERE p.frame >= t.valid_frames AND isnan(p.x)) "
               "FROM read_parquet(?) p JOIN read_parquet(?) t USING (trial_id)")
        assert q(sql, files["pupil_center"], files["trials"]) == [(nan_in_valid, nan_in_tail)]
        assert nan_in_tail > 0
        assert q("SELECT count(*) FROM read_parquet(?) WHERE isnan(pupil_dilation) "
                 "OR isnan(running_speed)", files["behavior"]) == \
            [(int(np.isnan(src.stack("behavior")).any(axis=1).sum()),)]

        # per-trial mean of valid pupil x, SQL vs numpy
        rows = q("SELECT p.trial_id, avg(p.x) FROM read_parquet(?) p JOIN read_parquet(?) t "
                 "USING (trial_id) WHERE p.frame < t.valid_frames GROUP BY p.trial_id "
                 "ORDER BY p.trial_id", files["pupil_center"], files["trials"])
        want = [(i, float(np.mean(pc[k, 0, :L].astype(np.float64))))
                for k, (i, L) in enumerate(zip(src.trial_ids, src.valid_frames))]
        assert [r[0] for r in rows] == [w[0] for w in want]
        np.testing.assert_allclose([r[1] for r in rows], [w[1] for w in want], rtol=1e-12)
    finally:
        con.close()


# ----------------------------------------------------------------------------- polars

def test_polars(convert, variant):
    import polars as pl
    c = convert(variant)
    src = c.source
    d = c.dataset_dir
    trials = polars_table(d / "trials.parquet", src.expected_trials(), "trials")
    assert trials.schema["trial"] == pl.Int32 and trials.schema["valid_frames"] == pl.Int32
    assert trials.schema["tier"] in (pl.String, pl.Categorical)
    assert trials.schema["responses_withheld"] == pl.Boolean

    polars_table(d / "neurons.parquet", src.expected_neurons(), "neurons")

    float_pl = pl.Float32 if src.float_dtype.itemsize == 4 else pl.Float64
    for var in LONG_TABLES:
        df = pl.read_parquet(d / f"{var}.parquet")
        exp = src.expected_long(var)
        assert df.columns == list(exp)
        for name, values in exp.items():
            if name not in ("trial_id", "frame"):
                assert df.schema[name] == float_pl
            assert_bits_equal(df[name].to_numpy(), values, f"polars {var}.{name}")
        # a typical per-tier selection
        withheld = [i for i, w in zip(src.trial_ids, src.withheld) if w]
        assert df.filter(pl.col("trial_id").is_in(withheld)).height == len(withheld) * src.shape[2]


# ----------------------------------------------------------------------------- manifest

def test_manifest(convert, variant):
    import blake3
    c = convert(variant)
    src = c.source
    m = read_json(c.dataset_dir / "manifest.json")
    n, N, T = src.shape
    assert m["format"] == "sensorium-ingest-manifest/1"
    assert m["tool"]["name"] == "sensorium-ingest" and m["tool"]["version"]
    assert m["dataset"] == src.dataset
    assert m["source"]["name"] == src.name
    assert m["source"]["entries"] == len(src.entries)
    assert m["source"]["checksum"].startswith("blake3:")
    assert m["pipeline"]["name"] == "sensorium2023"
    assert m["pipeline"]["hash"].startswith("blake3:") and m["pipeline"]["text"]
    assert m["counts"] == {"trials": n, "neurons": N, "frames": T}

    paths = [e["path"] for e in m["entries"]]
    assert len(paths) == len(set(paths)), "an entry is listed twice"
    assert paths == sorted(paths), "entries are not sorted by path"
    assert set(paths) == set(src.entries), (
        f"missing: {sorted(set(src.entries) - set(paths))[:5]}, "
        f"extra: {sorted(set(paths) - set(src.entries))[:5]}")
    for e in m["entries"]:
        p = e["path"]
        if p in src.junk:
            assert e["status"] == "skipped", e
            assert isinstance(e.get("reason"), str) and e["reason"], e
            continue
        assert e["status"] == "converted", e
        raw = src.entries[p]
        assert strip_algo(e["blake3"]) == blake3.blake3(raw).hexdigest(), p
        if p.startswith("data/"):
            var = p.split("/")[1]
            arr = src.load(p)
            assert e["stage"] == var, e
            assert e["dtype"] == arr.dtype.str, e
            assert e["shape"] == list(arr.shape), e
            if var in ("videos", "responses"):
                assert e["output"] == f"data.zarr/{var}", e
    if variant in ("junk", "dir-entries", "everything"):
        assert src.junk, "junk variant must have junk entries"

    outputs = {o["path"]: o for o in m["outputs"]}
    for t in ("trials.parquet", "neurons.parquet", "behavior.parquet", "pupil_center.parquet"):
        assert t in outputs, f"{t} missing from manifest outputs"
    assert "manifest.json" not in outputs
    for path, o in outputs.items():
        f = c.dataset_dir / path
        if f.is_file():
            assert o["bytes"] == f.stat().st_size, path
            assert strip_algo(o["blake3"]) == blake3.blake3(f.read_bytes()).hexdigest(), path
        else:
            assert f.is_dir(), f"manifest output {path} does not exist"
