"""The generator itself: deterministic, and its mice look like FORMAT.md says.

These tests need no binary; they keep the generator honest so the converter
tests compare against the right thing."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

import gen_mouse
from helpers import Source, is_junk

CASES = {
    "default": dict(trials=12, neurons=40, frames=44, seed=1),
    "gaps": dict(trials=12, neurons=40, frames=44, seed=2, gaps=True),
    "old": dict(trials=12, neurons=40, frames=44, seed=3, old_release=True, extra_meta=True,
                extra_stats=True, static_stats=True),
    "f8-big-fortran": dict(trials=7, neurons=20, frames=40, seed=4, dtype=">f8", order="F",
                           nan_payload=True),
    "packaging": dict(trials=11, neurons=20, frames=40, seed=5, zip64=True, compression="stored",
                      junk=True, dir_entries=True),
    "long": dict(trials=5, neurons=10, frames=320, seed=6),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for k, opts in CASES.items():
        out[k] = gen_mouse.generate(tmp_path_factory.mktemp(f"gen-{k}"), **opts)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_options_same_bytes(tmp_path, built, case):
    again = gen_mouse.generate(tmp_path, **CASES[case])
    assert again.name == built[case].name
    assert again.read_bytes() == built[case].read_bytes()


def test_seed_and_options_change_output(tmp_path):
    a = gen_mouse.generate(tmp_path / "a", trials=3, neurons=5, frames=10, seed=1)
    b = gen_mouse.generate(tmp_path / "b", trials=3, neurons=5, frames=10, seed=2)
    c = gen_mouse.generate(tmp_path / "c", trials=3, neurons=5, frames=10, seed=1, dtype="<f8")
    assert len({a.name, b.name, c.name}) == 3
    assert a.read_bytes() != b.read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_zip_layout(built, case):
    opts = CASES[case]
    with zipfile.ZipFile(built[case]) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names), "entries are written in sorted (lexicographic) order"
    assert all(i.date_time == (2023, 1, 1, 0, 0, 0) for i in infos)
    stem = built[case].name[:-4]
    assert all(n.startswith((stem + "/", "__MACOSX/")) for n in names)
    want = zipfile.ZIP_STORED if opts.get("compression") == "stored" else zipfile.ZIP_DEFLATED
    assert all(i.compress_type == want for i in infos if not i.is_dir())
    if opts.get("zip64"):
        raw = built[case].read_bytes()
        for i in infos:
            if i.is_dir():
                continue
            # local header: sizes 0xFFFFFFFF and a zip64 extra field (id 1)
            h = i.header_offset
            assert raw[h:h + 4] == b"PK\x03\x04"
            csize, usize, nlen, xlen = struct.unpack("<IIHH", raw[h + 18:h + 30])
            assert (csize, usize) == (0xFFFFFFFF, 0xFFFFFFFF)
            assert struct.unpack("<H", raw[h + 30 + nlen:h + 32 + nlen])[0] == 1
            # central directory record carries the zip64 extra field as well
            assert struct.unpack("<H", i.extra[:2])[0] == 1
        assert b"PK\x06\x06" in raw[-200:] and b"PK\x06\x07" in raw[-200:], "zip64 end record"
    if opts.get("dir_entries"):
        assert f"{stem}/data/videos/" in names
    if opts.get("junk"):
        assert set(gen_mouse.junk_paths(stem, True)) <= set(names)
    vids = [n.rsplit("/", 1)[1] for n in names
            if "/data/videos/" in n and n.endswith(".npy") and not is_junk(n)]
    numbers = [int(v[:-4]) for v in vids]
    if max(numbers) >= 10:
        assert numbers != sorted(numbers), "archive order must be lexicographic, not numeric"


@pytest.mark.parametrize("case", list(CASES))
def test_contents_follow_the_format(built, case):
    opts = CASES[case]
    src = Source(built[case])
    n, N, T = src.shape
    assert (n, N, T) == (opts["trials"], opts["neurons"], opts["frames"])
    dt = np.dtype(opts.get("dtype", "<f4"))
    info = gen_mouse.describe(**opts)
    assert src.trial_ids == info["trial_ids"]
    if opts.get("gaps") or opts.get("old_release"):
        assert src.trial_ids != list(range(n))
    else:
        assert src.trial_ids == list(range(n))
    for pos, i in enumerate(src.trial_ids):
        v, r = src.trial("videos", i), src.trial("responses", i)
        b, pc = src.trial("behavior", i), src.trial("pupil_center", i)
        assert v.shape == (36, 64, T) and r.shape == (N, T) and b.shape == (2, T) and pc.shape == (2, T)
        for a in (v, r, b, pc):
            assert a.dtype.str == dt.str
            if opts.get("order") == "F":
                assert a.flags.f_contiguous and not a.flags.c_contiguous
        L = src.valid_frames[pos]
        assert L == info["valid_lengths"][pos]
        assert not np.isnan(v[..., :L]).any() and np.isnan(v[..., L:]).all()
        good = v[..., :L]
        assert (good == np.round(good)).all() and good.min() >= 0 and good.max() <= 255
        assert good.std() > 5, "videos should show a pattern"
        assert not np.isnan(b).any()
        assert not np.isnan(pc[:, :L]).any() and np.isnan(pc[:, L:]).all()
        if src.tiers[pos] in gen_mouse.WITHHELD_TIERS:
            assert (r == 0).all() and src.withheld[pos]
        else:
            assert not np.isnan(r[:, :L]).any() and np.isnan(r[:, L:]).all()
            assert (r[:, :L] >= 0).all() and 0.3 < (r[:, :L] == 0).mean() < 0.99
            assert not src.withheld[pos]
        if opts.get("nan_payload") and L < T:
            bits = v[..., L:].astype(dt.newbyteorder("=")).view(f"u{dt.itemsize}")
            assert (bits == gen_mouse.NAN_PAYLOAD_BITS[dt.itemsize]).all()
    vf = src.valid_frames
    assert T in vf and min(vf) < T
    if T > 300:
        assert 300 in vf
    else:
        assert min(vf) >= int(np.ceil(0.75 * T))
    assert any(src.withheld) and not all(src.withheld)

    tiers = src.load("meta/trials/tiers.npy")
    assert tiers.dtype.kind == "U" and tiers.shape == (n,)
    allowed = set(gen_mouse.NEW_TIERS) | ({"none"} if opts.get("old_release") else set())
    assert set(src.tiers) <= allowed and "train" in src.tiers
    if opts.get("old_release"):
        assert "none" in src.tiers and "meta/trials/trial_idx.npy" not in src.entries
    else:
        ti = src.load("meta/trials/trial_idx.npy")
        assert ti.dtype.kind == "U" and ti.shape == (n,)
        assert all(all(part.isdigit() for part in s.split("--")) for s in ti.tolist())
    coords = src.load("meta/neurons/cell_motor_coordinates.npy")
    assert coords.shape == (N, 3) and coords.dtype == np.int64
    uid = src.load("meta/neurons/unit_ids.npy")
    assert uid.dtype == np.int64 and (np.diff(uid) > 0).all() and (np.diff(uid) > 1).any()
    for var, shape in (("videos", (36, 64, T)), ("responses", (N, T)), ("behavior", (2, T)),
                       ("pupil_center", (2, T))):
        for stat in ("min", "max", "mean", "std"):
            s = src.load(f"meta/statistics/{var}/all/{stat}.npy")
            assert s.shape == shape and s.dtype.str == dt.str
        if opts.get("extra_stats"):
            assert src.load(f"meta/statistics/{var}/train/median.npy").shape == shape
            assert src.load(f"meta/statistics/{var}/all/median.npy").shape == shape
    if opts.get("static_stats"):
        assert src.load("meta/statistics/videos/static/mean.npy").shape == (36, 64)
        assert src.load("meta/statistics/responses/static/std.npy").shape == (N,)
        assert src.load("meta/statistics/behavior/static/mean.npy").shape == (2,)
    mean = src.load("meta/statistics/videos/all/mean.npy").astype(np.float64)
    np.testing.assert_allclose(mean, np.nanmean(src.stack("videos").astype(np.float64), axis=0),
                               rtol=1e-6)
    if opts.get("extra_meta"):
        assert src.extra_meta("neurons") == ["animal_ids", "area", "layer"]
        assert src.load("meta/neurons/layer.npy").dtype.kind == "S"
        assert src.load("meta/neurons/area.npy").dtype.kind == "U"
        assert src.extra_meta("trials") == ["condition_hash", "is_repeat", "session_frame"]
        assert src.load("meta/trials/is_repeat.npy").dtype == np.bool_
        assert src.load("meta/trials/session_frame.npy").dtype == np.int32


def test_junk_is_recognised(built):
    src = Source(built["packaging"])
    assert src.junk == sorted(["__MACOSX/" + src.name + "/data/videos/._0.npy", ".DS_Store",
                               "data/responses/._1.npy"])
    assert all(is_junk(p) for p in src.junk)


def test_no_top_folder_and_folder_format(tmp_path):
    opts = dict(trials=3, neurons=5, frames=10, seed=9, junk=True)
    z = gen_mouse.generate(tmp_path / "z", no_top_folder=True, **opts)
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
    assert all(n.startswith(("data/", "meta/", "__MACOSX/data/", ".DS_Store")) for n in names)
    f = gen_mouse.generate(tmp_path / "f", format="folder", **opts)
    assert f.is_dir() and f.name == z.name[:-4]
    assert (f / "data" / "videos" / "2.npy").is_file() and (f / ".DS_Store").is_file()
    with zipfile.ZipFile(z) as zf:
        for rel in ("data/videos/1.npy", "meta/trials/tiers.npy"):
            assert (f / rel).read_bytes() == zf.read(rel)


def test_object_array_needs_pickle(tmp_path):
    z = gen_mouse.generate(tmp_path, trials=3, neurons=5, frames=10, object_array=True)
    src = Source(z)
    raw = src.entries["meta/neurons/bad.npy"]
    with pytest.raises(ValueError):
        np.load(io.BytesIO(raw), allow_pickle=False)
    assert np.load(io.BytesIO(raw), allow_pickle=True).dtype == object


@pytest.mark.parametrize("kind", gen_mouse.CORRUPTIONS)
def test_corruptions_break_what_they_say(tmp_path, kind):
    opts = dict(trials=11, neurons=6, frames=12, seed=3, corrupt=kind)
    z = gen_mouse.generate(tmp_path, **opts)
    v = gen_mouse.describe(**opts)["corrupt_victim"]
    src = Source(z)
    if kind == "truncated-npy":
        with pytest.raises(ValueError):
            src.load(f"data/responses/{v}.npy")
    elif kind == "bad-magic":
        with pytest.raises(ValueError):
            src.load(f"data/videos/{v}.npy")
    elif kind == "shape-mismatch":
        assert src.load(f"data/responses/{v}.npy").shape == (5, 12)
    elif kind == "frames-mismatch":
        assert src.load(f"data/behavior/{v}.npy").shape == (2, 11)
    elif kind == "missing-trial":
        assert f"data/pupil_center/{max(src.files_under('data/videos'))}" not in src.entries
        assert len(src.files_under("data/pupil_center")) == 10
    elif kind == "tiers-length":
        assert src.load("meta/trials/tiers.npy").shape == (10,)


def test_cli_prints_the_path(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, gen_mouse.__file__, str(tmp_path), "--trials", "2",
                          "--neurons", "3", "--frames", "8", "--format", "folder",
                          "--hex", "ab" * 16], capture_output=True, text=True, check=True)
    p = out.stdout.strip()
    assert p.endswith("dynamic90000-1-1-Video-" + "ab" * 16)
    assert (tmp_path / p.rsplit("/", 1)[1] / "meta" / "trials" / "tiers.npy").is_file()
