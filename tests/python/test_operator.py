"""What operators see: log lines without carriage returns off a terminal, JSON events, quiet
mode, shell completions, help with examples, the peak memory they size jobs by."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import helpers

FIXTURE = helpers.REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"


def test_logs_off_a_terminal_are_plain_lines(tmp_path):
    proc = helpers.run("convert", FIXTURE, "--out", tmp_path, "--progress-interval", "0")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
    assert "stage started" in proc.stderr and "stage finished" in proc.stderr
    assert "progress" in proc.stderr
    assert "converted dynamic90001-1-1" in proc.stdout and str(tmp_path) in proc.stdout


def test_json_log_events(tmp_path):
    proc = helpers.run("--log-format", "json", "convert", FIXTURE, "--out", tmp_path)
    assert proc.returncode == 0, helpers.describe_run(proc)
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    finished = [e["fields"] for e in events if e["fields"]["message"] == "stage finished"]
    assert [f["stage"] for f in finished] == ["videos", "responses", "behavior", "pupil_center",
                                              "statistics", "trials", "neurons"]
    assert all({"entries", "bytes", "seconds"} <= set(f) for f in finished)
    # Errors are events too.
    bad = helpers.run("--log-format", "json", "convert", tmp_path / "missing.zip", "--out", tmp_path)
    assert bad.returncode != 0
    last = json.loads(bad.stderr.strip().splitlines()[-1])
    assert last["level"] == "ERROR" and "missing.zip" in last["fields"]["message"]
    assert last["fields"]["exit_code"] == bad.returncode


def test_quiet_prints_nothing_on_stderr(tmp_path):
    proc = helpers.run("-q", "convert", FIXTURE, "--out", tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize("shell, marker", [("bash", "complete -F"), ("zsh", "#compdef"), ("fish", "complete -c")])
def test_completions(shell, marker):
    proc = helpers.run("completions", shell)
    assert proc.returncode == 0 and marker in proc.stdout and "convert" in proc.stdout


@pytest.mark.parametrize("command", ["convert", "verify", "plan", "completions"])
def test_help_has_examples(command):
    proc = helpers.run(command, "--help")
    assert proc.returncode == 0 and "Example" in proc.stdout, proc.stdout


def test_peak_memory_is_reported_and_agrees_with_the_kernel(tmp_path):
    """The summary line and run.json give the conversion's peak resident memory (what a SLURM
    `--mem` is sized by); it must agree with the peak the kernel reports for the process."""
    # Linux keeps a process's peak RSS across exec, so a child started straight from this
    # (large) pytest process would report pytest's size: a small Python starts it instead.
    measure = ("import os, subprocess, sys\n"
               "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
               "out = p.stdout.read()\n"
               "_, status, usage = os.wait4(p.pid, 0)\n"
               "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
               "print(out, end='')\n")
    proc = subprocess.run([sys.executable, "-c", measure, str(helpers.binary()), "convert",
                           str(FIXTURE), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    code, kib = proc.stdout.splitlines()[0].split()
    stdout = proc.stdout.split("\n", 1)[1]
    assert int(code) == 0, proc.stdout + proc.stderr
    kernel_peak = int(kib) * 1024                  # Linux: KiB
    recorded = helpers.read_json(tmp_path / "dynamic90001-1-1" / "run.json")["peak_memory_bytes"]
    # Counted from the start of the conversion, so at most the process's lifetime peak, and the
    # conversion is what makes that peak.
    assert 0.5 * kernel_peak <= recorded <= kernel_peak, (recorded, kernel_peak)
    shown = re.search(r", peak memory (\d+) MB$", stdout.splitlines()[1])
    assert shown and int(shown.group(1)) == round(recorded / 1e6), stdout


def test_a_reader_that_stops_reading_the_logs_does_not_stop_the_conversion(tmp_path):
    """`convert ... 2>&1 | head -1`: the log lines after the first go to a closed pipe; the
    conversion still finishes and publishes (no panic on a failed write to stderr)."""
    store = tmp_path / "store"
    child = subprocess.Popen([str(helpers.binary()), "convert", str(FIXTURE), "--out", str(store)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    assert child.stdout.readline()
    child.stdout.close()
    assert child.wait(timeout=300) == 0
    assert (store / "dynamic90001-1-1" / "manifest.json").is_file()
