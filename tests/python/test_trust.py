"""Trust between runs: verify catches any changed byte, the lock skips and re-runs exactly what
it should, and a conversion killed at any moment finishes identically when run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from helpers import EXIT, assert_same_outputs, tree_snapshot

FIXTURE = helpers.REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
NAME = "dynamic90001-1-1"


@pytest.fixture(scope="module")
def converted(ingest_bin, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("trust-store")
    proc = helpers.run("convert", FIXTURE, "--out", store)
    assert proc.returncode == 0, helpers.describe_run(proc)
    return store / NAME


def test_verify_passes_on_a_fresh_dataset(converted):
    proc = helpers.run("verify", converted)
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert proc.stdout.startswith("ok"), proc.stdout
    proc = helpers.run("verify", converted, "--against", FIXTURE)
    assert proc.returncode == 0, helpers.describe_run(proc)
    proc = helpers.run("verify", converted.parent)   # a whole store
    assert proc.returncode == 0, helpers.describe_run(proc)


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


KINDS = [
    "data.zarr/videos/c/0/0/0/0",               # a shard
    "data.zarr/responses/c/0/0/0",               # another array's shard
    "data.zarr/statistics/videos/all/mean/c/0/0/0",
    "data.zarr/videos/zarr.json",                # array metadata
    "data.zarr/zarr.json",                       # group metadata
    "trials.parquet", "neurons.parquet", "behavior.parquet", "pupil_center.parquet",
    "manifest.json", "lock.json",
]


@pytest.mark.parametrize("rel", KINDS)
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_verify_names_every_damaged_file(converted, tmp_path, rel, where):
    ds = tmp_path / NAME
    shutil.copytree(converted, ds)
    assert (ds / rel).is_file(), f"fixture layout changed: {rel} missing"
    _flip(ds / rel, where)
    proc = helpers.run("verify", ds)
    assert proc.returncode == 1, helpers.describe_run(proc)
    assert "panicked" not in proc.stderr
    assert str(ds / rel) in proc.stderr, f"verify did not name {rel}:\n{proc.stderr}"


def test_verify_against_another_source_fails(converted, mouse, tmp_path):
    other = mouse("trust-other", trials=11, neurons=20, frames=30, seed=301)
    proc = helpers.run("verify", converted, "--against", other)
    assert proc.returncode == 1, helpers.describe_run(proc)
    assert str(other) in proc.stderr


def test_verify_finds_missing_and_extra_files(converted, tmp_path):
    ds = tmp_path / NAME
    shutil.copytree(converted, ds)
    (ds / "behavior.parquet").unlink()
    (ds / "stray.txt").write_text("x")
    proc = helpers.run("verify", ds)
    assert proc.returncode == 1
    assert "behavior.parquet: missing" in proc.stderr and "stray.txt: not listed" in proc.stderr


def _default_pipeline() -> str:
    return (helpers.REPO / "pipelines" / "sensorium2023.yaml").read_text()


def test_unchanged_run_is_up_to_date_and_touches_nothing(converted):
    before = tree_snapshot(converted.parent)
    started = time.monotonic()
    proc = helpers.run("convert", FIXTURE, "--out", converted.parent)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert "up to date" in proc.stdout
    assert tree_snapshot(converted.parent) == before
    plan = helpers.run("plan", FIXTURE, "--out", converted.parent)
    assert plan.returncode == 0 and "(up to date)" in plan.stdout
    assert " run " not in plan.stdout, plan.stdout
    assert elapsed < 30  # sanity only; speed is measured by the benchmark, not here


@pytest.mark.parametrize("edit, reruns", [
    (("shard_shape: [4, full, full]", "shard_shape: [2, full, full]"), {"responses", "trials"}),
    (("    exclude: []", '    exclude: ["*/all/std"]'), {"statistics"}),
    (("columns: [x, y]", "columns: [px, py]"), {"pupil_center"}),
])
def test_changed_stage_reruns_it_and_its_dependents_only(converted, tmp_path, edit, reruns):
    store = tmp_path / "store"
    shutil.copytree(converted, store / NAME)
    text = _default_pipeline()
    assert edit[0] in text
    text = text.replace(edit[0], edit[1], 1).replace("contract: sensorium2023\n", "")
    pipeline = tmp_path / "edited.yaml"
    pipeline.write_text(text)

    plan = helpers.run("plan", FIXTURE, "--out", store, "--pipeline", pipeline)
    assert plan.returncode == 0, helpers.describe_run(plan)
    planned_runs = {line.split()[0] for line in plan.stdout.splitlines()[1:] if line.split()[2] == "run"}
    assert planned_runs == reruns, plan.stdout
    dry = helpers.run("convert", FIXTURE, "--out", store, "--pipeline", pipeline, "--dry-run")
    assert dry.stdout == plan.stdout

    proc = helpers.run("convert", FIXTURE, "--out", store, "--pipeline", pipeline)
    assert proc.returncode == 0, helpers.describe_run(proc)
    ran = {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.split()[2] == "ran"}
    assert ran == reruns, proc.stdout
    # Incremental output equals a clean conversion with the edited pipeline.
    clean = tmp_path / "clean"
    proc = helpers.run("convert", FIXTURE, "--out", clean, "--pipeline", pipeline)
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert_same_outputs(store / NAME, clean / NAME)
    assert helpers.run("verify", store / NAME).returncode == 0
    # And running it once more is a no-op.
    again = helpers.run("convert", FIXTURE, "--out", store, "--pipeline", pipeline)
    assert "up to date" in again.stdout


def test_force_reruns_everything(converted, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(converted, store / NAME)
    plan = helpers.run("plan", FIXTURE, "--out", store, "--force")
    assert all(line.split()[2] == "run" for line in plan.stdout.splitlines()[1:]), plan.stdout
    proc = helpers.run("convert", FIXTURE, "--out", store, "--force")
    assert proc.returncode == 0
    assert_same_outputs(store / NAME, converted)


# ---------------------------------------------------------------- crash safety

KILL_POINTS = 20


@pytest.fixture(scope="module")
def bulky(mouse):
    # Big enough that a conversion lasts a second or two, so kills land in every stage.
    return mouse("trust-bulky", trials=24, neurons=300, frames=240, seed=302)


def test_sigkill_at_any_point_then_rerun_gives_identical_output(bulky, tmp_path):
    clean = tmp_path / "clean"
    started = time.monotonic()
    proc = helpers.run("convert", bulky, "--out", clean, "--threads", "1")
    duration = time.monotonic() - started
    assert proc.returncode == 0, helpers.describe_run(proc)
    name = next(p.name for p in clean.iterdir() if p.name != "catalog")
    outcomes = {"before publish": 0, "after publish": 0}
    for k in range(KILL_POINTS):
        store = tmp_path / f"kill{k}"
        delay = duration * (k + 0.5) / KILL_POINTS
        cmd = [str(helpers.binary()), "convert", str(bulky), "--out", str(store), "--threads", "1"]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        ds = store / name
        # Never a dataset that looks complete but is not.
        if ds.exists():
            assert (ds / "manifest.json").is_file(), f"kill at {delay:.2f}s left {ds} without a manifest"
            assert_same_outputs(ds, clean / name)
            outcomes["after publish"] += 1
        else:
            outcomes["before publish"] += 1
        rerun = helpers.run("convert", str(bulky), "--out", store)
        assert rerun.returncode == 0, f"rerun after kill at {delay:.2f}s\n" + helpers.describe_run(rerun)
        assert_same_outputs(ds, clean / name)
        leftovers = sorted(p.name for p in store.iterdir())
        assert leftovers == sorted([name, "catalog"]), f"stray files after the rerun: {leftovers}"
        assert helpers.run("verify", ds).returncode == 0
    assert outcomes["before publish"] >= KILL_POINTS // 2, outcomes


def test_sigkill_while_publishing_a_replacement_leaves_old_or_new_never_half(bulky, tmp_path):
    """Kills in the last part of a `--force` replacement, where the manifest, lock, publish and
    catalog row are written: the name shows the old dataset or the new one, complete, or (only
    between publish's two renames) nothing, with the old one set aside for the rerun to restore;
    the rerun finishes, and the catalog row describes what is published."""
    clean = tmp_path / "clean"
    assert helpers.run("convert", bulky, "--out", clean, "--threads", "1").returncode == 0
    name = next(p.name for p in clean.iterdir() if p.name not in ("catalog",) and not p.name.startswith("."))
    text = helpers.run("default-pipeline").stdout
    harder = tmp_path / "harder.yaml"
    harder.write_text(text.replace("{codec: zstd, level: 1}", "{codec: zstd, level: 2}"))
    store = tmp_path / "timing"
    shutil.copytree(clean, store)
    started = time.monotonic()
    timed = helpers.run("convert", bulky, "--out", store, "--threads", "1", "--force",
                        "--pipeline", harder)
    assert timed.returncode == 0, helpers.describe_run(timed)
    duration = time.monotonic() - started
    old_hash = json.loads((clean / name / "manifest.json").read_text())["pipeline"]["hash"]
    new_hash = json.loads((store / name / "manifest.json").read_text())["pipeline"]["hash"]
    seen = set()
    for k in range(10):
        store = tmp_path / f"replace{k}"
        shutil.copytree(clean, store)
        delay = duration * (0.85 + 0.15 * (k + 0.5) / 10)
        child = subprocess.Popen([str(helpers.binary()), "convert", str(bulky), "--out", str(store),
                                  "--threads", "1", "--force", "--pipeline", str(harder)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        ds = store / name
        if ds.exists():
            manifest = json.loads((ds / "manifest.json").read_text())
            assert manifest["pipeline"]["hash"] in (old_hash, new_hash)
            seen.add("new" if manifest["pipeline"]["hash"] == new_hash else "old")
            assert helpers.run("verify", ds).returncode == 0, f"kill at {delay:.2f}s"
        else:
            assert (store / f".{name}.replaced" / "manifest.json").is_file(), \
                f"kill at {delay:.2f}s: no dataset and nothing set aside"
            seen.add("between renames")
        rerun = helpers.run("convert", bulky, "--out", store, "--threads", "1", "--pipeline", harder)
        assert rerun.returncode == 0, helpers.describe_run(rerun)
        manifest = json.loads((ds / "manifest.json").read_text())
        assert manifest["pipeline"]["hash"] == new_hash
        assert helpers.run("verify", ds).returncode == 0
        import pyarrow.parquet as pq
        row = pq.read_table(store / "catalog" / f"{name}.parquet").to_pylist()[0]
        assert row["pipeline_hash"] == new_hash, f"kill at {delay:.2f}s: stale catalog row"
    assert seen, "no kill landed"


def test_resume_reuses_finished_stages(bulky, tmp_path):
    """A run killed after its first stages resumes them instead of starting over."""
    store = tmp_path / "store"
    cmd = [str(helpers.binary()), "convert", str(bulky), "--out", str(store), "--threads", "1"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = list(store.glob(".*.partial/.progress.json")) if store.exists() else []
        if partial and "responses" in partial[0].read_text():
            staging = partial[0].parent
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if staging is None:
        pytest.skip("the conversion finished before two stages were recorded; machine too fast for this probe")
    rerun = helpers.run("convert", bulky, "--out", store)
    assert rerun.returncode == 0, helpers.describe_run(rerun)
    lines = {l.split()[0]: l for l in rerun.stdout.splitlines()[2:]}
    assert "reused (partial)" in lines["videos"], rerun.stdout
    assert "reused (partial)" in lines["responses"], rerun.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_cleanly_and_rerun_finishes(bulky, tmp_path, sig):
    clean = tmp_path / "clean"
    started = time.monotonic()
    assert helpers.run("convert", bulky, "--out", clean, "--threads", "1").returncode == 0
    duration = time.monotonic() - started
    name = next(p.name for p in clean.iterdir() if p.name != "catalog")
    store = tmp_path / "store"
    cmd = [str(helpers.binary()), "convert", str(bulky), "--out", str(store), "--threads", "1"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(duration * 0.3)
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert child.returncode == 130, (child.returncode, err)
    assert "interrupted" in err and "panicked" not in err
    assert not (store / name).exists(), "an interrupted run published a dataset"
    rerun = helpers.run("convert", bulky, "--out", store)
    assert rerun.returncode == 0, helpers.describe_run(rerun)
    assert_same_outputs(store / name, clean / name)
    assert sorted(p.name for p in store.iterdir()) == sorted([name, "catalog"])


def test_damaged_output_is_not_reused(converted, tmp_path):
    """An incremental run checks the files it would reuse against the lock; a damaged one
    makes its stage run again, so the damage never reaches the new dataset."""
    store = tmp_path / "store"
    shutil.copytree(converted, store / NAME)
    _flip(store / NAME / "data.zarr/videos/c/0/0/0/0")
    text = _default_pipeline().replace("columns: [x, y]", "columns: [px, py]", 1).replace("contract: sensorium2023\n", "")
    pipeline = tmp_path / "edited.yaml"
    pipeline.write_text(text)
    proc = helpers.run("convert", FIXTURE, "--out", store, "--pipeline", pipeline)
    assert proc.returncode == 0, helpers.describe_run(proc)
    ran = {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.split()[2] == "ran"}
    assert ran == {"videos", "pupil_center"}, proc.stdout
    assert "does not match its recorded hash" in proc.stderr
    assert helpers.run("verify", store / NAME, "--against", FIXTURE).returncode == 0
