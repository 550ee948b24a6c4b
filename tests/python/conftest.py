"""Shared fixtures: generated mice (built once per session) and their conversions."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import gen_mouse
import helpers
from helpers import Source

SMALL = dict(trials=12, neurons=48, frames=50)

# Every variant of the source format the converter must accept. Sizes stay small:
# 12 trials (so 10.npy and 11.npy sort before 2.npy in the archive), N 40-60, T 40-60.
VARIANTS: dict[str, dict] = {
    "default": dict(SMALL, seed=1),
    "folder": dict(SMALL, seed=2, format="folder"),
    "no-top-folder": dict(SMALL, seed=3, no_top_folder=True),
    "junk": dict(SMALL, seed=4, junk=True),
    "dir-entries": dict(SMALL, seed=5, dir_entries=True, junk=True),
    "gaps": dict(SMALL, seed=6, gaps=True),
    "old-release": dict(SMALL, seed=7, old_release=True),
    "f8": dict(trials=10, neurons=40, frames=44, seed=8, dtype="<f8"),
    "f8-big-endian": dict(trials=11, neurons=41, frames=45, seed=9, dtype=">f8"),
    "f4-big-endian": dict(SMALL, seed=10, dtype=">f4"),
    "fortran": dict(SMALL, seed=11, order="F"),
    "fortran-f8-big-endian": dict(trials=11, neurons=43, frames=41, seed=12, order="F", dtype=">f8"),
    "stored": dict(SMALL, seed=13, compression="stored"),
    "zip64": dict(SMALL, seed=14, zip64=True),
    "extra-meta": dict(trials=12, neurons=60, frames=60, seed=15, extra_meta=True),
    "extra-stats": dict(SMALL, seed=16, extra_stats=True),
    "static-stats": dict(SMALL, seed=20, static_stats=True),
    "nan-payload": dict(SMALL, seed=17, nan_payload=True),
    "long-trials": dict(trials=6, neurons=20, frames=320, seed=18),
    "everything": dict(trials=12, neurons=55, frames=47, seed=19, dtype=">f8", order="F",
                       old_release=True, extra_meta=True, extra_stats=True, static_stats=True,
                       junk=True,
                       zip64=True, compression="stored", nan_payload=True),
}


@dataclass
class Converted:
    variant: str
    options: dict
    source_path: Path
    source: Source
    store: Path
    dataset_dir: Path
    proc: object


def _require_binary() -> Path:
    b = helpers.binary()
    if not b.is_file():
        pytest.fail(f"sensorium-ingest binary not found at {b}: build it with "
                    "`cargo build --release` or set SENSORIUM_INGEST_BIN", pytrace=False)
    return b


@pytest.fixture(scope="session")
def ingest_bin() -> Path:
    return _require_binary()


@pytest.fixture(scope="session")
def mouse(tmp_path_factory):
    """mouse(name, **options) -> Path of a generated source, built once per session."""
    cache: dict[str, Path] = {}

    def make(key: str, **options) -> Path:
        if key not in cache:
            out = tmp_path_factory.mktemp(f"src-{key}")
            cache[key] = gen_mouse.generate(out, **options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def big_mouse(tmp_path_factory) -> Path:
    """16 real-size trials (benches/gen_big.py): 4 shards of `responses`, 1 of `videos`."""
    out = tmp_path_factory.mktemp("big")
    proc = subprocess.run([sys.executable, str(helpers.REPO / "benches" / "gen_big.py"), str(out),
                           "--trials", "16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def convert(tmp_path_factory, mouse):
    """convert(variant) -> Converted; each variant is generated and converted once."""
    cache: dict[str, object] = {}

    def get(variant: str) -> Converted:
        if variant not in cache:
            _require_binary()
            options = VARIANTS[variant]
            src = mouse(variant, **options)
            store = tmp_path_factory.mktemp(f"store-{variant}")
            proc = helpers.run("convert", src, "--out", store)
            if proc.returncode != 0:
                cache[variant] = f"conversion of variant {variant!r} failed\n" + \
                    helpers.describe_run(proc)
            else:
                source = Source(src)
                ds = store / source.dataset
                if (ds / "manifest.json").is_file():
                    cache[variant] = Converted(variant, options, src, source, store, ds, proc)
                else:
                    cache[variant] = (f"conversion of variant {variant!r} exited 0 but wrote "
                                      f"no {ds}/manifest.json\n" + helpers.describe_run(proc))
        got = cache[variant]
        if isinstance(got, str):
            pytest.fail(got, pytrace=False)
        return got

    return get


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """family(key, kind, **options) -> Path of a generated FileTree-family member
    (gen_family.py: static2022, color, lab_export), built once per session."""
    import gen_family
    cache: dict[str, Path] = {}

    def make(key: str, kind: str, **options) -> Path:
        if key not in cache:
            out = tmp_path_factory.mktemp(f"fam-{key}")
            cache[key] = gen_family.generate(kind, out, **options)
        return cache[key]

    return make


def _pids(name: str) -> set[int]:
    proc = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return {int(p) for p in proc.stdout.split()}


@pytest.fixture(scope="session")
def daemons_started_here():
    """For tests that start system daemons (SLURM's munged, slurmctld, slurmd): call the
    returned function around the start, and every daemon process that was not running before
    is stopped when the session ends, pass or fail. Daemons someone else runs are left alone."""
    import os
    import signal
    import time
    started: set[int] = set()

    def around(start, names=("munged", "slurmctld", "slurmd")):
        before = {n: _pids(n) for n in names}
        try:
            return start()
        finally:
            for n in names:
                started.update(_pids(n) - before[n])

    yield around
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
