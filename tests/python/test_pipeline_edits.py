"""Editing the pipeline YAML alone changes the output: chunking, codec and level, a column
name, a dropped statistic. Checked with zarr-python and pyarrow on the written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

import helpers

SMALL = dict(trials=9, neurons=30, frames=40, seed=41)


def default_pipeline() -> str:
    proc = helpers.run("default-pipeline")
    assert proc.returncode == 0, helpers.describe_run(proc)
    return proc.stdout


@pytest.fixture(scope="module")
def source(mouse):
    return mouse("pipeline-edits", **SMALL)


def convert_with(tmp_path: Path, source: Path, text: str, name: str = "edited") -> Path:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text)
    proc = helpers.run("convert", source, "--out", tmp_path / "store", "--pipeline", pipeline, "--name", name)
    assert proc.returncode == 0, helpers.describe_run(proc)
    return tmp_path / "store" / name


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, f"default pipeline lacks {old!r}"
    return text.replace(old, new, 1)


def test_default_pipeline_file_is_the_embedded_one():
    assert default_pipeline() == (helpers.REPO / "pipelines" / "sensorium2023.yaml").read_text()


def test_chunking_and_codec(tmp_path, source):
    text = default_pipeline()
    text = replace_once(text, "chunk_shape: [1, 512, full]", "chunk_shape: [1, 8, 10]")
    text = replace_once(text, "shard_shape: [4, full, full]", "shard_shape: [2, full, full]")
    text = replace_once(text, "    compression: {codec: zstd, level: 1}\n    attributes:\n      units: deconvolved",
                        "    compression: {codec: gzip, level: 7}\n    attributes:\n      units: deconvolved")
    ds = convert_with(tmp_path, source, text)
    meta = json.loads((ds / "data.zarr" / "responses" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 2
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 8, 10]
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert "gzip" in inner and "zstd" not in inner
    gz = next(c for c in sharding["configuration"]["codecs"] if c["name"] == "gzip")
    assert gz["configuration"]["level"] == 7
    # Values still bit-exact through zarr-python.
    src = helpers.Source(source)
    got = zarr.open_group(ds / "data.zarr", mode="r")["responses"][:]
    helpers.assert_bits_equal(got, src.stack("responses"), "responses with edited chunking")
    assert zarr.open_group(ds / "data.zarr", mode="r")["responses"].chunks == (1, 8, 10)


def test_inner_chunks_spanning_two_trials(tmp_path, source):
    """Our shard encoder reads and encodes a shard one chunk row at a time: here two trials,
    with a last shard that ends inside a chunk row (fill after the last trial). Read back
    bit-exact by zarr-python, and byte-identical at 1 and 2 threads."""
    text = default_pipeline()
    text = replace_once(text, "chunk_shape: [1, full, full, full]", "chunk_shape: [2, full, full, full]")
    text = replace_once(text, "shard_shape: [16, full, full, full]", "shard_shape: [4, full, full, full]")
    src = helpers.Source(source)
    trials = src.stack("videos").shape[0]
    assert trials % 4 not in (0, 2), f"{trials} trials: the last shard must end inside a chunk row"
    outputs = []
    for threads in ("1", "2"):
        pipeline = tmp_path / threads / "pipeline.yaml"
        pipeline.parent.mkdir()
        pipeline.write_text(text)
        store = tmp_path / threads / "store"
        proc = helpers.run("convert", source, "--out", store, "--pipeline", pipeline,
                           "--name", "edited", "--threads", threads)
        assert proc.returncode == 0, helpers.describe_run(proc)
        videos = zarr.open_group(store / "edited" / "data.zarr", mode="r")["videos"]
        assert videos.chunks[0] == 2 and videos.shards[0] == 4
        helpers.assert_bits_equal(videos[:], src.stack("videos"), "videos in 2-trial chunks")
        outputs.append(store / "edited" / "data.zarr" / "videos")
    files = sorted(f.relative_to(outputs[0]) for f in outputs[0].rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(outputs[1]) for f in outputs[1].rglob("*") if f.is_file())
    for f in files:
        assert (outputs[0] / f).read_bytes() == (outputs[1] / f).read_bytes(), f


@pytest.mark.parametrize("codec,cname,shuffle", [
    ("{codec: blosc_lz4}", "lz4", "shuffle"),
    ("{codec: blosc_zstd, level: 3, shuffle: bit}", "zstd", "bitshuffle"),
])
def test_blosc_codec(tmp_path, source, codec, cname, shuffle):
    """The blosc codecs (videos and responses), read back bit-exact by zarr-python and numcodecs,
    and byte-identical whatever the thread count."""
    text = default_pipeline()
    for units in ("grey", "deconvolved"):
        text = replace_once(text, f"    compression: {{codec: zstd, level: 1}}\n    attributes:\n      units: {units}",
                            f"    compression: {codec}\n    attributes:\n      units: {units}")
    (tmp_path / "a").mkdir()
    ds = convert_with(tmp_path / "a", source, text)
    src = helpers.Source(source)
    g = zarr.open_group(ds / "data.zarr", mode="r")
    for var, size in (("videos", 4), ("responses", 4)):
        meta = json.loads((ds / "data.zarr" / var / "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["codecs"]
        blosc = next(c for c in inner if c["name"] == "blosc")["configuration"]
        assert (blosc["cname"], blosc["shuffle"], blosc["typesize"]) == (cname, shuffle, size)
        helpers.assert_bits_equal(g[var][:], src.stack(var), f"{var} with {codec}")
    one = tmp_path / "b" / "pipeline.yaml"
    one.parent.mkdir()
    one.write_text(text)
    proc = helpers.run("convert", source, "--out", tmp_path / "b" / "store", "--pipeline", one,
                       "--name", "edited", "--threads", "1")
    assert proc.returncode == 0, helpers.describe_run(proc)
    for var in ("videos", "responses"):
        for f in sorted((ds / "data.zarr" / var).rglob("*")):
            if f.is_file():
                other = tmp_path / "b" / "store" / "edited" / f.relative_to(ds)
                assert f.read_bytes() == other.read_bytes(), f


def test_renamed_column_and_table_codec(tmp_path, source):
    text = default_pipeline()
    text = replace_once(text, "rename: {tiers: tier}", "rename: {tiers: split}")
    text = replace_once(text, "contract: sensorium2023\n", "")
    text = replace_once(text, "columns: [pupil_dilation, running_speed]\n    compression: {codec: zstd, level: 3}",
                        "columns: [pupil_dilation, running_speed]\n    compression: {codec: none}")
    ds = convert_with(tmp_path, source, text)
    trials = pq.read_table(ds / "trials.parquet")
    assert "split" in trials.column_names and "tier" not in trials.column_names
    src = helpers.Source(source)
    assert trials.column("split").to_pylist() == src.tiers
    md = pq.ParquetFile(ds / "behavior.parquet").metadata
    assert md.row_group(0).column(2).compression == "UNCOMPRESSED"


def test_renamed_column_breaks_the_contract_when_it_is_kept(tmp_path, source):
    text = replace_once(default_pipeline(), "rename: {tiers: tier}", "rename: {tiers: split}")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text)
    proc = helpers.run("convert", source, "--out", tmp_path / "store", "--pipeline", pipeline)
    assert proc.returncode != 0
    assert "contract" in proc.stderr and "tier" in proc.stderr
    assert not any((tmp_path / "store").glob("*/manifest.json")), "a dataset that breaks its contract must not look complete"


def test_dropped_statistic_is_recorded_as_skipped(tmp_path, source):
    text = replace_once(default_pipeline(), "    exclude: []", '    exclude: ["responses/all/std"]')
    ds = convert_with(tmp_path, source, text)
    stats = zarr.open_group(ds / "data.zarr" / "statistics" / "responses" / "all", mode="r")
    assert "std" not in stats and "mean" in stats
    manifest = json.loads((ds / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["path"] == "meta/statistics/responses/all/std.npy")
    assert entry["status"] == "skipped" and "statistics" in entry["reason"]


@pytest.mark.parametrize("edit, expect_line", [
    (("    chunk_shape: [1, 512, full]", "    chunk_shape: [1, 512, full]\n    chunk_size: 3"), "chunk_size"),
    (("frame_rate_hz: 30.0", "frame_rate_hz: [30]"), "frame_rate_hz"),
])
def test_bad_pipeline_names_file_and_line(tmp_path, source, edit, expect_line):
    text = replace_once(default_pipeline(), *edit)
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(text)
    proc = helpers.run("convert", source, "--out", tmp_path / "store", "--pipeline", pipeline)
    assert proc.returncode == helpers.EXIT["pipeline"], helpers.describe_run(proc)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if expect_line in l)
    assert f"{pipeline}:{line}:" in proc.stderr, proc.stderr
    assert "hint:" in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
