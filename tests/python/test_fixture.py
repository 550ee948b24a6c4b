"""The committed sample mouse is exactly what the documented command generates."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zlib

import numpy as np

from helpers import REPO, Source

NAME = "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
FIXTURE = REPO / "fixtures" / NAME


def documented_command() -> list[str]:
    text = (REPO / "fixtures" / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines()
             if re.match(r"\s*python3? tests/python/gen_mouse\.py fixtures\b", ln)]
    assert len(lines) == 1, "fixtures/README.md must show exactly one generator command"
    return shlex.split(lines[0])


def test_fixture_is_reproducible(tmp_path):
    argv = documented_command()
    argv[0] = sys.executable
    argv[2] = str(tmp_path)                       # OUTDIR
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True)
    fresh = tmp_path / NAME
    assert out.stdout.strip().endswith(NAME)
    assert fresh.read_bytes() == FIXTURE.read_bytes(), (
        "regenerating the fixture gave different bytes: the generator is no longer "
        "deterministic or changed (rerun the command in fixtures/README.md and commit it if "
        f"the change is intended; zlib here is {zlib.ZLIB_RUNTIME_VERSION})")


def test_fixture_shape_and_size():
    assert FIXTURE.stat().st_size < 3_000_000
    src = Source(FIXTURE)
    n, N, T = src.shape
    assert 9 <= n <= 12 and 150 <= N <= 250 and 80 <= T <= 100
    assert src.source_dtype == np.dtype("<f4")
    assert src.junk, "the fixture carries a little junk"
    assert src.prefix == NAME[:-4] + "/"
    assert not all(v == T for v in src.valid_frames) and any(src.withheld)


def test_fixture_converts(ingest_bin, tmp_path):
    """The README quickstart: convert the committed sample."""
    import helpers
    proc = helpers.run("convert", FIXTURE, "--out", tmp_path / "store")
    assert proc.returncode == 0, helpers.describe_run(proc)
    ds = tmp_path / "store" / "dynamic90001-1-1"
    m = helpers.read_json(ds / "manifest.json")
    assert m["counts"] == {"trials": 11, "neurons": 200, "frames": 90}
    skipped = sorted(e["path"] for e in m["entries"] if e["status"] == "skipped")
    assert skipped == sorted(Source(FIXTURE).junk) and len(skipped) == 3
