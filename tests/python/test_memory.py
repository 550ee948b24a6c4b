"""Memory limits: a conversion uses no more threads than fit in the memory it is given
(`--max-memory`, else the cgroup's limit), because a cluster job over its limit is killed, not
slowed. Real-size trials (benches/gen_big.py), so the trial and shard buffers are the real ones; the
peak the kernel measures must stay under the limit, and the output must not depend on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import helpers

MIB = 1 << 20


@pytest.fixture(scope="module")
def mouse(big_mouse) -> Path:
    """16 real-size trials (conftest's `big_mouse`)."""
    return big_mouse


def convert_measured(args: list, cgroup_procs: str = "") -> tuple[subprocess.CompletedProcess, int]:
    """Runs the binary from a small intermediate process (optionally moved into a cgroup first);
    returns the process and the kernel's peak resident memory of the converter in bytes."""
    # Linux keeps a process's peak RSS across exec, so a child started straight from this
    # (large) pytest process would report pytest's size: a small Python starts it instead.
    script = ("import os, subprocess, sys, tempfile\n"
              "cgroup = sys.argv[1]\n"
              "def enter():\n"
              "    if cgroup:\n"
              "        with open(cgroup, 'w') as f: f.write(str(os.getpid()))\n"
              "out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()\n"
              "p = subprocess.Popen(sys.argv[2:], stdout=out, stderr=err, preexec_fn=enter)\n"
              "_, status, usage = os.wait4(p.pid, 0)\n"
              "out.seek(0); err.seek(0)\n"
              "sys.stdout.write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}\\n')\n"
              "sys.stdout.write(out.read().decode())\n"
              "sys.stderr.write(err.read().decode())\n")
    proc = subprocess.run([sys.executable, "-c", script, cgroup_procs, str(helpers.binary())]
                          + [str(a) for a in args],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    first, _, rest = proc.stdout.partition("\n")
    code, kib = first.split()
    return subprocess.CompletedProcess(proc.args, int(code), rest, proc.stderr), int(kib) * 1024


def run_record(store: Path, source: Path) -> dict:
    return helpers.read_json(store / helpers.dataset_name(source.name[:-4]) / "run.json")


def test_max_memory_lowers_the_thread_count_and_the_peak_stays_under_it(mouse, tmp_path):
    limit = 280 * MIB
    # What `plan` promises before anything is written: the threads and the memory bound.
    plan = helpers.run("convert", mouse, "--out", tmp_path / "a", "--threads", "4",
                       "--max-memory", "280M", "--dry-run")
    assert plan.returncode == 0, helpers.describe_run(plan)
    shown = re.search(r"; (\d+) threads?, memory at most ~(\d+) MiB \(limit 280 MiB: "
                      r"--max-memory\)$", plan.stdout.splitlines()[0])
    assert shown, plan.stdout
    assert not (tmp_path / "a").exists(), "a dry run wrote something"

    proc, peak = convert_measured(["convert", mouse, "--out", tmp_path / "a", "--threads", "4",
                                   "--max-memory", "280M"])
    assert proc.returncode == 0, helpers.describe_run(proc)
    run = run_record(tmp_path / "a", mouse)
    assert run["threads_wanted"] == 4
    assert 1 <= run["threads"] < 4, run
    assert run["memory_limit"] == {"bytes": limit, "origin": "--max-memory"}
    assert run["memory_estimate_bytes"] <= limit
    assert [int(shown.group(1)), int(shown.group(2))] == \
        [run["threads"], -(-run["memory_estimate_bytes"] // MIB)]
    # The estimate is an upper bound of what the kernel measured.
    assert peak <= run["memory_estimate_bytes"], (peak, run)
    assert re.search(r"4 threads may need up to \d+ MiB, more than the memory limit of 280 MiB "
                     rf"\(--max-memory\): using {run['threads']}", proc.stderr), proc.stderr
    # Unlimited, the same 4 threads are really used, and need more than the limit.
    free, free_peak = convert_measured(["convert", mouse, "--out", tmp_path / "b", "--threads",
                                        "4", "--max-memory", "64G"])
    assert free.returncode == 0, helpers.describe_run(free)
    assert run_record(tmp_path / "b", mouse)["threads"] == 4
    assert free_peak > peak, (free_peak, peak)
    assert "may need up to" not in free.stderr, free.stderr
    # Fewer threads, the same bytes.
    name = helpers.dataset_name(mouse.name[:-4])
    helpers.assert_same_outputs(tmp_path / "a" / name, tmp_path / "b" / name)


@pytest.mark.parametrize("size", ["12X", "0", "-1G", "G"])
def test_a_bad_max_memory_is_a_usage_error(size, tmp_path):
    proc = helpers.run("convert", helpers.REPO / "fixtures", "--out", tmp_path,
                       f"--max-memory={size}")
    assert proc.returncode == helpers.EXIT["usage"], helpers.describe_run(proc)
    assert "--max-memory" in proc.stderr and size in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


def memory_cgroup() -> tuple[Path, str, str] | None:
    """A new memory cgroup under this process's own (v1, or v2 with the memory controller
    delegated): (folder, limit file, procs file), or None where this process cannot make one."""
    if os.geteuid() != 0:
        return None
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), \
                "memory.limit_in_bytes"
            break
    else:
        v2 = [p for _, c, p in (l.split(":", 2) for l in lines) if c == ""]
        if not v2:
            return None
        base, limit_file = Path("/sys/fs/cgroup") / v2[0].lstrip("/"), "memory.max"
    folder = base / f"sensorium-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError:
        return None
    if not (folder / limit_file).exists():
        folder.rmdir()
        return None
    return folder, limit_file, str(folder / "cgroup.procs")


def test_the_cgroup_memory_limit_is_found_and_kept(mouse, tmp_path):
    """SLURM (ConstrainRAMSpace), Docker and Kubernetes limit memory with a cgroup: without any
    option the conversion finds the limit and fits in it. A conversion that needs more, with
    the limit ignored, is killed by the kernel, which shows that the limit is real here; it
    publishes nothing, and run again within the limit it finishes."""
    made = memory_cgroup()
    if made is None:
        pytest.skip("cannot make a memory cgroup here (needs root and a writable cgroup tree)")
    folder, limit_file, procs = made
    try:
        # One thread's estimate (~139 MiB) fits. Four threads of the default pipeline really
        # use only ~127 MiB (freed memory is purged at once, src/main.rs), so the control below
        # has its shards encoded by zarrs (gzip), which holds whole shards: 226-265 MiB.
        limit = 144 * MIB
        (folder / limit_file).write_text(str(limit))
        proc, peak = convert_measured(["convert", mouse, "--out", tmp_path / "a", "--threads",
                                       "4"], procs)
        assert proc.returncode == 0, helpers.describe_run(proc)
        run = run_record(tmp_path / "a", mouse)
        assert run["memory_limit"]["bytes"] == limit, run
        assert run["memory_limit"]["origin"] == f"cgroup {folder / limit_file}", run
        assert run["threads"] < 4 and run["memory_estimate_bytes"] <= limit, run
        assert peak <= limit, peak
        default = subprocess.run([str(helpers.binary()), "default-pipeline"], check=True,
                                 capture_output=True, text=True).stdout
        gzip = default.replace("compression: {codec: zstd, level: 1}",
                               "compression: {codec: gzip, level: 1}")
        assert gzip != default
        (tmp_path / "gzip.yaml").write_text(gzip)
        ignored, _ = convert_measured(["convert", mouse, "--out", tmp_path / "b", "--threads",
                                       "4", "--max-memory", "64G", "--pipeline",
                                       tmp_path / "gzip.yaml"], procs)
        assert ignored.returncode == -9, helpers.describe_run(ignored)
        name = helpers.dataset_name(mouse.name[:-4])
        assert not (tmp_path / "b" / name).exists()
        # Killed for memory: the same conversion, with the limit honoured, resumes and publishes.
        rerun, _ = convert_measured(["convert", mouse, "--out", tmp_path / "b", "--threads",
                                        "4", "--pipeline", tmp_path / "gzip.yaml"], procs)
        assert rerun.returncode == 0, helpers.describe_run(rerun)
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([name, "catalog"])
        assert helpers.run("verify", tmp_path / "b" / name).returncode == 0
    finally:
        folder.rmdir()


def test_a_slurm_task_uses_its_cpus_and_its_mem(mouse, tmp_path):
    """In a SLURM job without task affinity every core of the node is visible: the default is
    SLURM_CPUS_PER_TASK, and SLURM's --mem (SLURM_MEM_PER_NODE, in MiB) is a limit too."""
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_NODE="200")
    proc = subprocess.run([str(helpers.binary()), "convert", str(mouse), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, helpers.describe_run(proc)
    run = run_record(tmp_path, mouse)
    assert run["threads_wanted"] == min(2, len(os.sched_getaffinity(0))), run
    assert run["memory_limit"] == {"bytes": 200 * MIB, "origin": "SLURM_MEM_PER_NODE=200"}, run
    # One thread may need ~139 MiB, two ~233 MiB: one fits.
    assert run["threads"] == 1 and run["memory_estimate_bytes"] <= 200 * MIB, run


def test_finalize_counts_only_what_it_runs(mouse, tmp_path):
    """finalize writes the tables and statistics; the tasks wrote the shards. So its estimate
    leaves the shard buffers out, and a small --max-memory does not cut its threads."""
    store = tmp_path / "store"
    task = helpers.run("convert", mouse, "--out", store, "--shard", "0/1")
    assert task.returncode == 0, helpers.describe_run(task)
    fin = helpers.run("finalize", store / helpers.dataset_name(mouse.name[:-4]), "--threads", "2",
                      "--max-memory", "150M")
    assert fin.returncode == 0, helpers.describe_run(fin)
    run = run_record(store, mouse)
    assert run["threads"] == 2 and run["memory_estimate_bytes"] <= 150 * MIB, run
    whole = helpers.run("convert", mouse, "--out", tmp_path / "whole", "--dry-run", "--threads",
                        "2", "--max-memory", "150M")
    assert re.search(r"; 1 thread, memory at most ~\d+ MiB \(limit 150 MiB", whole.stdout), \
        whole.stdout
