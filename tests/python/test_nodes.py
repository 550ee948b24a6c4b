"""Writers on different nodes of a cluster that share one store.

Each node here is a host name and a PID namespace of its own (root only; skipped loudly
otherwise), so the lock's rules for another host run for real: a holder on another node, or in
another container under the same host name, is never judged by its pid (the numbers repeat from
node to node), it keeps the name for as long as it refreshes its lock, and its lock is taken over
only once it is stale; on its own node, a dead holder is taken over at once.

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

# The holders' stale time: they refresh their locks every quarter of it.
HOLDER_STALE = 2
# Takers judge a lock by the longer of their own stale time and its holder's.
TAKER_STALE = 4
# For a look that must not judge by age, however long it takes to start.
NEVER_STALE = 3600


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


class Node:
    """A host name and a PID namespace (with its own /proc), kept by a sleeping pid 1: the
    processes started on one node share its pids, those of two nodes do not."""

    def __init__(self, hostname: str):
        self.hostname = hostname
        self.keeper = subprocess.Popen(
            ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
             "sh", "-c", 'hostname "$0" && exec sleep infinity', hostname])
        deadline = time.monotonic() + 30
        while (init := self._sleeping_init()) is None:
            assert time.monotonic() < deadline and self.keeper.poll() is None, \
                f"node {hostname} did not start"
            time.sleep(0.02)
        self.init = init

    def _sleeping_init(self) -> int | None:
        for child in children(self.keeper.pid):
            if Path(f"/proc/{child}/comm").read_text().strip() == "sleep":
                return child
        return None

    def start(self, *args, stale: float = TAKER_STALE, cgroup_procs: str = "") -> subprocess.Popen:
        env = {**os.environ, "SENSORIUM_INGEST_LOCK_STALE_SECONDS": str(stale)}

        def enter_cgroup():
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        command = ["nsenter", "-t", str(self.init), "--uts", "--pid", "--mount", "--",
                   str(helpers.binary()), *map(str, args)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=enter_cgroup)

    def run(self, *args, stale: float = TAKER_STALE) -> subprocess.CompletedProcess:
        proc = self.start(*args, stale=stale)
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        self.keeper.kill()
        self.keeper.wait()


@pytest.fixture()
def node(namespaces):
    """node(host name) -> a new Node, gone after the test."""
    made = []

    def make(hostname: str) -> Node:
        made.append(Node(hostname))
        return made[-1]

    yield make
    for n in made:
        n.close()


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


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def kill_writer(proc: subprocess.Popen) -> None:
    """SIGKILLs a writer started with `Node.start`, as a node or job that dies at once."""
    writers = children(proc.pid)
    assert writers, "the writer is not running"
    for pid in writers:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def wait_for(what: str, done, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the writer ended before {what}: exit {proc.returncode}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_until_stale(lock: Path) -> None:
    """Until the lock has gone unrefreshed for longer than the takers' stale time."""
    while time.time() - lock.stat().st_mtime <= TAKER_STALE + 0.5:
        time.sleep(0.1)


def holder_since(lock: Path) -> float:
    return float(json.loads(lock.read_text())["since"])


def refused_by(proc: subprocess.CompletedProcess, what: str, node: str) -> bool:
    return proc.returncode == 75 and \
        re.search(rf"{what} \(pid \d+ on {node}, since [^)]+\)", proc.stderr) is not None


def start_holder(node: Node, source: Path, store: Path, throttle: str) -> subprocess.Popen:
    """A throttled conversion on `node`, once it has begun to stage."""
    name = helpers.dataset_name(source.name.removesuffix(".zip"))
    holder = node.start("convert", source, "--out", store, "--threads", "1",
                        stale=HOLDER_STALE, cgroup_procs=throttle)
    wait_for("its staging", lambda: any(store.glob(f".{name}.partial/*")), holder)
    return holder


def assert_took_over(proc: subprocess.CompletedProcess, from_node: str) -> None:
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert re.search(rf"took over a stale lock.*pid \d+ on {from_node}", proc.stderr), \
        proc.stderr


def assert_one_verified_dataset(store: Path, name: str) -> None:
    checked = helpers.run("verify", store / name)
    assert checked.returncode == 0, helpers.describe_run(checked)
    rows = [r for f in sorted((store / "catalog").glob("*.parquet"))
            for r in pq.read_table(f).column("dataset").to_pylist()]
    assert rows == [name], rows
    assert sorted(p.name for p in store.iterdir()) == sorted([name, "catalog"])


@pytest.mark.parametrize("other", ["node-a", "node-b"], ids=["another node",
                                                            "a container sharing the host name"])
def test_a_writer_elsewhere_keeps_the_name_while_alive_and_loses_it_once_stale(
        node, other, throttle, slow_mouse, tmp_path):
    """From another node, or from another PID namespace under the same host name (containers
    with host networking), the holder's pid tells nothing: its lock counts until it is stale."""
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    lock = store / f".{name}.lock"
    home, elsewhere = node("node-b"), node(other)
    holder = start_holder(home, slow_mouse, store, throttle)
    # Past the takers' stale time since it took the lock: still the holder, as it refreshes it.
    wait_for("the stale time to pass",
             lambda: time.time() - holder_since(lock) > TAKER_STALE + 1, holder)
    alive = elsewhere.run("convert", slow_mouse, "--out", store)
    assert refused_by(alive, "another writer holds dataset .*: convert", "node-b"), \
        helpers.describe_run(alive)

    kill_writer(holder)
    dead = elsewhere.run("convert", slow_mouse, "--out", store, stale=NEVER_STALE)
    assert refused_by(dead, "convert", "node-b"), helpers.describe_run(dead)
    assert not (store / name).exists()

    wait_until_stale(lock)
    assert_took_over(elsewhere.run("convert", slow_mouse, "--out", store), "node-b")
    assert_one_verified_dataset(store, name)


def test_a_rerun_on_the_same_node_takes_over_at_once(node, throttle, slow_mouse, tmp_path):
    """On the holder's own node its pid is checked: a dead holder's lock is taken over without
    waiting for the stale time."""
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    home = node("node-b")
    kill_writer(start_holder(home, slow_mouse, store, throttle))
    rerun = home.run("convert", slow_mouse, "--out", store, stale=NEVER_STALE)
    assert_took_over(rerun, "node-b")
    assert_one_verified_dataset(store, name)


def test_a_shard_task_requeued_on_another_node_waits_for_the_stale_time(
        node, throttle, slow_mouse, tmp_path):
    """A SLURM array task whose node died is requeued elsewhere: the new node is refused while
    the dead task's marker is fresh, takes the part over once it is stale, and the run's tasks
    on three nodes and its finalize on a fourth make one dataset."""
    store = tmp_path / "store"
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    first = node("node-b").run("convert", slow_mouse, "--out", store, "--shard", "0/2")
    assert first.returncode == 0, helpers.describe_run(first)
    running = store / f".{name}.shards" / "running" / "1-of-2.lock"
    doomed = node("node-c").start("convert", slow_mouse, "--out", store, "--shard", "1/2",
                                  "--threads", "1", stale=HOLDER_STALE, cgroup_procs=throttle)
    wait_for("its part's marker", running.exists, doomed)
    kill_writer(doomed)

    requeue = node("node-d")
    early = requeue.run("convert", slow_mouse, "--out", store, "--shard", "1/2",
                        stale=NEVER_STALE)
    assert refused_by(early, "another process converts shard task 1/2: shard task 1/2",
                      "node-c"), helpers.describe_run(early)
    wait_until_stale(running)
    requeued = requeue.run("convert", slow_mouse, "--out", store, "--shard", "1/2")
    assert_took_over(requeued, "node-c")

    final = node("node-a").run("finalize", store / name)
    assert final.returncode == 0, helpers.describe_run(final)
    assert_one_verified_dataset(store, name)
