"""zarr-python reads every sharding variant the Rust shard encoder derives from array metadata
(index at the start or the end, with or without its CRC-32C, zstd with a frame checksum) and the
ones it leaves to zarrs. The arrays are written by the Rust unit test
`writers::shard::tests::encoder_variants_read_back`, which keeps them when
SENSORIUM_ENCODER_VARIANTS_DIR is set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import zarr

from helpers import REPO

RUST_TEST = "writers::shard::tests::encoder_variants_read_back"


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory):
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not on PATH: the variants are written by a Rust unit test")
    out = tmp_path_factory.mktemp("encoder-variants")
    env = dict(os.environ, SENSORIUM_ENCODER_VARIANTS_DIR=str(out))
    cmd = [cargo, "test", "--release", "--lib", RUST_TEST, "--", "--exact"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=3600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert (out / "expected.json").is_file(), "the Rust test kept no arrays: was it run?"
    return out


def test_every_variant_reads_back_in_zarr_python(variants_dir):
    expected = json.loads((variants_dir / "expected.json").read_text())
    shape = tuple(expected["shape"])
    want = np.array([np.nan if v is None else v for v in expected["values"]],
                    dtype=np.float32).reshape(shape)
    encoded_by = expected["encoded_by"]
    # Both paths are covered: shards encoded in Rust, and shards left to zarrs.
    assert set(encoded_by.values()) == {"writers::shard", "zarrs"}, encoded_by
    for name in encoded_by:
        array = zarr.open_array(str(variants_dir / name), mode="r")
        assert array.shape == shape, name
        assert array.dtype == np.float32, name
        got = array[...]
        np.testing.assert_array_equal(got, want, err_msg=f"variant {name}")
        # NaN where fill, in the same places (assert_array_equal treats NaN as equal).
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
