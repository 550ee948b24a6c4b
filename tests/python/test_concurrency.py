"""Many writers, one store: whatever runs at the same time, a dataset name has one writer, and
the store stays one that `verify` accepts, with one catalog row per dataset.

Each round starts four processes at once on the same dataset name, mixing `convert`, `ingest`
and, every other round, the `finalize` of a sharded run whose tasks are done (the other rounds
have a `convert --wait` instead, and no run holding the name). Each must end cleanly: published,
found up to date, or refused with exit 75 naming who holds the name (host, pid, since,
command). Then the store must verify, and the catalog hold exactly one row per dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq

import helpers

FIXTURE = helpers.REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
NAME = "dynamic90001-1-1"
ROUNDS = 8


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([str(helpers.binary())] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def catalog_rows(store: Path) -> list[str]:
    rows = []
    for f in sorted((store / "catalog").glob("*.parquet")):
        rows += pq.read_table(f).column("dataset").to_pylist()
    return rows


def assert_refusal_names_holder(proc: subprocess.CompletedProcess) -> None:
    assert re.search(r"another writer holds dataset \S+: \w[\w ]* \(pid \d+ on \S+, since "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\): \S+ (convert|ingest|finalize) ", proc.stderr), \
        helpers.describe_run(proc)


def published(proc: subprocess.CompletedProcess) -> bool:
    """Whether this process published the dataset (as opposed to finding it up to date)."""
    return bool(re.search(r"^(converted|finalized) ", proc.stdout, re.M)) or \
        bool(re.search(r"^added ", proc.stdout, re.M))


def test_writers_of_one_name_meet_cleanly_round_after_round(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(FIXTURE, inbox / FIXTURE.name)
    for round_ in range(ROUNDS):
        store = tmp_path / f"store-{round_}"
        racers = [("convert", FIXTURE, "--out", store),
                  ("ingest", inbox, "--out", store, "--min-age", "0", "--settle", "0"),
                  ("convert", FIXTURE, "--out", store, "--threads", "1")]
        if round_ % 2:
            # A sharded run whose tasks are done holds the name: its finalize races the others.
            for k in range(2):
                task = helpers.run("convert", FIXTURE, "--out", store, "--shard", f"{k}/2")
                assert task.returncode == 0, helpers.describe_run(task)
            racers.append(("finalize", store / NAME))
        else:
            # Nobody holds the name: the conversions race for it, one of them waiting.
            racers.append(("convert", FIXTURE, "--out", store, "--wait=120s"))
        # Rotate who starts first.
        racers = racers[round_ % 4:] + racers[:round_ % 4]
        procs = [finish(p) for p in [start(*r) for r in racers]]
        publishers = 0
        for proc in procs:
            assert proc.returncode in (0, 75), helpers.describe_run(proc)
            if proc.returncode == 75:
                assert_refusal_names_holder(proc)
            elif "ingest" in proc.args[1:2] and "busy" in proc.stdout:
                assert "another writer holds dataset" in proc.stdout, helpers.describe_run(proc)
            publishers += published(proc)
        assert publishers == 1, "\n\n".join(helpers.describe_run(p) for p in procs)
        check = helpers.run("verify", store)
        assert check.returncode == 0, helpers.describe_run(check)
        assert catalog_rows(store) == [NAME]
        leftovers = [p.name for p in store.iterdir() if p.name.startswith(f".{NAME}.")]
        assert leftovers in ([], [f".{NAME}.shards"]), leftovers


def test_a_second_writer_can_wait_for_the_first(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    host = socket.gethostname()
    lock = store / f".{NAME}.lock"
    record = {"what": "convert", "host": host, "pid": holder.pid, "since": int(time.time()),
              "command": "sensorium-ingest convert elsewhere.zip --out store"}
    lock.write_text(json.dumps(record))
    try:
        refused = helpers.run("convert", FIXTURE, "--out", store)
        assert refused.returncode == 75, helpers.describe_run(refused)
        assert_refusal_names_holder(refused)
        assert str(holder.pid) in refused.stderr and "elsewhere.zip" in refused.stderr
        assert not (store / NAME).exists()
        waiting = start("convert", FIXTURE, "--out", store, "--wait")
        time.sleep(1.5)
        assert waiting.poll() is None, "a waiting writer did not wait"
        holder.kill()
        holder.wait()
        done = finish(waiting)
        assert done.returncode == 0, helpers.describe_run(done)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (store / NAME / "manifest.json").is_file()
    assert not lock.exists()
    # --wait=DURATION gives up after that long, naming the holder.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(json.dumps({**record, "pid": sleeper.pid}))
        started = time.monotonic()
        gave_up = helpers.run("convert", FIXTURE, "--out", store, "--force", "--wait=1s")
        assert gave_up.returncode == 75, helpers.describe_run(gave_up)
        assert 0.9 < time.monotonic() - started < 30
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_left_on_another_host_is_taken_over_once_stale(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    lock = store / f".{NAME}.lock"
    lock.write_text(json.dumps({"what": "convert", "host": "node-that-died", "pid": 1,
                                "since": 0, "command": "sensorium-ingest convert x"}))
    env = {**os.environ, "SENSORIUM_INGEST_LOCK_STALE_SECONDS": "2"}
    # Refreshed "later" than now, however long the first run takes to look.
    ahead = time.time() + 3600
    os.utime(lock, (ahead, ahead))
    fresh = finish(start("convert", FIXTURE, "--out", store, env=env))
    assert fresh.returncode == 75 and "node-that-died" in fresh.stderr, helpers.describe_run(fresh)
    old = time.time() - 10
    os.utime(lock, (old, old))
    taken = finish(start("convert", FIXTURE, "--out", store, env=env))
    assert taken.returncode == 0, helpers.describe_run(taken)
    assert "took over a stale lock" in taken.stderr


def test_a_lock_is_judged_by_its_holders_stale_time_when_longer(tmp_path):
    """A host configured with a short stale time never takes over a lock whose holder
    refreshes it on a slower beat (its own, longer, stale time)."""
    store = tmp_path / "store"
    store.mkdir()
    lock = store / f".{NAME}.lock"
    record = {"what": "convert", "host": "slow-beat-node", "pid": 1, "since": 0,
              "command": "sensorium-ingest convert x", "stale_millis": 3_600_000}
    lock.write_text(json.dumps(record))
    old = time.time() - 60
    os.utime(lock, (old, old))
    env = {**os.environ, "SENSORIUM_INGEST_LOCK_STALE_SECONDS": "2"}
    kept = finish(start("convert", FIXTURE, "--out", store, env=env))
    assert kept.returncode == 75 and "slow-beat-node" in kept.stderr, helpers.describe_run(kept)
    lock.write_text(json.dumps({**record, "stale_millis": 30_000}))
    os.utime(lock, (old, old))
    taken = finish(start("convert", FIXTURE, "--out", store, env=env))
    assert taken.returncode == 0, helpers.describe_run(taken)
    assert "took over a stale lock" in taken.stderr


def test_a_part_written_again_never_changes_the_published_files(tmp_path):
    """A finalize killed while removing its shards folder could leave part files that are hard
    links to the published dataset's. A task resubmitted into such a folder writes new files:
    the published ones keep their bytes, inode and modification time."""
    store = tmp_path / "store"
    for k in range(2):
        task = helpers.run("convert", FIXTURE, "--out", store, "--shard", f"{k}/2")
        assert task.returncode == 0, helpers.describe_run(task)
    shards = store / f".{NAME}.shards"
    kept = tmp_path / "kept"
    subprocess.run(["cp", "-al", str(shards), str(kept)], check=True)
    final = helpers.run("finalize", store / NAME)
    assert final.returncode == 0, helpers.describe_run(final)
    assert not shards.exists()
    # The folder as a killed removal would leave it, sharing the published files' inodes.
    subprocess.run(["cp", "-al", str(kept), str(shards)], check=True)
    published = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
                 for p in sorted((store / NAME).rglob("*")) if p.is_file()}
    linked = [p for p in published if p.stat().st_nlink > 1]
    assert linked, "the finalized dataset shares no file with its parts"
    for receipt in (shards / "receipts").iterdir():
        receipt.unlink()
    again = helpers.run("convert", FIXTURE, "--out", store, "--shard", "1/2")
    assert again.returncode == 0, helpers.describe_run(again)
    changed = [str(p) for p, was in published.items()
               if (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) != was]
    assert not changed, changed
    assert helpers.run("verify", store / NAME).returncode == 0


def test_one_shard_task_listed_twice_runs_once(tmp_path):
    """A job array that lists a mouse twice starts the same task twice."""
    store = tmp_path / "store"
    # With the fixture's 11 trials, part 1/2 holds every trial and part 0/2 none.
    twins = [start("convert", FIXTURE, "--out", store, "--shard", "1/2", "--threads", "1")
             for _ in range(2)]
    results = [finish(p) for p in twins]
    codes = sorted(r.returncode for r in results)
    # Either one ran while the other was refused (the same part already being converted), or
    # they ran one after the other and the second found the part done.
    assert codes in ([0, 0], [0, 75]), "\n".join(helpers.describe_run(r) for r in results)
    if codes == [0, 75]:
        refused = next(r for r in results if r.returncode == 75)
        assert "shard task 1/2" in refused.stderr, helpers.describe_run(refused)
    other = helpers.run("convert", FIXTURE, "--out", store, "--shard", "0/2")
    assert other.returncode == 0, helpers.describe_run(other)
    final = helpers.run("finalize", store / NAME)
    assert final.returncode == 0, helpers.describe_run(final)
    assert helpers.run("verify", store / NAME).returncode == 0


def test_finalize_waits_for_no_task_but_refuses_while_one_runs(tmp_path):
    store = tmp_path / "store"
    for k in range(2):
        task = helpers.run("convert", FIXTURE, "--out", store, "--shard", f"{k}/2")
        assert task.returncode == 0, helpers.describe_run(task)
    # A task of the run that is still running: its marker names a live process.
    running = store / f".{NAME}.shards" / "running"
    running.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    host = socket.gethostname()
    try:
        (running / "1-of-2.lock").write_text(json.dumps({
            "what": "shard task 1/2", "host": host, "pid": sleeper.pid,
            "since": int(time.time()), "command": "sensorium-ingest convert --shard 1/2"}))
        refused = helpers.run("finalize", store / NAME)
        assert refused.returncode == 75, helpers.describe_run(refused)
        assert "shard task 1/2" in refused.stderr and str(sleeper.pid) in refused.stderr
        assert not (store / NAME).exists()
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    # Its process is gone: the marker is stale and finalize goes ahead.
    done = helpers.run("finalize", store / NAME)
    assert done.returncode == 0, helpers.describe_run(done)
    assert helpers.run("verify", store / NAME).returncode == 0
