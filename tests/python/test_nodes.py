"""Writers on different nodes of a cluster that share one store.

Each node here is a process in its own UTS, PID and mount namespaces: its own host name and its
own process numbers, as on another machine (root only; skipped loudly otherwise). So the lock's
rules for another host run for real: a holder on another node is never judged by its pid (its
pid means nothing here, and the numbers collide: every node's writer is pid 1), it keeps the
name for as long as it refreshes its lock, and its lock is taken over only once it is stale.

The holder being killed is throttled by a CPU cgroup, so that it is still converting when the
other node tries, however fast the machine: the lock is refreshed from a thread of its own,
which the throttle slows no more than the conversion."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import helpers

STALE_SECONDS = 4


@pytest.fixture(scope="module")
def slow_mouse(mouse):
    # About a CPU second on one thread: tens of seconds under the throttle below.
    return mouse("nodes-slow", trials=24, neurons=300, frames=240, seed=733)


@pytest.fixture(scope="module")
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("needs root to give processes their own host names (unshare): the "
                    "cross-node lock tests did NOT run")
    probe = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--",
                            "sh", "-c", "hostname probe-node && hostname"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "probe-node":
        pytest.skip(f"cannot make namespaces here ({probe.stderr.strip()}): the cross-node "
                    "lock tests did NOT run")


@pytest.fixture()
def throttle():
    """A CPU cgroup allowing 5% of one core: its `cgroup.procs` path."""
    folder = cpu_cgroup()
    if folder is None:
        pytest.skip("cannot make a CPU cgroup here: the cross-node lock tests did NOT run")
    yield str(folder / "cgroup.procs")
    for _ in range(100):
        try:
            folder.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def cpu_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
            quota = {"cpu.cfs_quota_us": "5000", "cpu.cfs_period_us": "100000"}
            break
    else:
        base, quota = Path("/sys/fs/cgroup"), {"cpu.max": "5000 100000"}
    folder = base / f"sensorium-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        for name in sorted(quota, reverse=True):
            (folder / name).write_text(quota[name])
    except OSError:
        if folder.is_dir():
            folder.rmdir()
        return None
    return folder


def on_node(node: str, *args, cgroup_procs: str = "") -> subprocess.Popen:
    """Starts the binary on `node`: pid 1 of a fresh PID namespace whose host name is `node`."""
    env = {**os.environ, "SENSORIUM_INGEST_LOCK_STALE_SECONDS": str(STALE_SECONDS)}

    def enter_cgroup():
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write(str(os.getpid()))

    command = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
               "sh", "-c", 'hostname "$0" && exec "$@"', node, str(helpers.binary()),
               *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env, preexec_fn=enter_cgroup)


def run_on_node(node: str, *args) -> subprocess.CompletedProcess:
    proc = on_node(node, *args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILLs the node's writer (its namespace dies with it), as a node that crashes."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{c}").exists() for c in children):
        assert time.monotonic() < deadline, "the killed node's writer did not die"
        time.sleep(0.05)


def wait_for(what: str, done, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the writer ended before {what}: exit {proc.returncode}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_until_stale(lock: Path) -> None:
    """Until the lock has gone unrefreshed for longer than the stale time."""
    while time.time() - lock.stat().st_mtime <= STALE_SECONDS + 0.5:
        time.sleep(0.1)


def holder_since(lock: Path) -> float:
    return float(json.loads(lock.read_text())["since"])


def refused_by(proc: subprocess.CompletedProcess, what: str, node: str) -> bool:
    return proc.returncode == 75 and \
        re.search(rf"{what} \(pid 1 on {node}, since [^)]+\)", proc.stderr) is not None


def start_holder(node: str, source: Path, store: Path, throttle: str) -> subprocess.Popen:
    """A throttled conversion on `node`, once it has begun to stage."""
    name = helpers.dataset_name(source.name.removesuffix(".zip"))
    holder = on_node(node, "convert", source, "--out", store, "--threads", "1",
                     cgroup_procs=throttle)
    wait_for("its staging", lambda: any(store.glob(f".{name}.partial/*")), holder)
    return holder


def assert_took_over(proc: subprocess.CompletedProcess, from_node: str) -> None:
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert re.search(rf"took over a stale lock.*pid 1 on {from_node}", proc.stderr), proc.stderr


def assert_one_verified_dataset(store: Path, name: str) -> None:
    checked = helpers.run("verify", store / name)
    assert checked.returncode == 0, helpers.describe_run(checked)
    rows = [r for f in sorted((store / "catalog").glob("*.parquet"))
            for r in pq.read_table(f).column("dataset").to_pylist()]
    assert rows == [name], rows
    assert sorted(p.name for p in store.iterdir()) == sorted([name, "catalog"])


def test_a_writer_on_another_node_keeps_the_name_while_alive_and_loses_it_once_stale(
        namespaces, throttle, slow_mouse, tmp_path):
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    lock = store / f".{name}.lock"
    holder = start_holder("node-b", slow_mouse, store, throttle)
    # Past the stale time since it took the lock: still the holder, because it refreshes it.
    wait_for("the stale time to pass",
             lambda: time.time() - holder_since(lock) > STALE_SECONDS + 1, holder)
    alive = run_on_node("node-a", "convert", slow_mouse, "--out", store)
    assert refused_by(alive, "another writer holds dataset .*: convert", "node-b"), \
        helpers.describe_run(alive)

    kill_node(holder)
    # node-a cannot see node-b's processes: a dead holder's lock counts until it is stale.
    dead = run_on_node("node-a", "convert", slow_mouse, "--out", store)
    assert refused_by(dead, "convert", "node-b"), helpers.describe_run(dead)
    assert not (store / name).exists()

    wait_until_stale(lock)
    assert_took_over(run_on_node("node-a", "convert", slow_mouse, "--out", store), "node-b")
    assert_one_verified_dataset(store, name)


def test_a_rerun_on_the_same_node_takes_over_at_once_though_the_pid_is_taken(
        namespaces, throttle, slow_mouse, tmp_path):
    """After a crash, the same node's rerun finds the dead holder's pid (1) alive: itself. The
    process start time tells them apart, so it does not wait for the stale time."""
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    kill_node(start_holder("node-b", slow_mouse, store, throttle))
    assert_took_over(run_on_node("node-b", "convert", slow_mouse, "--out", store), "node-b")
    assert_one_verified_dataset(store, name)


def test_a_shard_task_requeued_on_another_node_waits_for_the_stale_time(
        namespaces, throttle, slow_mouse, tmp_path):
    """A SLURM array task whose node died is requeued elsewhere: the new node is refused while
    the dead task's marker is fresh, takes the part over once it is stale, and the run's tasks
    on three nodes and its finalize on a fourth make one dataset."""
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    first = run_on_node("node-b", "convert", slow_mouse, "--out", store, "--shard", "0/2")
    assert first.returncode == 0, helpers.describe_run(first)
    running = store / f".{name}.shards" / "running" / "1-of-2.lock"
    doomed = on_node("node-c", "convert", slow_mouse, "--out", store, "--shard", "1/2",
                     "--threads", "1", cgroup_procs=throttle)
    wait_for("its part's marker", running.exists, doomed)
    kill_node(doomed)

    early = run_on_node("node-d", "convert", slow_mouse, "--out", store, "--shard", "1/2")
    assert refused_by(early, "another process converts shard task 1/2: shard task 1/2", "node-c"), \
        helpers.describe_run(early)
    wait_until_stale(running)
    requeued = run_on_node("node-d", "convert", slow_mouse, "--out", store, "--shard", "1/2")
    assert requeued.returncode == 0, helpers.describe_run(requeued)
    assert "took over a stale lock" in requeued.stderr, requeued.stderr

    final = run_on_node("node-a", "finalize", store / name)
    assert final.returncode == 0, helpers.describe_run(final)
    assert_one_verified_dataset(store, name)
