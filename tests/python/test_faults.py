"""Faults during a conversion: the source truncated or replaced, the store folder renamed away.
Each gets a clear error (or, for a source replaced by rename, a conversion of the bytes that
were there when it started), publishes nothing half-done, and a rerun finishes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import helpers


@pytest.fixture(scope="module")
def slow_mouse(mouse):
    # Big enough that a 1-thread conversion lasts a second or more.
    return mouse("faults-slow", trials=24, neurons=300, frames=240, seed=733)


def start_and_wait_for_staging(source: Path, store: Path) -> subprocess.Popen:
    child = subprocess.Popen([str(helpers.binary()), "convert", str(source), "--out", str(store),
                              "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if any(store.glob(".*.partial/*")):
            return child
        time.sleep(0.01)
    child.kill()
    child.communicate()
    pytest.skip("the conversion ended before it wrote anything: machine too fast for this probe")


def finish(child: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = child.communicate(timeout=300)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def complete(store: Path, name: str) -> bool:
    return (store / name / "manifest.json").is_file()


def test_a_source_truncated_during_the_run_is_named_and_nothing_is_published(slow_mouse,
                                                                            tmp_path):
    source = tmp_path / slow_mouse.name
    shutil.copy(slow_mouse, source)
    name = helpers.dataset_name(source.name.removesuffix(".zip"))
    store = tmp_path / "store"
    child = start_and_wait_for_staging(source, store)
    with open(source, "r+b") as f:
        f.truncate(source.stat().st_size // 3)
    done = finish(child)
    assert done.returncode in (65, 74), helpers.describe_run(done)
    assert str(source) in done.stderr or source.name in done.stderr, done.stderr
    assert not complete(store, name), "a dataset was published from a truncated source"
    shutil.copy(slow_mouse, source)
    again = helpers.run("convert", source, "--out", store)
    assert again.returncode == 0, helpers.describe_run(again)
    assert helpers.run("verify", store / name, "--against", slow_mouse).returncode == 0


def test_a_source_replaced_during_the_run_converts_what_was_there_or_stops(slow_mouse, mouse,
                                                                          tmp_path):
    other = mouse("faults-other", trials=24, neurons=300, frames=240, seed=734)
    source = tmp_path / slow_mouse.name
    shutil.copy(slow_mouse, source)
    name = helpers.dataset_name(source.name.removesuffix(".zip"))
    store = tmp_path / "store"
    child = start_and_wait_for_staging(source, store)
    replacement = tmp_path / "replacement.zip"
    shutil.copy(other, replacement)
    os.replace(replacement, source)
    done = finish(child)
    if done.returncode == 0:
        # The archive the run opened: its every value, or nothing.
        check = helpers.run("verify", store / name, "--against", slow_mouse)
        assert check.returncode == 0, helpers.describe_run(check)
    else:
        assert done.returncode in (65, 74), helpers.describe_run(done)
        assert not complete(store, name)
    again = helpers.run("convert", source, "--out", store, "--force")
    assert again.returncode == 0, helpers.describe_run(again)
    assert helpers.run("verify", store / name, "--against", other).returncode == 0


def test_a_store_renamed_during_the_run_gets_an_error_and_the_rerun_finishes(slow_mouse,
                                                                             tmp_path):
    name = helpers.dataset_name(slow_mouse.name.removesuffix(".zip"))
    store, moved = tmp_path / "store", tmp_path / "moved"
    child = start_and_wait_for_staging(slow_mouse, store)
    os.rename(store, moved)
    done = finish(child)
    assert done.returncode == 74, helpers.describe_run(done)
    assert str(store) in done.stderr, done.stderr
    assert not complete(moved, name) and not complete(store, name)
    again = helpers.run("convert", slow_mouse, "--out", moved)
    assert again.returncode == 0, helpers.describe_run(again)
    assert helpers.run("verify", moved).returncode == 0
    lock = moved / f".{name}.lock"
    assert not lock.exists(), json.loads(lock.read_text()) if lock.exists() else None
