"""`sensorium-ingest inspect`: JSON and text summaries of a source."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

import helpers
from conftest import VARIANTS
from helpers import Source

CASES = ["default", "folder", "old-release", "f8-big-endian", "no-top-folder", "junk"]


@pytest.fixture(scope="module")
def sources(mouse):
    return {k: mouse(k, **VARIANTS[k]) for k in CASES}


def _dtype_matches(value, src_dtype: np.dtype) -> bool:
    if value == src_dtype.str:
        return True
    try:
        return np.dtype(value) == src_dtype.newbyteorder("=")
    except TypeError:
        return False


@pytest.mark.parametrize("case", CASES)
def test_inspect_json(ingest_bin, sources, case, tmp_path):
    path = sources[case]
    src = Source(path)
    proc = helpers.run("inspect", path, "--json", cwd=tmp_path)
    assert proc.returncode == 0, helpers.describe_run(proc)
    info = json.loads(proc.stdout)
    n, N, T = src.shape
    assert info["name"] in (src.name, src.dataset)
    assert info["n_trials"] == n
    assert info["n_neurons"] == N
    assert info["n_frames"] == T
    assert info["tiers"] == dict(Counter(src.tiers))
    assert _dtype_matches(info["dtype"], src.source_dtype), info["dtype"]
    assert list(tmp_path.iterdir()) == [], "inspect wrote files"


@pytest.mark.parametrize("case", ["default", "folder"])
def test_inspect_text(ingest_bin, sources, case):
    src = Source(sources[case])
    proc = helpers.run("inspect", sources[case])
    assert proc.returncode == 0, helpers.describe_run(proc)
    out = proc.stdout
    assert src.dataset in out
    assert re.search(rf"\b{src.n_trials}\b", out), out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_inspect_refuses_garbage(ingest_bin, tmp_path):
    bogus = tmp_path / "junk.zip"
    bogus.write_bytes(b"PK\x03\x04 broken")
    proc = helpers.run("inspect", bogus, "--json")
    assert proc.returncode == helpers.EXIT["data"], helpers.describe_run(proc)
    assert "junk.zip" in proc.stderr
