"""Same input, same output: zip vs extracted folder, repeated runs, thread counts."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np
import pytest

import gen_mouse
import helpers
from helpers import Source, assert_same_outputs, find_key, read_json, tree_files

OPTS = dict(trials=12, neurons=50, frames=48, seed=101)


@pytest.fixture(scope="module")
def zipped(mouse):
    return mouse("equivalence", **OPTS)


def _convert(tmp_path_factory, label, source, *extra):
    store = tmp_path_factory.mktemp(label)
    proc = helpers.run("convert", source, "--out", store, *extra)
    assert proc.returncode == 0, helpers.describe_run(proc)
    ds = store / Source(source).dataset
    assert (ds / "manifest.json").is_file(), \
        f"exit 0 but no {ds}/manifest.json\n" + helpers.describe_run(proc)
    return ds


@pytest.fixture(scope="module")
def from_zip(ingest_bin, tmp_path_factory, zipped):
    return _convert(tmp_path_factory, "eq-zip", zipped)


def test_zip_and_extracted_folder_give_identical_outputs(tmp_path_factory, zipped, from_zip):
    extract = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(zipped) as zf:
        zf.extractall(extract)
    folder = extract / zipped.name[:-4]
    assert (folder / "data" / "videos" / "10.npy").is_file()
    from_folder = _convert(tmp_path_factory, "eq-folder", folder)
    # lock.json records each container's own change fingerprints (CRC-32s in a zip, mtimes in
    # a folder), so it differs like run.json; every data and metadata file is identical.
    assert_same_outputs(from_zip, from_folder, ignore=("run.json", "lock.json"))
    # the source checksum is over entry paths and bytes, so it matches too
    assert read_json(from_zip / "manifest.json")["source"] == \
        read_json(from_folder / "manifest.json")["source"]
    # ...but run.json records where the data came from
    assert read_json(from_zip / "run.json") != read_json(from_folder / "run.json")


def test_generated_folder_matches_zip(tmp_path_factory, zipped, from_zip):
    """The generator's --format folder output is the same dataset as its zip."""
    folder = gen_mouse.generate(tmp_path_factory.mktemp("gen-folder"), format="folder", **OPTS)
    assert folder.name == zipped.name[:-4]
    assert_same_outputs(from_zip, _convert(tmp_path_factory, "eq-genfolder", folder),
                        ignore=("run.json", "lock.json"))


def test_folder_without_top_level_name_in_zip(tmp_path_factory, mouse):
    """A zip with entries at its root converts like its extracted folder."""
    z = mouse("equivalence-root", no_top_folder=True, **OPTS)
    with zipfile.ZipFile(z) as zf:
        assert all(n.startswith(("data/", "meta/")) for n in zf.namelist())
        extract = tmp_path_factory.mktemp("root-extract") / z.name[:-4]
        zf.extractall(extract)
    a = _convert(tmp_path_factory, "eq-root-zip", z)
    b = _convert(tmp_path_factory, "eq-root-folder", extract)
    assert_same_outputs(a, b, ignore=("run.json", "lock.json"))


def test_two_conversions_are_byte_identical(tmp_path_factory, zipped, from_zip):
    again = _convert(tmp_path_factory, "eq-again", zipped)
    assert_same_outputs(from_zip, again)
    assert (again / "run.json").is_file()


def test_thread_count_does_not_change_output(tmp_path_factory, zipped, from_zip):
    one = _convert(tmp_path_factory, "eq-threads1", zipped, "--threads", "1")
    assert_same_outputs(from_zip, one)
    two = _convert(tmp_path_factory, "eq-threads2", zipped, "--threads", "2")
    assert_same_outputs(from_zip, two)
    assert find_key(read_json(one / "run.json"), "threads")


def test_name_option(tmp_path_factory, zipped):
    store = tmp_path_factory.mktemp("eq-name")
    proc = helpers.run("convert", zipped, "--out", store, "--name", "mouse-a")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert sorted(p.name for p in store.iterdir()) == ["catalog", "mouse-a"]
    m = read_json(store / "mouse-a" / "manifest.json")
    assert m["dataset"] == "mouse-a"
    assert m["source"]["name"] == zipped.name[:-4]


def test_outputs_are_not_empty(from_zip):
    files = tree_files(from_zip)
    assert any(k.startswith("data.zarr/videos/") for k in files)
    assert all(len(v) > 0 for k, v in files.items() if k.endswith(".parquet"))


def test_renamed_zip_still_finds_its_top_folder(tmp_path_factory, zipped, from_zip):
    """A zip renamed by its user keeps a top folder that no longer matches its name."""
    import shutil
    import zarr
    renamed = tmp_path_factory.mktemp("renamed") / "mouse-a.zip"
    shutil.copyfile(zipped, renamed)
    store = tmp_path_factory.mktemp("eq-renamed")
    proc = helpers.run("convert", renamed, "--out", store)
    assert proc.returncode == 0, helpers.describe_run(proc)
    ds = store / "mouse-a"
    m, ref = read_json(ds / "manifest.json"), read_json(from_zip / "manifest.json")
    assert m["source"]["name"] == "mouse-a"
    assert [e["path"] for e in m["entries"]] == [e["path"] for e in ref["entries"]]
    assert m["source"]["checksum"] == ref["source"]["checksum"]
    for var in ("videos", "responses"):
        a = zarr.open_array(str(ds / "data.zarr" / var), mode="r")[...]
        b = zarr.open_array(str(from_zip / "data.zarr" / var), mode="r")[...]
        assert a.tobytes() == b.tobytes(), var


def _npy_with_long_header(arr: np.ndarray) -> bytes:
    """A valid npy 1.0 file whose header is padded to 256 bytes (numpy writes 128)."""
    d = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(arr.dtype), arr.shape)
    header = d.ljust(256 - 10 - 1) + "\n"
    return (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
            + np.ascontiguousarray(arr).tobytes())


def test_mixed_layouts_and_header_lengths_in_one_shard(tmp_path_factory, zipped, from_zip):
    """Trials of one stage stored differently - C order, Fortran order, a 256-byte header - in
    one shard: C-order trials are inflated in place, last to first, each header landing over
    the end of the slot before (or the lead), Fortran ones go the general way. Every value must
    equal the conversion of the untouched mouse."""
    import zarr

    src = tmp_path_factory.mktemp("mixed") / zipped.name
    changed = 0
    with zipfile.ZipFile(zipped) as zin, \
            zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            m = re.search(r"/data/(videos|responses)/(\d+)\.npy$", info.filename)
            if m and int(m.group(2)) % 3:
                arr = np.load(io.BytesIO(data))
                out = io.BytesIO()
                if int(m.group(2)) % 3 == 1:
                    np.save(out, np.asfortranarray(arr))
                    data = out.getvalue()
                else:
                    data = _npy_with_long_header(arr)
                assert np.array_equal(np.load(io.BytesIO(data)), arr, equal_nan=True)
                changed += 1
            zout.writestr(info.filename, data)
    assert changed == 2 * 8
    mixed = _convert(tmp_path_factory, "eq-mixed", src)
    for var in ("videos", "responses"):
        got = zarr.open_group(mixed / "data.zarr", mode="r")[var][:]
        want = zarr.open_group(from_zip / "data.zarr", mode="r")[var][:]
        helpers.assert_bits_equal(got, want, var)
