"""Direct I/O: shards (objects of 1 MiB or more) are written with O_DIRECT where the file system
takes it, and their hashes are taken as they are written instead of read back. Real-size trials
(benches/gen_big.py), so the shards are the real 6-9 MB and do take the direct path; the output
is read back with zarr-python and compared value for value with the source, and must be
byte-identical to the page-cache path (`--no-direct-io`) and to the fallback on a file system
that refuses O_DIRECT (ramfs)."""

from __future__ import annotations

import io
import os
import subprocess
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

import helpers

# File systems known to take O_DIRECT (`stat -f -c %T` names).
DIRECT_IO_FILE_SYSTEMS = {"ext2/ext3", "xfs", "btrfs"}


def convert(source: Path, store: Path, *extra) -> tuple[Path, dict, subprocess.CompletedProcess]:
    proc = helpers.run("convert", source, "--out", store, "--threads", "2", *extra)
    assert proc.returncode == 0, helpers.describe_run(proc)
    ds = store / helpers.dataset_name(source.name[:-4])
    return ds, helpers.read_json(ds / "run.json"), proc


def file_system(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def direct(big_mouse, tmp_path_factory):
    return convert(big_mouse, tmp_path_factory.mktemp("direct"))


def test_shards_written_directly_hold_the_source_values(big_mouse, direct):
    ds, run, _ = direct
    assert run["direct_io"] is True
    written = run["direct_io_writes"] + run["buffered_zarr_writes"]
    # 4 responses shards, 1 videos shard, the statistics arrays, the metadata.
    assert written > 10, run
    if file_system(ds) in DIRECT_IO_FILE_SYSTEMS:
        # Every shard (4 + 1) and the large statistics arrays are >= 1 MiB.
        assert run["direct_io_writes"] >= 5, run
    import zarr
    group = zarr.open_group(str(ds / "data.zarr"), mode="r")
    with zipfile.ZipFile(big_mouse) as z:
        stem = z.namelist()[0].split("/")[0]
        for var in ("responses", "videos"):
            arr = group[var]
            n = arr.shape[0]
            for i in range(n):
                expected = np.load(io.BytesIO(z.read(f"{stem}/data/{var}/{i}.npy")))
                helpers.assert_bits_equal(arr[i], helpers.to_le(expected), f"{var}[{i}]")


def test_hashes_taken_while_writing_match_the_files_on_disk(direct):
    """The manifest's output hashes come from the bytes as written: they must be those of the
    files on disk, read here by an independent BLAKE3."""
    import blake3
    ds, _, _ = direct
    manifest = helpers.read_json(ds / "manifest.json")
    checked = 0
    for out in manifest["outputs"]:
        data = (ds / out["path"]).read_bytes()
        assert len(data) == out["bytes"], out["path"]
        assert blake3.blake3(data).hexdigest() == helpers.strip_algo(out["blake3"]), out["path"]
        checked += 1
    assert checked > 10
    verify = helpers.run("verify", ds)
    assert verify.returncode == 0, helpers.describe_run(verify)


def test_page_cache_path_is_byte_identical(big_mouse, direct, tmp_path):
    ds, _, _ = direct
    buffered, run, _ = convert(big_mouse, tmp_path, "--no-direct-io")
    assert run["direct_io"] is False
    assert run["direct_io_writes"] == 0 and run["buffered_zarr_writes"] > 10, run
    helpers.assert_same_outputs(ds, buffered)


def test_a_file_system_refusing_direct_io_gets_ordinary_writes(big_mouse, direct, tmp_path):
    """ramfs refuses O_DIRECT (EINVAL): the run says so once, writes through the page cache,
    and the output is the same."""
    ds, _, _ = direct
    mount = tmp_path / "ramfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "ramfs", f"ramfs-{uuid.uuid4().hex[:8]}",
                           str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here (needs root): {made.stderr.strip()}")
    try:
        fallback, run, proc = convert(big_mouse, mount / "store")
        assert run["direct_io"] is True
        assert run["direct_io_writes"] == 0 and run["buffered_zarr_writes"] > 10, run
        assert proc.stderr.count("refuses direct I/O") == 1, proc.stderr
        helpers.assert_same_outputs(ds, fallback)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
