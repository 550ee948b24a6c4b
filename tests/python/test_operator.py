"""What operators see: log lines without carriage returns off a terminal, JSON events, quiet
mode, shell completions, help with examples."""

from __future__ import annotations

import json

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
