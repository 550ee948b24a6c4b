"""Bad input, existing datasets, bad pipeline files: exit codes and messages."""

from __future__ import annotations

import pytest

import helpers
from helpers import EXIT, Source, assert_same_outputs, tree_snapshot

SMALL = dict(trials=11, neurons=30, frames=40)


def _no_complete_dataset(store, name):
    assert not (store / name / "manifest.json").exists(), "a failed run left manifest.json"


def _one_message(proc):
    err = proc.stderr.strip()
    assert err, "no message on stderr"
    assert "panicked" not in err, f"the binary panicked:\n{err}"
    return err


def test_object_array_is_refused(ingest_bin, mouse, tmp_path):
    src = mouse("err-object", object_array=True, seed=201, **SMALL)
    store = tmp_path / "store"
    proc = helpers.run("convert", src, "--out", store)
    assert proc.returncode == EXIT["data"], helpers.describe_run(proc)
    assert "meta/neurons/bad.npy" in _one_message(proc)
    _no_complete_dataset(store, Source(src).dataset)


CORRUPT = {
    # kind: text the message must contain (the entry name, {v} = damaged trial number)
    "truncated-npy": "data/responses/{v}.npy",
    "bad-magic": "data/videos/{v}.npy",
    "shape-mismatch": "data/responses/{v}.npy",
    "frames-mismatch": "data/behavior/{v}.npy",
    "missing-trial": "pupil_center",
    "tiers-length": "tiers",
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_input_is_refused(ingest_bin, mouse, tmp_path, kind):
    import gen_mouse
    opts = dict(corrupt=kind, seed=202, **SMALL)
    src = mouse(f"err-{kind}", **opts)
    victim = gen_mouse.describe(**opts)["corrupt_victim"]
    store = tmp_path / "store"
    proc = helpers.run("convert", src, "--out", store)
    assert proc.returncode == EXIT["data"], helpers.describe_run(proc)
    assert CORRUPT[kind].format(v=victim) in _one_message(proc), helpers.describe_run(proc)
    _no_complete_dataset(store, Source(src).dataset)


def test_not_a_dataset_is_refused(ingest_bin, tmp_path):
    bogus = tmp_path / "dynamic1-1-1-Video-0123456789abcdef0123456789abcdef.zip"
    bogus.write_bytes(b"this is not a zip archive\n" * 10)
    proc = helpers.run("convert", bogus, "--out", tmp_path / "store")
    assert proc.returncode == EXIT["data"], helpers.describe_run(proc)
    assert bogus.name in _one_message(proc)


def test_missing_source(ingest_bin, tmp_path):
    missing = tmp_path / "nope.zip"
    proc = helpers.run("convert", missing, "--out", tmp_path / "store")
    assert proc.returncode in (EXIT["data"], EXIT["io"]), helpers.describe_run(proc)
    assert "nope.zip" in _one_message(proc)


def test_store_path_is_a_file(ingest_bin, mouse, tmp_path):
    src = mouse("err-base", seed=203, **SMALL)
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store should go\n")
    proc = helpers.run("convert", src, "--out", blocker)
    assert proc.returncode == EXIT["io"], helpers.describe_run(proc)
    _one_message(proc)
    assert blocker.read_text() == "a file where the store should go\n"


def test_existing_dataset_needs_force(ingest_bin, mouse, tmp_path):
    src = mouse("err-base", seed=203, **SMALL)
    store = tmp_path / "store"
    first = helpers.run("convert", src, "--out", store)
    assert first.returncode == 0, helpers.describe_run(first)
    ds = store / Source(src).dataset
    before = tree_snapshot(store)
    assert (ds / "manifest.json").is_file()

    # The same source again: nothing to do, nothing touched.
    again = helpers.run("convert", src, "--out", store)
    assert again.returncode == 0, helpers.describe_run(again)
    assert "up to date" in again.stdout
    assert tree_snapshot(store) == before, "an up-to-date run changed the store"

    # Another source under the same name is refused without --force, and changes nothing.
    other = mouse("err-base-other", seed=206, **SMALL)
    refused = helpers.run("convert", other, "--out", store, "--name", ds.name)
    assert refused.returncode == EXIT["exists"], helpers.describe_run(refused)
    _one_message(refused)
    assert ds.name in refused.stderr and "--force" in refused.stderr
    assert tree_snapshot(store) == before, "a refused conversion changed the store"

    saved = tmp_path / "saved"
    import shutil
    shutil.copytree(ds, saved)
    forced = helpers.run("convert", src, "--out", store, "--force")
    assert forced.returncode == 0, helpers.describe_run(forced)
    assert (ds / "manifest.json").is_file()
    assert_same_outputs(saved, ds)
    assert sorted(p.name for p in store.iterdir()) == sorted([ds.name, "catalog"]), "--force left stray files"


def test_force_replaces_a_different_dataset(ingest_bin, mouse, tmp_path):
    """--force over a dataset of the same name but other content leaves only the new one."""
    a = mouse("err-force-a", seed=204, **SMALL)
    b = mouse("err-force-b", seed=205, trials=12, neurons=31, frames=41)
    store = tmp_path / "store"
    for src in (a, b):
        proc = helpers.run("convert", src, "--out", store, "--name", "same", "--force")
        assert proc.returncode == 0, helpers.describe_run(proc)
    fresh = tmp_path / "fresh"
    proc = helpers.run("convert", b, "--out", fresh, "--name", "same")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert_same_outputs(store / "same", fresh / "same")


def test_bad_pipeline_file(ingest_bin, mouse, tmp_path):
    src = mouse("err-base", seed=203, **SMALL)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n  - : :\n")
    proc = helpers.run("convert", src, "--out", tmp_path / "store", "--pipeline", bad)
    assert proc.returncode == EXIT["pipeline"], helpers.describe_run(proc)
    assert "bad.yaml" in _one_message(proc)
    assert not (tmp_path / "store" / Source(src).dataset / "manifest.json").exists()


@pytest.mark.parametrize("args", [
    [],
    ["convert"],
    ["convert", "x.zip"],                      # --out missing
    ["convert", "x.zip", "--out", "s", "--no-such-flag"],
    ["inspect"],
    ["no-such-command"],
    ["convert", "x.zip", "--out", "s", "--threads", "many"],
])
def test_usage_errors(ingest_bin, tmp_path, args):
    proc = helpers.run(*args, cwd=tmp_path)
    assert proc.returncode == EXIT["usage"], helpers.describe_run(proc)
    assert not (tmp_path / "s").exists()
