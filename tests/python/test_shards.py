"""Sharded runs: `convert --shard K/N` tasks plus `finalize` give the single-process dataset,
byte for byte; missing, damaged, foreign or stale parts are refused loudly and nothing is
published. (The same flow on a real SLURM cluster: test_slurm.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import pyarrow.dataset as pads

import helpers
from helpers import EXIT, Source, assert_same_outputs, tree_snapshot

TEMPFAIL = 75
# 40 trials: three 16-trial blocks (videos shard 16 trials, responses 4), the last one short.
SHARDED = dict(trials=40, neurons=30, frames=30, seed=601)


def run_env(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "JOB_COMPLETION_INDEX"))}
    full.update(env or {})
    return subprocess.run([str(helpers.binary()), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full, stdin=subprocess.DEVNULL)


def shard_task(src, store, shard, *extra, env=None):
    return run_env("convert", src, "--out", store, "--shard", shard, *extra, env=env)


def ok(proc):
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert "panicked" not in proc.stderr
    return proc


def fail(proc, code):
    assert proc.returncode == code, helpers.describe_run(proc)
    assert proc.stderr.count("error:") == 1 and "hint:" in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def single(mouse, tmp_path_factory):
    """The sharded mouse converted by one process: the reference."""
    src = mouse("sharded", **SHARDED)
    store = tmp_path_factory.mktemp("single")
    ok(helpers.run("convert", src, "--out", store))
    return src, store / Source(src).dataset


def published(store: Path) -> list[str]:
    """What the store holds, a sharded run's own lock aside: until `finalize` publishes, the run
    holds its dataset's name (`.<name>.lock`, checked to be the run's)."""
    names = sorted(p.name for p in store.iterdir())
    for lock in (store / n for n in names if n.endswith(".lock")):
        record = json.loads(lock.read_text())
        assert record.get("run"), f"{lock} is held by {record}, not by the sharded run"
    return [n for n in names if not n.endswith(".lock")]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_then_finalize_equal_a_single_process_run(single, tmp_path, count):
    src, reference = single
    store = tmp_path / "store"
    name = Source(src).dataset
    # Tasks out of order and on different thread counts: the result must not care.
    for k in reversed(range(count)):
        out = ok(shard_task(src, store, f"{k}/{count}", "--threads", str(1 + k % 2))).stdout
        assert f"shard {k}/{count}" in out
    assert not (store / name).exists(), "a shard task published the dataset"
    receipts = sorted((store / f".{name}.shards" / "receipts").iterdir())
    assert len(receipts) == count
    ranges = [json.loads(r.read_text())["trials"] for r in receipts]
    assert ranges[0]["start"] == 0 and ranges[-1]["end"] == 40
    assert all(a["end"] == b["start"] for a, b in zip(ranges, ranges[1:]))
    assert all(r["start"] % 16 == 0 for r in ranges), "parts must be whole 16-trial blocks"

    fin = ok(helpers.run("finalize", store / name))
    assert "reused (shards)" in fin.stdout
    assert published(store) == ["catalog", name], "the shards folder must be gone"
    assert_same_outputs(store / name, reference)
    ok(helpers.run("verify", store / name, "--against", src))
    # The catalog row is the single run's.
    row = pads.dataset(store / "catalog", format="parquet").to_table().to_pylist()
    assert [r["dataset"] for r in row] == [name] and row[0]["n_trials"] == 40

    again = ok(helpers.run("finalize", store / name))
    assert "no sharded run to finalize" in again.stdout


def test_concurrent_tasks(single, tmp_path):
    """Tasks started together share the folder safely (one creates job.json, all write)."""
    src, reference = single
    store = tmp_path / "store"
    procs = [subprocess.Popen([str(helpers.binary()), "-q", "convert", str(src), "--out",
                               str(store), "--shard", f"{k}/3", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    name = Source(src).dataset
    ok(helpers.run("finalize", store / name))
    assert_same_outputs(store / name, reference)


def test_missing_and_damaged_shards_are_named_and_resubmission_repairs(single, tmp_path):
    src, reference = single
    store = tmp_path / "store"
    name = Source(src).dataset
    shards = store / f".{name}.shards"
    ok(shard_task(src, store, "0/3"))
    ok(shard_task(src, store, "2/3"))

    proc = fail(helpers.run("finalize", store / name), TEMPFAIL)
    assert "shard 1/3: no receipt" in proc.stderr
    assert published(store) == [f".{name}.shards"], "nothing may be published"

    ok(shard_task(src, store, "1/3"))
    victim = next(p for p in sorted((shards / "data.zarr" / "responses").rglob("*"))
                  if p.is_file() and p.name != "zarr.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rel = victim.relative_to(shards).as_posix()
    receipts = {json.loads(r.read_text())["shard"]["index"]: r.read_text()
                for r in (shards / "receipts").iterdir()}
    owner = next(k for k, text in receipts.items() if rel in text)
    proc = fail(helpers.run("finalize", store / name), TEMPFAIL)
    assert f"shard {owner}/3: {rel} is missing or does not match its receipt" in proc.stderr
    assert published(store) == [f".{name}.shards"]

    # Resubmitting the damaged part redoes it; the intact ones are left alone.
    before = tree_snapshot(shards)
    for k in range(3):
        out = ok(shard_task(src, store, f"{k}/3")).stdout
        assert ("already converted" in out) == (k != owner), out
    after = tree_snapshot(shards)
    unchanged = [f for f in before if f.startswith("data.zarr") and before[f][1] == after[f][1]]
    assert rel not in unchanged and len(unchanged) > 0
    ok(helpers.run("finalize", store / name))
    assert_same_outputs(store / name, reference)


def test_a_damaged_receipt_is_refused(single, tmp_path):
    src, _ = single
    store = tmp_path / "store"
    name = Source(src).dataset
    for k in range(2):
        ok(shard_task(src, store, f"{k}/2"))
    receipt = store / f".{name}.shards" / "receipts" / "0001-of-0002.json"
    text = json.loads(receipt.read_text())
    text["trials"]["start"] = 0          # claims trials it did not convert
    receipt.write_text(json.dumps(text))
    proc = fail(helpers.run("finalize", store / name), TEMPFAIL)
    assert "shard 1/2: receipt" in proc.stderr and "checksum" in proc.stderr


def test_tasks_of_another_run_are_refused(single, mouse, tmp_path):
    src, _ = single
    store = tmp_path / "store"
    name = Source(src).dataset
    ok(shard_task(src, store, "0/3"))
    proc = fail(shard_task(src, store, "1/4"), EXIT["exists"])
    assert "split in 3 shards, this task says 4" in proc.stderr
    edited = tmp_path / "edited.yaml"
    edited.write_text(helpers.run("default-pipeline").stdout.replace("level: 1", "level: 2"))
    proc = fail(shard_task(src, store, "1/3", "--pipeline", edited), EXIT["exists"])
    assert "another pipeline" in proc.stderr
    # Another mouse under the same name.
    other = mouse("sharded-other", **dict(SHARDED, seed=602))
    proc = fail(shard_task(other, store, "1/3", "--name", name), EXIT["exists"])
    assert "another source" in proc.stderr


def test_finalize_refuses_a_changed_source(single, mouse, tmp_path):
    src, _ = single
    store = tmp_path / "store"
    name = Source(src).dataset
    for k in range(3):
        ok(shard_task(src, store, f"{k}/3"))
    other = mouse("sharded-other", **dict(SHARDED, seed=602))
    proc = fail(helpers.run("finalize", store / name, "--source", other), EXIT["data"])
    assert "not the one the shards were converted from" in proc.stderr
    assert published(store) == [f".{name}.shards"]
    ok(helpers.run("finalize", store / name, "--source", src))


def test_finalize_without_shards(tmp_path):
    proc = fail(helpers.run("finalize", tmp_path / "store" / "nobody"), EXIT["data"])
    assert "no sharded run of nobody" in proc.stderr


def test_shard_auto_from_slurm_and_kubernetes(single, tmp_path):
    src, reference = single
    store = tmp_path / "store"
    name = Source(src).dataset
    # SLURM array `--array=1-5:2`: tasks 1, 3, 5 are parts 0, 1, 2 of 3.
    for task in (1, 3):
        out = ok(shard_task(src, store, "auto", env={
            "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1",
            "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"})).stdout
        assert f"shard {(task - 1) // 2}/3" in out
    # Kubernetes Indexed Job: the index from JOB_COMPLETION_INDEX, the count given.
    out = ok(shard_task(src, store, "auto/3", env={"JOB_COMPLETION_INDEX": "2"})).stdout
    assert "shard 2/3" in out
    ok(helpers.run("finalize", store / name))
    assert_same_outputs(store / name, reference)


@pytest.mark.parametrize("shard,env,message", [
    ("auto", {}, "needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"),
    ("auto/3", {}, "needs SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX"),
    ("auto/3", {"JOB_COMPLETION_INDEX": "3"}, "not below 3"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "not a whole number"),
])
def test_shard_auto_outside_an_array_is_a_usage_error(single, tmp_path, shard, env, message):
    src, _ = single
    proc = fail(shard_task(src, tmp_path / "store", shard, env=env), EXIT["usage"])
    assert message in proc.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("bad", ["3/3", "1/0", "x/2", "2", "auto/0", "-1/3"])
def test_bad_shard_syntax(single, tmp_path, bad):
    src, _ = single
    proc = run_env("convert", src, "--out", tmp_path / "store", f"--shard={bad}")
    assert proc.returncode == EXIT["usage"], helpers.describe_run(proc)
    assert "--shard" in proc.stderr


def test_dry_run_shows_the_part(single, tmp_path):
    src, _ = single
    out = ok(shard_task(src, tmp_path / "store", "2/3", "--dry-run")).stdout
    assert "shard 2/3: trials 32..40 (parts are whole blocks of 16 trials)" in out
    assert not (tmp_path / "store").exists()


def test_shard_of_an_up_to_date_dataset_does_nothing(single, tmp_path):
    src, _ = single
    store = tmp_path / "store"
    ok(helpers.run("convert", src, "--out", store))
    before = tree_snapshot(store)
    out = ok(shard_task(src, store, "1/3")).stdout
    assert "up to date" in out
    assert tree_snapshot(store) == before


def test_more_tasks_than_blocks(single, tmp_path):
    """Eight tasks for three blocks: five convert nothing, and say so; the result is the same."""
    src, reference = single
    store = tmp_path / "store"
    name = Source(src).dataset
    empty = 0
    for k in range(8):
        out = ok(shard_task(src, store, f"{k}/8")).stdout
        empty += "no trials in this part" in out
    assert empty == 5
    ok(helpers.run("finalize", store / name))
    assert_same_outputs(store / name, reference)


def test_everything_variant_sharded(mouse, tmp_path):
    """Big-endian float64, Fortran order, junk, extra meta and statistics: still identical."""
    from conftest import VARIANTS
    src = mouse("everything-sharded", **dict(VARIANTS["everything"], trials=40, seed=603))
    single_store, store = tmp_path / "single", tmp_path / "sharded"
    ok(helpers.run("convert", src, "--out", single_store))
    name = Source(src).dataset
    for k in range(2):
        ok(shard_task(src, store, f"{k}/2"))
    ok(helpers.run("finalize", store / name))
    assert_same_outputs(store / name, single_store / name)
    ok(helpers.run("verify", store))


# A task killed at any moment (node failure, time limit) is simply resubmitted.
KILL_POINTS = 8


def test_a_task_killed_at_any_point_is_resubmitted(mouse, tmp_path):
    import signal
    import time
    bulky = mouse("shards-bulky", trials=48, neurons=300, frames=240, seed=604)
    name = Source(bulky).dataset
    single_store = tmp_path / "single"
    ok(helpers.run("convert", bulky, "--out", single_store))
    # The reference task's duration sets the kill points.
    probe = tmp_path / "probe"
    started = time.monotonic()
    ok(shard_task(bulky, probe, "1/2", "--threads", "1"))
    duration = time.monotonic() - started
    killed_before_receipt = 0
    for k in range(KILL_POINTS):
        store = tmp_path / f"kill{k}"
        ok(shard_task(bulky, store, "0/2"))
        if k % 2:       # an earlier, complete run of the same part: the kill hits a rewrite
            ok(shard_task(bulky, store, "1/2"))
            (store / f".{name}.shards" / "receipts" / "0001-of-0002.json").unlink()
        child = subprocess.Popen([str(helpers.binary()), "convert", str(bulky), "--out", str(store),
                                  "--shard", "1/2", "--threads", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * (k + 0.5) / KILL_POINTS)
        child.send_signal(signal.SIGKILL)
        child.wait()
        receipt = store / f".{name}.shards" / "receipts" / "0001-of-0002.json"
        if not receipt.exists():
            killed_before_receipt += 1
            proc = fail(helpers.run("finalize", store / name), TEMPFAIL)
            assert "shard 1/2: no receipt" in proc.stderr
        ok(shard_task(bulky, store, "1/2"))
        ok(helpers.run("finalize", store / name))
        assert_same_outputs(store / name, single_store / name)
        assert published(store) == ["catalog", name]
    assert killed_before_receipt >= KILL_POINTS // 2
