"""Sharded conversion on a real SLURM cluster (one node: this machine).

NEEDS ROOT. This test installs the Debian packages slurm-wlm and munge with apt-get (once;
about ten seconds to a minute) and starts munged, slurmctld and slurmd on this machine, using
tests/slurm/start-slurm.sh; the daemons this session started are stopped when it ends
(conftest.py, `daemons_started_here`). Without root (and
without passwordless sudo) that script exits 77 and the test is SKIPPED, with a loud reason;
any other failure of the script FAILS the test.

Then, exactly as a lab would, it submits examples/slurm/submit.sh: a job array converting two
generated mice in three shards each (`convert --shard K/3`, six tasks), and a finalize job
that depends on the array (`--dependency=afterok`) and runs `finalize` and `verify` for each
mouse. It waits for both jobs (at most JOB_TIMEOUT seconds) and checks that every task and the
finalize job exited 0, that `verify STORE` passes, that the catalog lists both mice, and that
the store is byte-identical (run.json aside) to single-process conversions of the same mice.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

import gen_mouse
import helpers
from helpers import Source

START_SLURM = helpers.REPO / "tests" / "slurm" / "start-slurm.sh"
SUBMIT = helpers.REPO / "examples" / "slurm" / "submit.sh"
EXIT_NOT_ROOT = 77
SHARDS = 3
JOB_TIMEOUT = 300           # seconds for the array and the finalize job together
# Two mice with distinct dataset names (the animal id is part of the name) and 40 trials:
# three 16-trial video shards, ten 4-trial response shards, so each of the 3 tasks has work.
MICE = [dict(trials=40, neurons=30, frames=30, seed=501, animal=90101),
        dict(trials=40, neurons=30, frames=30, seed=502, animal=90102)]
# The test node has few CPUs: one per task (the scripts' defaults ask for 4), little memory.
SBATCH_EXTRA = "--cpus-per-task=1 --mem=512M --time=10"


def sh(*cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def describe(proc: subprocess.CompletedProcess) -> str:
    return (f"command: {' '.join(map(str, proc.args))}\nexit code: {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")


def start_slurm() -> None:
    try:
        proc = sh("bash", START_SLURM, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tests/slurm/start-slurm.sh did not finish in {e.timeout} s\n"
                    f"--- output ---\n{e.stdout or ''}\n{e.stderr or ''}", pytrace=False)
    if proc.returncode == EXIT_NOT_ROOT:
        pytest.skip("SKIPPED: THE SLURM TEST NEEDS ROOT (it installs slurm-wlm/munge and starts "
                    "slurmctld/slurmd); tests/slurm/start-slurm.sh exited 77: "
                    + proc.stderr.strip().replace("\n", " "))
    if proc.returncode != 0:
        pytest.fail("tests/slurm/start-slurm.sh failed\n" + describe(proc), pytrace=False)


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol -o show job ID` as dicts (one per array task); [] once SLURM forgot it."""
    proc = sh("scontrol", "-o", "show", "job", job_id)
    if proc.returncode != 0:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines()
            if line.strip()]


def logs(log_dir: Path) -> str:
    out = []
    for p in sorted(log_dir.glob("*.out")):
        out.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}")
    return "\n".join(out) or f"(no job logs in {log_dir})"


def wait_for(jobs: dict[str, str], log_dir: Path) -> None:
    """Poll squeue until none of `jobs` is queued or running; fail on timeout or a stuck
    dependency (a finalize job whose array failed never starts on clusters without
    kill_invalid_depend)."""
    ids = ",".join(jobs.values())
    deadline = time.monotonic() + JOB_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        proc = sh("squeue", "-h", "-j", ids, "-o", "%i %T %r")
        last = proc.stdout.strip()
        if proc.returncode == 0 and not last:
            return
        lines = last.splitlines()
        if lines and all("DependencyNeverSatisfied" in l for l in lines):
            sh("scancel", ids)
            pytest.fail(f"the finalize job can never start (an array task failed):\n{last}\n"
                        + summary(jobs) + "\n" + logs(log_dir), pytrace=False)
        time.sleep(1)
    sh("scancel", ids)
    pytest.fail(f"jobs {ids} not finished after {JOB_TIMEOUT} s (cancelled). squeue:\n{last}\n"
                + summary(jobs) + "\n" + logs(log_dir), pytrace=False)


def summary(jobs: dict[str, str]) -> str:
    out = []
    for what, job_id in jobs.items():
        recs = job_records(job_id)
        if not recs:
            out.append(f"{what} job {job_id}: unknown to scontrol")
        for r in recs:
            task = f"_{r['ArrayTaskId']}" if r.get("ArrayTaskId") else ""
            out.append(f"{what} job {job_id}{task}: {r.get('JobState')} exit "
                       f"{r.get('ExitCode')} reason {r.get('Reason')}")
    return "\n".join(out)


def store_files(store: Path) -> dict[str, bytes]:
    """Every published file of a store (hidden work folders and run.json left out)."""
    return {k: v for k, v in helpers.tree_files(store).items()
            if not k.startswith(".") and not k.endswith("/run.json")}


def test_slurm_array_then_finalize_equals_single_process(tmp_path, daemons_started_here):
    daemons_started_here(start_slurm)

    binary = helpers.binary()
    assert binary.is_file(), f"sensorium-ingest binary not found at {binary}"
    help_text = helpers.run("convert", "--help")
    assert "--shard" in help_text.stdout, (
        "this sensorium-ingest has no `convert --shard`: the SLURM example needs it\n"
        + helpers.describe_run(help_text))

    inbox, store, log_dir = tmp_path / "inbox", tmp_path / "store", tmp_path / "logs"
    sources = [gen_mouse.generate(inbox, **m) for m in MICE]
    names = [Source(s).dataset for s in sources]
    assert len(set(names)) == 2, names

    env = dict(os.environ, SENSORIUM_INGEST=str(binary), SBATCH_EXTRA=SBATCH_EXTRA,
               LOG_DIR=str(log_dir))
    for var in ("ARRAY_SBATCH_EXTRA", "FINALIZE_SBATCH_EXTRA", "ARRAY_LIMIT"):
        env.pop(var, None)
    submitted = sh("bash", SUBMIT, store, SHARDS, *sources, env=env, cwd=tmp_path)
    assert submitted.returncode == 0, describe(submitted)
    last = submitted.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"array=(\d+) finalize=(\d+)", last)
    assert m, f"submit.sh's last line is not 'array=ID finalize=ID'\n{describe(submitted)}"
    jobs = {"array": m.group(1), "finalize": m.group(2)}

    t0 = time.monotonic()
    wait_for(jobs, log_dir)
    took = time.monotonic() - t0

    # Every array task and the finalize job completed with exit status 0.
    report = summary(jobs) + "\n" + logs(log_dir)
    tasks = job_records(jobs["array"])
    assert sorted(int(r.get("ArrayTaskId", -1)) for r in tasks) == list(range(2 * SHARDS)), report
    bad = [r for r in tasks + job_records(jobs["finalize"])
           if (r.get("JobState"), r.get("ExitCode")) != ("COMPLETED", "0:0")]
    if bad or len(tasks) != 2 * SHARDS:
        pytest.fail(f"not every job completed with exit status 0:\n{report}", pytrace=False)
    for k, src in enumerate(sources):       # task i converted mouse i // 3, shard i % 3
        for shard in range(SHARDS):
            text = (log_dir / f"sensorium-convert-{jobs['array']}_{k * SHARDS + shard}.out"
                    ).read_text()
            assert f"--shard {shard}/{SHARDS}" in text and str(src) in text, report
    fin_log = (log_dir / f"sensorium-finalize-{jobs['finalize']}.out").read_text()
    assert "all 2 mice finalized and verified" in fin_log, report

    verified = helpers.run("verify", store)
    assert verified.returncode == 0, helpers.describe_run(verified)

    catalog = pads.dataset(store / "catalog", format="parquet").to_table()
    assert catalog.num_rows == 2, catalog.to_pylist()
    assert sorted(catalog.column("dataset").to_pylist()) == sorted(names)

    # The same mice converted by one process each, into a second store: same files, same bytes.
    single = tmp_path / "single"
    for src in sources:
        proc = helpers.run("convert", src, "--out", single, "--quiet")
        assert proc.returncode == 0, helpers.describe_run(proc)
    for name in names:
        helpers.assert_same_outputs(store / name, single / name)
    sharded, whole = store_files(store), store_files(single)
    assert sorted(sharded) == sorted(whole), (
        f"only in the SLURM store: {sorted(set(sharded) - set(whole))[:10]}; "
        f"only in the single-process store: {sorted(set(whole) - set(sharded))[:10]}")
    differ = [k for k in sharded if sharded[k] != whole[k]]
    assert not differ, f"{len(differ)} files differ between the stores, e.g. {differ[:10]}"
    print(f"SLURM: 6 array tasks + finalize took {took:.1f} s")
