"""Broken and hostile input (issue #5): damaged archives, malicious entry names, zip bombs,
malformed npy files, inconsistent datasets, bad pipeline files, a read-only or full store.

The rule for every case: a documented non-zero exit code, one clear message naming the file or
entry, no panic, no dataset that looks complete (STORE/<name>/manifest.json), no staging folder
left behind, and no change to the dataset already in the store (hashed before and after).
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import gen_mouse
import helpers
import zipcraft
from helpers import EXIT, tree_snapshot
from zipcraft import DEFLATED, STORED, Entry

OPTS = dict(trials=5, neurons=10, frames=20, seed=505)
STEM = gen_mouse.dataset_stem({**gen_mouse.DEFAULTS, **OPTS})
NAME = helpers.dataset_name(STEM)
VICTIM = 2  # the trial the npy cases damage


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def entries() -> dict[str, bytes]:
    """The small mouse's files, path relative to the dataset root -> bytes (never mutated)."""
    _, files, _ = gen_mouse.build_entries(**OPTS)
    return files


@pytest.fixture(scope="module")
def template_store(tmp_path_factory, ingest_bin) -> Path:
    """A store holding one complete, unrelated dataset (`other`)."""
    root = tmp_path_factory.mktemp("hostile-template")
    src = gen_mouse.generate(root / "src", trials=4, neurons=8, frames=16, seed=506)
    store = root / "store"
    proc = helpers.run("convert", src, "--out", store, "--name", "other")
    assert proc.returncode == 0, helpers.describe_run(proc)
    return store


@pytest.fixture
def store(tmp_path, template_store) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(template_store, dst)
    return dst


def write_zip(tmp_path: Path, files: dict[str, bytes] | list[Entry], *, top: bool = True,
              method: int = DEFLATED, zip64: bool = False, name: str = STEM) -> Path:
    if isinstance(files, dict):
        prefix = f"{STEM}/" if top else ""
        items = [Entry.of(prefix + p, b, method) for p, b in sorted(files.items())]
    else:
        items = files
    path = tmp_path / f"{name}.zip"
    path.write_bytes(zipcraft.build(items, zip64=zip64))
    return path


def write_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "src" / STEM
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def refused(proc, code: str, *needles: str) -> str:
    """The run failed with `code`, printed one clear message containing every needle."""
    assert proc.returncode == EXIT[code], helpers.describe_run(proc)
    # Off a terminal, stage events are logged at info level for cluster logs; the message
    # itself is what follows them.
    log_line = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+(INFO|DEBUG)\s")
    err = "\n".join(l for l in proc.stderr.strip().splitlines() if not log_line.match(l))
    assert err.startswith("error: "), helpers.describe_run(proc)
    assert err.count("error: ") == 1, f"more than one message:\n{err}"
    for bad in ("panicked", "RUST_BACKTRACE", "stack backtrace", "thread '"):
        assert bad not in err, f"the binary panicked:\n{err}"
    assert "hint:" in err, f"no hint on what to do:\n{err}"
    for n in needles:
        assert n in err, f"message lacks {n!r}:\n{err}"
    return err


def store_unharmed(store: Path, before: dict) -> None:
    assert not (store / NAME / "manifest.json").exists(), "a failed run left a complete dataset"
    left = [p.name for p in store.iterdir() if p.name.startswith(".")]
    assert not left, f"staging left behind: {left}"
    assert tree_snapshot(store) == before, "a failed run changed the store"


def convert_refused(src: Path, store: Path, code: str, *needles: str, args=()) -> str:
    before = tree_snapshot(store)
    proc = helpers.run("convert", src, "--out", store, *args, timeout=120)
    err = refused(proc, code, *needles)
    store_unharmed(store, before)
    return err


def test_the_untouched_mouse_converts(tmp_path, entries, store):
    """The baseline every case below damages converts cleanly, next to the other dataset."""
    src = write_zip(tmp_path, entries)
    proc = helpers.run("convert", src, "--out", store)
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert (store / NAME / "manifest.json").is_file()
    assert (store / "other" / "manifest.json").is_file()


# --------------------------------------------------------------------------- archives

@pytest.mark.parametrize("keep", ["half", "no-end-record", "cut-central-directory", "10-bytes"])
def test_truncated_archive(tmp_path, entries, store, keep):
    data = write_zip(tmp_path, entries).read_bytes()
    cd = data.find(b"PK\x01\x02")
    cut = {"half": len(data) // 2, "no-end-record": len(data) - 10,
           "cut-central-directory": cd + (len(data) - cd) // 2, "10-bytes": 10}[keep]
    src = tmp_path / "cut" / f"{STEM}.zip"
    src.parent.mkdir()
    src.write_bytes(data[:cut])
    err = convert_refused(src, store, "data", src.name)
    assert "download" in err


@pytest.mark.parametrize("damage", ["signature", "name-length", "offset-beyond-file",
                                    "entry-count", "central-directory-offset"])
def test_damaged_central_directory(tmp_path, entries, store, damage):
    src = write_zip(tmp_path, entries)
    data = bytearray(src.read_bytes())
    cd = data.find(b"PK\x01\x02")
    eocd = data.rfind(b"PK\x05\x06")
    if damage == "signature":
        data[cd:cd + 4] = b"XXXX"
    elif damage == "name-length":
        data[cd + 28:cd + 30] = (0xFFF0).to_bytes(2, "little")
    elif damage == "offset-beyond-file":
        data[cd + 42:cd + 46] = (len(data) + 1000).to_bytes(4, "little")
    elif damage == "entry-count":
        data[eocd + 8:eocd + 12] = (0xFFFF).to_bytes(2, "little") * 2
    else:
        data[eocd + 16:eocd + 20] = (7).to_bytes(4, "little")
    src.write_bytes(bytes(data))
    convert_refused(src, store, "data", src.name)


@pytest.mark.parametrize("method", [STORED, DEFLATED])
@pytest.mark.parametrize("victim", [f"data/videos/{VICTIM}.npy", "meta/neurons/unit_ids.npy"])
def test_crc_mismatch(tmp_path, entries, store, method, victim):
    items = []
    for p, b in sorted(entries.items()):
        e = Entry.of(f"{STEM}/{p}", b, method)
        if p == victim:
            e.crc ^= 0x1234  # data intact, checksum wrong: the archive was damaged
        items.append(e)
    src = write_zip(tmp_path, items)
    convert_refused(src, store, "data", victim, "checksum")


def test_flipped_byte_in_deflated_data(tmp_path, entries, store):
    victim = f"data/responses/{VICTIM}.npy"
    items = []
    for p, b in sorted(entries.items()):
        e = Entry.of(f"{STEM}/{p}", b, DEFLATED)
        if p == victim:
            s = bytearray(e.stored)
            s[len(s) // 2] ^= 0x55
            e.stored = bytes(s)
        items.append(e)
    convert_refused(write_zip(tmp_path, items), store, "data", victim)


def test_empty_archive(tmp_path, store):
    src = write_zip(tmp_path, [])
    convert_refused(src, store, "data", src.name, "no dataset found")


def test_archive_without_data_folder(tmp_path, entries, store):
    meta_only = {p: b for p, b in entries.items() if p.startswith("meta/")}
    convert_refused(write_zip(tmp_path, meta_only), store, "data", "data/videos")


def test_archive_of_unrelated_files(tmp_path, store):
    src = write_zip(tmp_path, {"readme.txt": b"hello\n", "photos/cat.jpg": b"\xff\xd8\xff"})
    convert_refused(src, store, "data", "no dataset found")


@pytest.mark.parametrize("same_bytes", [True, False])
def test_duplicate_entry_names(tmp_path, entries, store, same_bytes):
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    dup = f"data/videos/{VICTIM}.npy"
    other = entries[dup] if same_bytes else entries["data/videos/0.npy"]
    items.append(Entry.of(f"{STEM}/{dup}", other))
    convert_refused(write_zip(tmp_path, items), store, "data", dup, "twice")


@pytest.mark.parametrize("name", [
    f"{STEM}/../evil.npy", f"{STEM}/data/../../evil.npy", "../../../../tmp/evil.npy",
    "/etc/evil.npy", f"{STEM}\\data\\videos\\9.npy", "C:/evil.npy", f"{STEM}/./data/x.npy",
])
def test_hostile_entry_names(tmp_path, entries, store, name):
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    items.append(Entry.of(name, entries[f"data/videos/{VICTIM}.npy"]))
    err = convert_refused(write_zip(tmp_path, items), store, "data")
    assert repr(name)[1:-1].replace("'", "") in err.replace('"', "") or name in err, err
    assert not (tmp_path / "evil.npy").exists() and not Path("/tmp/evil.npy").exists()


@pytest.mark.parametrize("utf8_flag", [False, True])
def test_non_utf8_entry_name(tmp_path, entries, store, utf8_flag):
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    items.append(Entry.of(f"{STEM}/meta/neurons/".encode() + b"\xff\xfe\x80.npy",
                          entries["meta/neurons/unit_ids.npy"],
                          flags=zipcraft.UTF8_FLAG if utf8_flag else 0))
    convert_refused(write_zip(tmp_path, items), store, "data", "UTF-8")


def test_zip_bomb_absurd_ratio(tmp_path, entries, store):
    """An entry declaring 4 GB from a few hundred compressed bytes is refused before reading."""
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    victim = f"data/videos/{VICTIM}.npy"
    for e in items:
        if e.name.decode().endswith(victim):
            e.size = 0xFFFFFFF0
    t0 = time.monotonic()
    convert_refused(write_zip(tmp_path, items), store, "data", victim, "zip bomb")
    assert time.monotonic() - t0 < 20


def test_entry_inflates_beyond_declared_size(tmp_path, entries, store):
    """Deflated data that inflates to 64 MiB while its entry declares the npy's real size."""
    victim = f"data/responses/{VICTIM}.npy"
    items = []
    for p, b in sorted(entries.items()):
        e = Entry.of(f"{STEM}/{p}", b)
        if p == victim:
            e.stored = zipcraft.deflate(b + bytes(64 << 20), 9)
            e.crc = zlib.crc32(b)
        items.append(e)
    convert_refused(write_zip(tmp_path, items), store, "data", victim)


@pytest.mark.parametrize("victim", [f"data/videos/{VICTIM}.npy",
                                    "meta/statistics/videos/all/mean.npy"])
def test_entry_inflates_short_of_declared_size(tmp_path, entries, store, victim):
    """A complete deflate stream that ends 8 bytes early, the entry declaring (and its CRC
    matching) the whole npy: the trial path (inflated into the shard buffer) and the whole-entry
    path (statistics) both name the entry and both sizes. (Both victims are larger than the
    header probe, so the header is read without reaching the end of the entry.)"""
    items = []
    for p, b in sorted(entries.items()):
        e = Entry.of(f"{STEM}/{p}", b)
        if p == victim:
            e.stored = zipcraft.deflate(b[:-8], 6)
        items.append(e)
    size = len(entries[victim])
    convert_refused(write_zip(tmp_path, items), store, "data", victim,
                    f"declares {size} bytes but holds {size - 8}")


def test_entry_too_large_to_read(tmp_path, entries, store):
    """5 GiB of zeros, honestly declared (zip64, ratio within deflate's limits): no Sensorium
    file comes near that, and entries are read whole, so it is refused before reading."""
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    big = 5 << 30
    items.append(Entry(name=f"{STEM}/meta/neurons/huge.npy".encode(),
                       stored=zipcraft.zeros_deflate_stream(big), size=big, crc=0))
    t0 = time.monotonic()
    convert_refused(write_zip(tmp_path, items, zip64=True), store, "data", "huge.npy")
    assert time.monotonic() - t0 < 30


def test_compressed_size_beyond_archive(tmp_path, entries, store):
    items = [Entry.of(f"{STEM}/{p}", b) for p, b in sorted(entries.items())]
    victim = "meta/trials/tiers.npy"
    for e in items:
        if e.name.decode().endswith(victim):
            e.csize = 0x7FFFFFFF
            e.size = 0x7FFFFFFF
    convert_refused(write_zip(tmp_path, items), store, "data", victim)


def test_symlink_pointing_outside_the_folder(tmp_path, entries, store):
    root = write_folder(tmp_path, entries)
    secret = tmp_path / "secret.npy"
    secret.write_bytes(entries["meta/neurons/unit_ids.npy"])
    (root / "meta" / "neurons" / "extra.npy").symlink_to(secret)
    convert_refused(root, store, "data", "extra.npy", "outside")


def test_symlinked_folder_pointing_outside(tmp_path, entries, store):
    root = write_folder(tmp_path, entries)
    outside = tmp_path / "elsewhere"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "1.npy").write_bytes(entries["meta/neurons/unit_ids.npy"])
    (root / "meta" / "linked").symlink_to(outside, target_is_directory=True)
    convert_refused(root, store, "data", "linked", "outside")


def test_symlink_loop_inside_the_folder(tmp_path, entries, store):
    root = write_folder(tmp_path, entries)
    (root / "meta" / "loop").symlink_to(root / "meta", target_is_directory=True)
    convert_refused(root, store, "data", "loop")


def test_fifo_in_the_folder(tmp_path, entries, store):
    root = write_folder(tmp_path, entries)
    os.mkfifo(root / "meta" / "trials" / "pipe.npy")
    convert_refused(root, store, "data", "pipe.npy")


# --------------------------------------------------------------------------- npy files

def npy_file(header: str | bytes, payload: bytes, version=(1, 0), pad: bool = True) -> bytes:
    raw = header.encode("latin-1") if isinstance(header, str) else header
    if pad:
        lsize = 2 if version[0] == 1 else 4
        while (8 + lsize + len(raw) + 1) % 64:
            raw += b" "
        raw += b"\n"
    lenfield = struct_len(len(raw), version)
    return b"\x93NUMPY" + bytes(version) + lenfield + raw + payload


def struct_len(n: int, version) -> bytes:
    return n.to_bytes(2 if version[0] == 1 else 4, "little")


def split_npy(data: bytes) -> tuple[dict, bytes]:
    hlen = int.from_bytes(data[8:10], "little")
    return ast.literal_eval(data[10:10 + hlen].decode("latin-1")), data[10 + hlen:]


def header_of(d: dict) -> str:
    return "{" + ", ".join(f"'{k}': {v!r}" for k, v in d.items()) + ", }"


def npy_cases(entries):
    """name -> (entry to replace, new bytes, text the message must contain)."""
    v = f"data/videos/{VICTIM}.npy"
    r = f"data/responses/{VICTIM}.npy"
    vh, vp = split_npy(entries[v])
    rh, rp = split_npy(entries[r])

    def with_(**kw):
        return header_of({**vh, **kw})

    cases = {
        "bad-magic": (v, b"\x93NUMPX" + entries[v][6:], "magic"),
        "text-file": (v, b"just some text, not numpy\n" * 4, "magic"),
        "empty-file": (v, b"", "magic"),
        "unknown-version": (v, entries[v][:6] + b"\x09\x00" + entries[v][8:], "version"),
        "header-is-a-list": (v, npy_file("['<f4', False, (36, 64, 20)]", vp), "header"),
        "header-is-python-code": (v, npy_file("__import__('os').system('true')", vp), "header"),
        "header-missing-shape": (v, npy_file("{'descr': '<f4', 'fortran_order': False, }", vp),
                                 "shape"),
        "header-extra-key": (v, npy_file(with_(evil=1), vp), "header"),
        "header-unterminated": (v, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (36,",
                                            vp), "header"),
        "header-not-ascii": (v, npy_file(with_(descr="<f4").replace("<f4", "<f\xe94"), vp),
                             "header"),
        "header-utf8-descr": (v, npy_file(header_of({**vh, "descr": "é4"}).encode(), vp,
                                          version=(3, 0)), "dtype"),
        "header-negative-dim": (v, npy_file(with_(shape=(36, -64, 20)), vp), "header"),
        "header-length-beyond-file": (v, entries[v][:8] + b"\xff\xff" + entries[v][10:60],
                                      "header"),
        "header-length-absurd-v2": (v, b"\x93NUMPY\x02\x00" + (1 << 31).to_bytes(4, "little")
                                    + b"{}", "header"),
        "shape-smaller-than-payload": (r, npy_file(header_of({**rh, "shape": (rh["shape"][0] - 1,
                                                                             rh["shape"][1])}), rp),
                                       "payload"),
        "shape-larger-than-payload": (r, npy_file(header_of({**rh, "shape": (rh["shape"][0] + 1,
                                                                            rh["shape"][1])}), rp),
                                      "payload"),
        "terabyte-shape": (v, npy_file(with_(shape=(36, 64, 1 << 40)), vp), "payload"),
        "overflowing-shape": (v, npy_file(with_(shape=(1 << 40, 1 << 40, 1 << 40)), vp),
                              "overflow"),
        "object-dtype": (v, npy_file(with_(descr="|O"), vp), "pickle"),
        "complex-dtype": (v, npy_file(with_(descr="<c8"), vp), "not supported"),
        "datetime-dtype": (v, npy_file(with_(descr="<M8[ns]"), vp), "dtype"),
        "structured-dtype": (v, npy_file(header_of({**vh, "descr": [("a", "<f4")]}), vp),
                             "structured"),
        "truncated-payload": (r, entries[r][:-7], "payload"),
        "string-trial": (v, npy_file(with_(descr="<U1"), vp), "dtype <U1"),
    }
    return cases


NPY_CASES = list(npy_cases(gen_mouse.build_entries(**OPTS)[1]))


@pytest.mark.parametrize("case", NPY_CASES)
def test_malformed_npy_in_archive(tmp_path, entries, store, case):
    victim, data, needle = npy_cases(entries)[case]
    files = dict(entries)
    files[victim] = data
    t0 = time.monotonic()
    err = convert_refused(write_zip(tmp_path, files), store, "data", victim)
    assert needle.lower() in err.lower(), err
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("case", ["terabyte-shape", "truncated-payload", "object-dtype",
                                  "header-length-beyond-file"])
def test_malformed_npy_in_folder(tmp_path, entries, store, case):
    victim, data, needle = npy_cases(entries)[case]
    files = dict(entries)
    files[victim] = data
    err = convert_refused(write_folder(tmp_path, files), store, "data", victim)
    assert needle.lower() in err.lower(), err


def test_pickled_meta_array_is_never_unpickled(tmp_path, entries, store):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    arr = np.empty(3, dtype=object)
    arr[:] = [Boom(), 1, 2]
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    files = dict(entries)
    files["meta/trials/evil.npy"] = buf.getvalue()
    convert_refused(write_zip(tmp_path, files), store, "data", "meta/trials/evil.npy", "pickle")
    assert not marker.exists()


# --------------------------------------------------------------------------- consistency

def npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def consistency_cases():
    def one_trial_other_shape(f):
        f[f"data/videos/{VICTIM}.npy"] = npy_of(load(f[f"data/videos/{VICTIM}.npy"])[:, :-1])
        return f"data/videos/{VICTIM}.npy"

    def one_trial_other_dtype(f):
        f[f"data/videos/{VICTIM}.npy"] = npy_of(load(f[f"data/videos/{VICTIM}.npy"]).astype("<f8"))
        return f"data/videos/{VICTIM}.npy"

    def n_not_unit_ids(f):
        f["meta/neurons/unit_ids.npy"] = npy_of(load(f["meta/neurons/unit_ids.npy"])[:-1])
        return "unit_ids"

    def n_not_coordinates(f):
        f["meta/neurons/cell_motor_coordinates.npy"] = npy_of(
            load(f["meta/neurons/cell_motor_coordinates.npy"])[:-2])
        return "cell_motor_coordinates"

    def coordinates_wrong_width(f):
        f["meta/neurons/cell_motor_coordinates.npy"] = npy_of(
            load(f["meta/neurons/cell_motor_coordinates.npy"])[:, :2])
        return "cell_motor_coordinates"

    def responses_n_differs(f):
        for i in range(OPTS["trials"]):
            p = f"data/responses/{i}.npy"
            f[p] = npy_of(load(f[p])[:-1])
        return "neuron"

    def t_differs_between_variables(f):
        for i in range(OPTS["trials"]):
            p = f"data/pupil_center/{i}.npy"
            f[p] = npy_of(load(f[p])[:, :-3])
        return "frame"

    def trial_missing_in_responses(f):
        del f[f"data/responses/{VICTIM}.npy"]
        return f"trial {VICTIM}"

    def extra_trial_in_behavior(f):
        f["data/behavior/99.npy"] = f["data/behavior/0.npy"]
        return "trial 99"

    def tiers_shorter(f):
        f["meta/trials/tiers.npy"] = npy_of(load(f["meta/trials/tiers.npy"])[:-1])
        return "tiers"

    def tiers_not_strings_2d(f):
        f["meta/trials/tiers.npy"] = npy_of(np.zeros((OPTS["trials"], 2)))
        return "tiers"

    def tiers_missing(f):
        del f["meta/trials/tiers.npy"]
        return "tiers"

    def statistic_not_numeric(f):
        f["meta/statistics/videos/all/mean.npy"] = npy_of(np.array(["a", "b"]))
        return "mean.npy"

    def leading_zero_duplicate_trial(f):
        f["data/videos/02.npy"] = f[f"data/videos/{VICTIM}.npy"]
        return "twice"

    def unclaimed_file(f):
        f["data/notes.txt"] = b"hello"
        return "data/notes.txt"

    return {k: v for k, v in locals().items() if callable(v)}


@pytest.mark.parametrize("case", list(consistency_cases()))
def test_inconsistent_dataset(tmp_path, entries, store, case):
    files = dict(entries)
    needle = consistency_cases()[case](files)
    convert_refused(write_zip(tmp_path, files), store, "data", needle)


def nan_inside(entries, var: str) -> tuple[dict, str]:
    files = dict(entries)
    # A trial with no NaN tail at all (trial position 0 never has one): one NaN in frame 3.
    p = f"data/{var}/0.npy"
    a = load(files[p]).copy()
    assert not np.isnan(a).any()
    a[(0,) * (a.ndim - 1) + (3,)] = np.nan
    files[p] = npy_of(a)
    return files, p


@pytest.mark.parametrize("var", ["videos", "responses"])
def test_nan_inside_the_valid_frames(tmp_path, entries, store, var):
    """The default pipeline says `nan: tail_only` for videos and responses (FORMAT.md: NaN only
    after the stimulus ended): a NaN before the tail is refused, naming trial and frame."""
    files, victim = nan_inside(entries, var)
    convert_refused(write_zip(tmp_path, files), store, "data", victim, "NaN", "frame 3")


def test_nan_allowed_when_the_pipeline_says_so(tmp_path, entries, store):
    files, _ = nan_inside(entries, "videos")
    text = helpers.run("default-pipeline").stdout
    assert text.count("nan: tail_only") == 2, "the default pipeline changed"
    pipeline = tmp_path / "allow.yaml"
    pipeline.write_text(text.replace("nan: tail_only", "nan: allow", 1))
    proc = helpers.run("convert", write_zip(tmp_path, files), "--out", store,
                       "--pipeline", pipeline)
    assert proc.returncode == 0, helpers.describe_run(proc)


# --------------------------------------------------------------------------- pipeline files

def default_pipeline() -> str:
    proc = helpers.run("default-pipeline")
    assert proc.returncode == 0
    return proc.stdout


def alias_bomb() -> str:
    text = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    prev = "a"
    for name in "bcdefghij":
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text + default_pipeline()


PIPELINE_CASES = {
    # name: (edit of the default pipeline text, text the message must contain)
    "unknown-top-key": (lambda t: t + "colour: blue\n", "colour"),
    "unknown-stage-key": (lambda t: t.replace("    measures: [valid_frames]",
                                              "    measures: [valid_frames]\n    speed: 11"),
                          "speed"),
    "unknown-stage-kind": (lambda t: t.replace("kind: statistics", "kind: magic"), "magic"),
    "wrong-type": (lambda t: t.replace("frame_rate_hz: 30.0", "frame_rate_hz: [30]"),
                   "frame_rate_hz"),
    "wrong-type-in-stage": (lambda t: t.replace("    columns: [x, y]", "    columns: x"),
                            "columns"),
    "missing-stages": (lambda t: t.split("stages:")[0], "stages"),
    "not-a-mapping": (lambda t: "- just\n- a list\n", "invalid type"),
    "empty-file": (lambda t: "", "pipeline"),
    "yaml-syntax": (lambda t: "stages: [unclosed\n  - : :\n", "yaml"),
    "alias-bomb": (lambda t: alias_bomb(), "alias"),
    "deep-nesting": (lambda t: t.replace("      units: grey level", "      deep: " + "[" * 20000
                                         + "]" * 20000 + "\n      units: grey level"),
                     "recursion"),
    "chunk-zero": (lambda t: t.replace("chunk_shape: [1, 512, full]", "chunk_shape: [1, 0, full]"),
                   "at least 1"),
    "chunk-negative": (lambda t: t.replace("chunk_shape: [1, 512, full]",
                                           "chunk_shape: [1, -5, full]"), "at least 1"),
    "chunk-huge": (lambda t: t.replace("chunk_shape: [1, 512, full]",
                                       "chunk_shape: [1, 18446744073709551615, full]"), "memory"),
    "shard-huge": (lambda t: t.replace("shard_shape: [4, full, full]",
                                       "shard_shape: [4000000000, full, full]"), "memory"),
    "shard-not-multiple": (lambda t: t.replace("shard_shape: [16, full, full, full]",
                                               "shard_shape: [3, full, full, full]").replace(
        "chunk_shape: [1, full, full, full]", "chunk_shape: [2, full, full, full]"), "multiple"),
    "chunk-wrong-rank": (lambda t: t.replace("chunk_shape: [1, 512, full]", "chunk_shape: [1, 512]"),
                         "extents"),
    "output-dotdot": (lambda t: t.replace("output: trials.parquet", "output: ../../trials.parquet"),
                      ".."),
    "output-dotdot-inside": (lambda t: t.replace("output: data.zarr/videos",
                                                 "output: data.zarr/../../../videos"), ".."),
    "output-absolute": (lambda t: t.replace("output: trials.parquet", "output: /tmp/trials.parquet"),
                        "relative"),
    "output-backslash": (lambda t: t.replace("output: trials.parquet",
                                             "output: ..\\trials.parquet"), "relative"),
    "output-reserved": (lambda t: t.replace("output: data.zarr/videos",
                                            "output: manifest.json/x.zarr/videos"), "manifest.json"),
    "output-nested": (lambda t: t.replace("output: data.zarr/statistics",
                                          "output: data.zarr/videos/statistics"), "inside"),
    "output-twice": (lambda t: t.replace("output: pupil_center.parquet",
                                         "output: behavior.parquet"), "earlier stage"),
    "source-dotdot": (lambda t: t.replace("source: meta/trials", "source: ../meta/trials"), ".."),
    "derived-from-nobody": (lambda t: t.replace("{column: valid_frames, stage: videos",
                                                "{column: valid_frames, stage: ghosts"),
                            "does not exist"),
    "derived-from-later-stage": (lambda t: t.replace("{column: valid_frames, stage: videos",
                                                     "{column: valid_frames, stage: neurons"),
                                 "runs later"),
    "measure-not-computed": (lambda t: t.replace("measures: [all_zero]", "measures: []"),
                             "does not compute"),
    "nan-policy-unknown": (lambda t: t.replace("nan: tail_only", "nan: sometimes", 1), "sometimes"),
    "nan-policy-on-trial-table": (lambda t: t.replace("    columns: [x, y]",
                                                      "    columns: [x, y]\n    nan: allow"), "nan"),
    "stage-id-path": (lambda t: t.replace("id: neurons", "id: ../neurons"), "id"),
    "skip-pattern-invalid": (lambda t: t.replace('pattern: "**/Thumbs.db"', 'pattern: "a[b"'),
                             "pattern"),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_bad_pipeline_file(tmp_path, entries, store, case):
    edit, needle = PIPELINE_CASES[case]
    base = default_pipeline()
    text = edit(base)
    assert text != base, "the edit did not apply"
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(text)
    t0 = time.monotonic()
    err = convert_refused(write_zip(tmp_path, entries), store, "pipeline", "bad.yaml",
                          args=("--pipeline", pipeline))
    assert needle.lower() in err.lower(), err
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", b"\x00" * 100])
def test_binary_pipeline_file(tmp_path, entries, store, content):
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_bytes(content)
    proc = helpers.run("convert", write_zip(tmp_path, entries), "--out", store,
                       "--pipeline", pipeline)
    # Not valid UTF-8 is reported by the CLI's file reader (74) or the parser (78).
    assert proc.returncode in (EXIT["pipeline"], EXIT["io"]), helpers.describe_run(proc)
    refused(proc, "pipeline" if proc.returncode == EXIT["pipeline"] else "io", "bad.yaml")


def test_bad_dataset_name(tmp_path, entries, store):
    src = write_zip(tmp_path, entries)
    for name in ("..", "../escape", "/abs", ".hidden", "a/b"):
        convert_refused(src, store, "data", args=("--name", name))
    assert not (tmp_path / "escape").exists()


# --------------------------------------------------------------------------- environment

def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        if not can_mount():
            pytest.skip("SKIPPED LOUDLY: needs root and mount(8) to build a small or read-only "
                        "file system")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_store(tmp_path, entries, template_store, tmpfs):
    mnt = tmpfs("16m")
    store = mnt / "store"
    shutil.copytree(template_store, store)
    proc = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot remount read-only: {proc.stderr.strip()}")
    src = write_zip(tmp_path, entries)
    convert_refused(src, store, "io", "Read-only")
    # Replacing the existing dataset fails the same way and leaves it whole.
    convert_refused(src, store, "io", "Read-only", args=("--name", "other", "--force"))
    assert (store / "other" / "manifest.json").is_file()


def test_disk_full_mid_write(tmp_path, template_store, tmpfs):
    mnt = tmpfs("3m")
    store = mnt / "store"
    shutil.copytree(template_store, store)
    # Noise does not compress: about 8 MB of output for a 3 MB file system.
    src = gen_mouse.generate(tmp_path / "big", trials=6, neurons=2000, frames=100, seed=507)
    before = tree_snapshot(store)
    # Refused before anything is written: the file system clearly lacks the space.
    proc = helpers.run("convert", src, "--out", store, "--name", NAME, timeout=300)
    refused(proc, "io", "not enough space: the run needs about")
    store_unharmed(store, before)
    # Started anyway, the disk fills up mid-write: the same clean failure, with the figures.
    proc = helpers.run("convert", src, "--out", store, "--name", NAME, "--no-space-check",
                       timeout=300)
    refused(proc, "io", "No space left")
    assert "the disk is full" in proc.stderr and "the run needs about" in proc.stderr, proc.stderr
    # The staging folder is kept for the rerun to resume from; nothing else changed.
    staging = store / f".{NAME}.partial"
    assert staging.is_dir() and not (staging / "manifest.json").exists()
    shutil.rmtree(staging)
    store_unharmed(store, before)
