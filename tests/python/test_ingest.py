"""Scheduled ingest and the store's catalog, read with DuckDB and pyarrow in one call."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow.dataset as pads

import helpers
from helpers import EXIT, Source, tree_snapshot

FIXTURE = helpers.REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"


def _age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (t, t))


def ingest(inbox, store, *extra):
    return helpers.run("ingest", inbox, "--out", store, "--settle", "0", *extra)


def test_ingest_adds_new_mice_once_and_catalogs_them(mouse, tmp_path):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    other = mouse("ingest-other", trials=11, neurons=22, frames=33, seed=401)
    shutil.copy(FIXTURE, inbox / FIXTURE.name)
    shutil.copy(FIXTURE, inbox / "same-content-other-name.zip")   # matched by content, not name
    shutil.copy(other, inbox / other.name)
    (inbox / "next-mouse.zip.part").write_bytes(b"downloading")
    (inbox / "broken.zip").write_bytes(b"not a zip at all")
    for p in inbox.iterdir():
        _age(p)
    fresh = inbox / "fresh.zip"
    shutil.copy(FIXTURE, fresh)          # modified just now: still arriving

    proc = ingest(inbox, store)
    assert proc.returncode == 1, helpers.describe_run(proc)          # broken.zip failed...
    assert "2 added" in proc.stdout and "1 failed" in proc.stdout    # ...the others went on
    assert "broken.zip" in proc.stderr
    lines = {l.split()[1].rstrip(":"): l for l in proc.stdout.splitlines() if l.split()[0] in ("added", "skipped", "failed")}
    assert lines[str(inbox / "same-content-other-name.zip")].startswith("skipped")
    assert "already in the store" in lines[str(inbox / "same-content-other-name.zip")]
    assert "still arriving" in lines[str(fresh)]
    assert "download in progress" in lines[str(inbox / "next-mouse.zip.part")]

    datasets = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    assert datasets == sorted(["catalog", "dynamic90001-1-1", Source(other).dataset])

    # One DuckDB call reads the whole catalog; values match the sources.
    rows = duckdb.sql(f"select * from read_parquet('{store}/catalog/*.parquet') order by dataset").fetchall()
    cols = [d[0] for d in duckdb.sql(f"select * from read_parquet('{store}/catalog/*.parquet')").description]
    table = [dict(zip(cols, r)) for r in rows]
    assert [t["dataset"] for t in table] == sorted(["dynamic90001-1-1", Source(other).dataset])
    for t in table:
        src = Source(FIXTURE if t["dataset"] == "dynamic90001-1-1" else other)
        n, N, T = src.shape
        assert (t["n_trials"], t["n_neurons"], t["n_frames"]) == (n, N, T)
        want = {tier: src.tiers.count(tier) for tier in set(src.tiers)}
        assert {d["tier"]: d["trials"] for d in t["tiers"]} == want
        assert t["status"] == "complete" and t["dtype"] == "<f4"
        manifest = helpers.read_json(store / t["dataset"] / "manifest.json")
        assert t["source_checksum"] == manifest["source"]["checksum"]
        assert t["pipeline_hash"] == manifest["pipeline"]["hash"]
    # pyarrow reads the same folder as one dataset.
    assert pads.dataset(store / "catalog", format="parquet").to_table().num_rows == 2

    # Idempotent: a second run adds nothing and changes no dataset.
    before = {k: v for k, v in tree_snapshot(store).items() if not k.startswith(".")}
    again = ingest(inbox, store)
    assert "0 added" in again.stdout, again.stdout
    after = {k: v for k, v in tree_snapshot(store).items() if not k.startswith(".")}
    assert after == before


def test_overlapping_ingest_exits_clearly(tmp_path):
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    store.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        host = socket.gethostname()
        (store / ".ingest.lock").write_text(f"{holder.pid} {host} 0\n")
        proc = ingest(inbox, store)
        assert proc.returncode == 75, helpers.describe_run(proc)
        assert "another ingest is running" in proc.stderr and str(holder.pid) in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # A lock left by a process that is gone is taken over.
    proc = ingest(inbox, store)
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert not (store / ".ingest.lock").exists()
