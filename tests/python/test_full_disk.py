"""A full disk at any point of a conversion: a size-limited tmpfs (root only) that fills up in
each stage in turn, then in the tables, the manifest and the catalog. Every time: exit 74 naming
the file, the space free and the space the run needs; nothing published; the store's other
dataset untouched; and the same command, once space is freed, resumes and publishes a dataset
that verifies. `plan` shows the space a run needs, and `convert` refuses to start on a file
system that clearly lacks it unless given `--no-space-check`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers

PAGE = 4096


def pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs: the full-disk tests did NOT run")
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk tests "
                    "did NOT run")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def stage_usage(dataset: Path) -> list[tuple[str, int]]:
    """Bytes (in whole pages, as tmpfs counts them) each stage's files take, in stage order,
    then the files written at the end."""
    lock = json.loads((dataset / "lock.json").read_text())
    manifest = json.loads((dataset / "manifest.json").read_text())
    size = {o["path"]: o["bytes"] for o in manifest["outputs"]}
    usage, seen = [], set()
    for stage in lock["stages"]:
        usage.append((stage["id"], sum(pages(size[f]) for f in stage["outputs"])))
        seen.update(stage["outputs"])
    groups = sum(pages(b) for p, b in size.items() if p not in seen)
    records = sum(pages((dataset / f).stat().st_size) for f in ("manifest.json", "lock.json",
                                                                 "run.json"))
    usage.append(("end", groups + records))
    return usage


def tree_hashes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_disk_that_fills_up_anywhere_publishes_nothing_and_the_rerun_resumes(
        tmpfs, mouse, tmp_path):
    mount, resize = tmpfs
    source = mouse("full-disk", trials=20, neurons=260, frames=200, seed=911)
    name = helpers.dataset_name(source.name.removesuffix(".zip"))
    reference = tmp_path / "reference"
    done = helpers.run("convert", source, "--out", reference)
    assert done.returncode == 0, helpers.describe_run(done)
    usage = stage_usage(reference / name)
    # The store holds another dataset, which nothing may touch.
    other = helpers.REPO / "fixtures" / \
        "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
    store = mount / "store"
    first = helpers.run("convert", other, "--out", store)
    assert first.returncode == 0, helpers.describe_run(first)
    before = tree_hashes(store / "dynamic90001-1-1")
    taken = int(subprocess.run(["df", "-B1", "--output=used", str(mount)], capture_output=True,
                               text=True, check=True).stdout.split()[-1])
    failed_in = []
    reused_stages = 0
    done_so_far = 0
    for stage, stage_bytes in usage:
        if stage_bytes == 0:
            continue
        limit = taken + done_so_far + max(PAGE, stage_bytes // 2)
        done_so_far += stage_bytes
        resize(pages(limit))
        full = helpers.run("convert", source, "--out", store, "--no-space-check")
        assert full.returncode == 74, f"{stage}: " + helpers.describe_run(full)
        assert "disk is full" in full.stderr and "free on the file system of" in full.stderr, \
            helpers.describe_run(full)
        assert re.search(r"the run needs about [\d.]+ \w+", full.stderr), full.stderr
        assert not (store / name / "manifest.json").exists(), f"{stage}: published on a full disk"
        assert tree_hashes(store / "dynamic90001-1-1") == before, f"{stage}: touched another dataset"
        failed_in.append((stage, full.stderr.splitlines()[0]))
        # Freed space: the same command resumes, reusing the stages finished before the disk
        # filled up from the staging folder the failed run kept.
        resize(64 << 20)
        again = helpers.run("convert", source, "--out", store)
        assert again.returncode == 0, f"{stage}: " + helpers.describe_run(again)
        finished = re.findall(r"stage finished stage=(\S+) action=ran", full.stderr)
        resumed = re.findall(r"^  (\S+) +\S+ +reused \(partial\)", again.stdout, re.M)
        assert set(finished) <= set(resumed), \
            f"{stage}: finished {finished}, reused {resumed}\n{again.stdout}\n{full.stderr}"
        reused_stages += len(resumed)
        assert helpers.run("verify", store).returncode == 0
        helpers.assert_same_outputs(store / name, reference / name)
        shutil.rmtree(store / name)
        for catalog_row in (store / "catalog").glob(f"{name}*"):
            catalog_row.unlink()
    stages = [s for s, _ in failed_in]
    assert len(stages) >= 5, failed_in
    assert reused_stages >= len(stages), f"too few stages resumed: {reused_stages}"
    # The failures name files of the stage that was running.
    assert any("videos" in line for s, line in failed_in if s == "videos"), failed_in


def test_plan_shows_the_space_and_convert_refuses_a_disk_too_small(tmpfs, mouse):
    mount, resize = tmpfs
    source = mouse("full-disk", trials=20, neurons=260, frames=200, seed=911)
    store = mount / "store"
    plan = helpers.run("plan", source, "--out", store)
    assert plan.returncode == 0, helpers.describe_run(plan)
    shown = re.search(r"disk: needs ~([\d.]+) (\w+) of ([\d.]+) (\w+) free", plan.stdout)
    assert shown, plan.stdout
    resize(256 * 1024)
    refused = helpers.run("convert", source, "--out", store)
    assert refused.returncode == 74, helpers.describe_run(refused)
    assert "not enough space: the run needs about" in refused.stderr, refused.stderr
    assert "--no-space-check" in refused.stderr
    assert not any(store.glob(".*.partial")), "a refused run left a staging folder"


def inbox_of(tmp_path: Path, mouse, sizes: dict[int, int]) -> Path:
    """An inbox of generated mice: animal id -> trials (sorted by animal id, as ingest goes)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for animal, trials in sizes.items():
        source = mouse(f"full-inbox-{animal}-{trials}", trials=trials, neurons=260, frames=200,
                       seed=animal, animal=animal)
        shutil.copy(source, inbox / source.name)
    return inbox


def test_an_ingest_stops_at_a_full_disk_and_the_next_one_resumes(tmpfs, mouse, tmp_path):
    mount, resize = tmpfs
    inbox = inbox_of(tmp_path, mouse, {921: 20, 922: 20})
    store = mount / "store"
    resize(2 << 20)
    args = ("ingest", inbox, "--out", store, "--min-age", "0", "--settle", "0")
    full = helpers.run(*args, "--no-space-check")
    assert full.returncode == 74, helpers.describe_run(full)
    assert "the disk is full" in full.stderr, full.stderr
    assert re.search(r"^failed +\S*dynamic921\S*: .*No space left", full.stdout, re.M), \
        full.stdout
    assert re.search(r"^skipped +\S*dynamic922\S*: not tried: the store's disk is full",
                     full.stdout, re.M), full.stdout
    assert (store / ".dynamic921-1-1.partial").is_dir(), "the staging folder was not kept"
    assert not (store / "dynamic921-1-1").exists()
    # Room for both by the space check's upper bound (each run needs about 55 MiB by it).
    resize(160 << 20)
    again = helpers.run(*args)
    assert again.returncode == 0, helpers.describe_run(again)
    assert "2 added, 0 skipped, 0 failed" in again.stdout, again.stdout
    assert helpers.run("verify", store).returncode == 0


def test_an_ingest_goes_on_past_a_source_too_big_for_the_disk(tmpfs, mouse, tmp_path):
    """The space check refusing one source is that source's failure: a smaller one may fit."""
    mount, resize = tmpfs
    inbox = inbox_of(tmp_path, mouse, {923: 20, 924: 3})
    store = mount / "store"
    resize(24 << 20)
    done = helpers.run("ingest", inbox, "--out", store, "--min-age", "0", "--settle", "0")
    assert done.returncode == 1, helpers.describe_run(done)
    assert re.search(r"^failed +\S*dynamic923\S*: .*not enough space", done.stdout, re.M), \
        done.stdout
    assert re.search(r"^added +\S*dynamic924\S* -> dynamic924-1-1", done.stdout, re.M), \
        done.stdout
    assert helpers.run("verify", store).returncode == 0


def test_the_space_check_counts_a_kept_staging_folder_as_free(tmpfs, mouse):
    """After a full disk the staging folder stays; the rerun removes what it will not reuse
    before it writes, so the space check counts those files as free."""
    mount, resize = tmpfs
    source = mouse("full-disk", trials=20, neurons=260, frames=200, seed=911)
    store = mount / "store"
    plan = helpers.run("plan", source, "--out", store)
    shown = re.search(r"disk: needs ~([\d.]+) (\w+) of", plan.stdout)
    assert shown, helpers.describe_run(plan)
    whole = float(shown[1]) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[shown[2]]
    resize(4 << 20)
    full = helpers.run("convert", source, "--out", store, "--no-space-check")
    assert full.returncode == 74 and "the disk is full" in full.stderr, helpers.describe_run(full)
    staging = next(store.glob(".*.partial"))
    kept = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    assert kept > 1 << 20, kept
    # Free: less than the whole run needs, more than it needs once the kept files are gone.
    used = int(subprocess.run(["df", "-B1", "--output=used", str(mount)], capture_output=True,
                              text=True, check=True).stdout.split()[-1])
    resize(pages(used + int(whole) - kept // 2))
    again = helpers.run("convert", source, "--out", store)
    assert again.returncode == 0, helpers.describe_run(again)
    assert helpers.run("verify", store).returncode == 0


def test_a_shard_task_refuses_a_disk_too_small_for_its_part(tmpfs, mouse):
    """A task checks the space its own part needs, not the whole run's, before writing any of
    it; given the space, the same command runs, and `finalize` publishes a dataset that
    verifies."""
    mount, resize = tmpfs
    source = mouse("full-disk-shard", trials=20, neurons=260, frames=200, seed=912)
    store = mount / "store"
    resize(256 * 1024)
    task = ["convert", source, "--out", store, "--shard", "1/2"]
    refused = helpers.run(*task)
    assert refused.returncode == 74, helpers.describe_run(refused)
    assert "not enough space: the run needs about" in refused.stderr, refused.stderr
    written = [p for p in store.rglob("*") if p.is_file() and ".zarr" in str(p)]
    assert written == [], f"a refused task wrote shard files: {written}"
    assert not list(store.rglob("receipts/*.json"))
    # Room for half the trials but not for all: the first task checks its own half and runs.
    plan = helpers.run("plan", source, "--out", store)
    shown = re.search(r"disk: needs ~([\d.]+) (\w+) of", plan.stdout)
    assert shown, helpers.describe_run(plan)
    whole = float(shown[1]) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[shown[2]]
    resize(pages(int(whole * 0.75)))
    first = helpers.run("convert", source, "--out", store, "--shard", "0/2")
    assert first.returncode == 0, helpers.describe_run(first)
    resize(64 * 1024 * 1024)
    done = helpers.run("convert", source, "--out", store, "--shard", "1/2")
    assert done.returncode == 0, helpers.describe_run(done)
    name = helpers.dataset_name(source.stem)
    final = helpers.run("finalize", store / name)
    assert final.returncode == 0, helpers.describe_run(final)
    assert helpers.run("verify", store / name).returncode == 0


def test_a_read_only_store_is_refused_clearly_and_nothing_changes(tmpfs, mouse):
    mount, _ = tmpfs
    store = mount / "store"
    fixture = helpers.REPO / "fixtures" / \
        "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
    first = helpers.run("convert", fixture, "--out", store)
    assert first.returncode == 0, helpers.describe_run(first)
    before = tree_hashes(store)
    source = mouse("full-disk", trials=20, neurons=260, frames=200, seed=911)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        proc = helpers.run("convert", source, "--out", store)
        assert proc.returncode == 74, helpers.describe_run(proc)
        assert "read-only file system" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    assert tree_hashes(store) == before
    again = helpers.run("convert", source, "--out", store)
    assert again.returncode == 0, helpers.describe_run(again)
    assert helpers.run("verify", store).returncode == 0
