"""docs/recipes.md cannot rot: every ```python block on the page is run here against the
committed sample mouse converted by the real binary, and what it computes is compared with
values taken from the source .npy files with numpy (helpers.Source), never from the store.

Blocks are marked on the page with `<!-- recipe: NAME [after: A B] [requires: MODULE] -->` on
the line before the fence. A recipe runs in a fresh namespace after the recipes it names in
`after:`; the dataset path reaches it through the SENSORIUM_DATASET variable it reads.

`python tests/python/test_recipes.py --write-image` regenerates docs/img/trial.png from the
committed sample (recipe `plot`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import helpers
from helpers import REPO, Source, assert_bits_equal

PAGE = REPO / "docs" / "recipes.md"
IMAGE = REPO / "docs" / "img" / "trial.png"
FIXTURE = REPO / "fixtures" / "dynamic90001-1-1-Video-0123456789abcdef0123456789abcdef.zip"
NAME = "dynamic90001-1-1"
PNG_SIZE = (1000, 320)          # figsize (10, 3.2) at dpi 100, as the recipe saves it
RECIPES = {"plot", "duckdb", "standardize", "windows", "windows-standardized", "torch",
           "polars", "one-neuron", "bucket"}
MARK = re.compile(r"^<!-- recipe: (?P<name>[\w-]+)(?: after: (?P<after>[\w -]+?))?"
                  r"(?: requires: (?P<requires>\w+))? -->$")


# ----------------------------------------------------------------------------- page parsing

def parse_page(text: str) -> dict[str, dict]:
    """name -> {"code", "after", "requires", "line"} for every marked ```python block."""
    lines = text.splitlines()
    out: dict[str, dict] = {}
    for i, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        m = MARK.match(lines[i - 1].strip()) if i > 0 else None
        assert m, f"docs/recipes.md:{i + 1}: python block without a `<!-- recipe: NAME -->` line"
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        name = m["name"]
        assert name not in out, f"recipe {name!r} appears twice"
        out[name] = {"code": "\n".join(lines[i + 1:end]) + "\n", "line": i + 2,
                     "after": (m["after"] or "").split(), "requires": m["requires"]}
    return out


def recipes() -> dict[str, dict]:
    return parse_page(PAGE.read_text())


def recipe_order(name: str) -> list[str]:
    """The recipes `name` runs after (depth first), then `name`."""
    page = recipes()
    order: list[str] = []

    def visit(n):
        for dep in page[n]["after"]:
            visit(dep)
        if n not in order:
            order.append(n)

    visit(name)
    return order


def recipe_script(name: str) -> str:
    """Recipe `name` and those it runs after, as one script a user would save and run."""
    page = recipes()
    return "\n".join(page[n]["code"] for n in recipe_order(name))


def run_script(code: str, dataset: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` as `python script.py` (its own process, `__name__ == "__main__"`)."""
    script = tmp_path / "recipe_script.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, "SENSORIUM_DATASET": str(dataset)})


def run_recipe(name: str, dataset: Path, **env) -> dict:
    """Execute recipe `name` (after its `after:` recipes) in one fresh namespace."""
    page = recipes()
    order = recipe_order(name)
    saved = {k: os.environ.get(k) for k in ["SENSORIUM_DATASET", *env]}
    os.environ["SENSORIUM_DATASET"] = str(dataset)
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        ns: dict = {"__name__": f"recipe_{name.replace('-', '_')}"}
        for n in order:
            # the line offset makes tracebacks point at the page's own line numbers
            code = "\n" * (page[n]["line"] - 1) + page[n]["code"]
            exec(compile(code, str(PAGE), "exec"), ns)
        return ns
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dataset(ingest_bin, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("recipes-store")
    proc = helpers.run("convert", FIXTURE, "--out", store)
    assert proc.returncode == 0, helpers.describe_run(proc)
    return store / NAME


@pytest.fixture(scope="module", params=["sensorium2023", "sensorium2023-training"])
def window_dataset(request, dataset, tmp_path_factory) -> Path:
    """The store recipe 4 reads: the default one, or one converted with the pipeline recipe 4
    recommends for training (32-frame chunks, uncompressed)."""
    if request.param == "sensorium2023":
        return dataset
    store = tmp_path_factory.mktemp("recipes-training-store")
    proc = helpers.run("convert", FIXTURE, "--out", store, "--pipeline", request.param)
    assert proc.returncode == 0, helpers.describe_run(proc)
    return store / NAME


@pytest.fixture(scope="module")
def src() -> Source:
    return Source(FIXTURE)


def first_nan_frame(src: Source, trial_id: int) -> int:
    """First frame holding a NaN in the video or the responses (T if none)."""
    v = np.isnan(src.trial("videos", trial_id)).any(axis=(0, 1))
    r = np.isnan(src.trial("responses", trial_id)).any(axis=0)
    nan = v | r
    return int(nan.argmax()) if nan.any() else len(nan)


def train_positions(src: Source) -> list[int]:
    return [p for p, t in enumerate(src.tiers) if t == "train"]


def official(src: Source, var: str, x: np.ndarray, frames: slice) -> np.ndarray:
    """The loaders' standardisation (neuralpredictors NeuroNormalizer, FORMAT.md), written
    out from the source statistics; 0/0 at a zero std is taken as 0, as the page documents."""
    mean = src.load(f"meta/statistics/{var}/all/mean.npy")[..., frames].astype(np.float64)
    std = src.load(f"meta/statistics/{var}/all/std.npy").astype(np.float64)
    x = x.astype(np.float64)
    if var == "responses":
        threshold = 0.01 * np.nanmean(std)
        idx = std > threshold
        precision = np.ones_like(std) / threshold
        precision[idx] = 1 / std[idx]
        return x * precision[..., frames]
    std = std[..., frames]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = x / std if var == "behavior" else (x - mean) / std
    return np.where(std == 0, 0.0, out)


# ----------------------------------------------------------------------------- the page

def test_page_holds_exactly_the_tested_recipes():
    page = recipes()
    assert set(page) == RECIPES, (
        f"recipes on the page {sorted(page)} != tested recipes {sorted(RECIPES)}: "
        "give a new recipe its checks in this file")
    for name, r in page.items():
        assert set(r["after"]) <= set(page), f"{name}: unknown recipe in after: {r['after']}"
        assert name == "torch" or r["requires"] is None


def test_parse_page_refuses_unmarked_blocks():
    with pytest.raises(AssertionError, match="without a"):
        parse_page("text\n```python\nprint(1)\n```\n")
    got = parse_page("<!-- recipe: a after: b c requires: torch -->\n```python\nx = 1\n```\n")
    assert got["a"]["after"] == ["b", "c"] and got["a"]["requires"] == "torch"
    assert got["a"]["code"] == "x = 1\n"


def test_readme_links_the_recipes_and_the_image():
    text = (REPO / "README.md").read_text()
    sections = re.findall(r"^## .*$", text, flags=re.M)
    assert sections[-1] == "## Analysis recipes", "the recipes section is the README's last"
    last = text[text.rindex("## Analysis recipes"):]
    assert "(docs/recipes.md)" in last and "](docs/img/trial.png)" in last
    assert "](img/trial.png)" in PAGE.read_text()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg
    data = path.read_bytes()
    assert len(data) > 10_000, f"{path}: {len(data)} bytes is too small for the figure"
    assert _png_size(data) == PNG_SIZE
    assert data.rstrip().endswith(b"IEND\xaeB`\x82")
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.shape == (PNG_SIZE[1], PNG_SIZE[0], 3)
    # something was drawn: well under half of the pixels are background white
    white = (pixels > 0.99).all(axis=-1).mean()
    assert 0.2 < white < 0.9, f"{white:.0%} of the pixels are white"


# ----------------------------------------------------------------------------- 1. plot

def test_recipe_plot(dataset, src, tmp_path):
    png = tmp_path / "trial.png"
    ns = run_recipe("plot", dataset, SENSORIUM_RECIPE_PNG=png)
    trial, frame = ns["trial"], ns["frame"]
    trial_id = src.trial_ids[trial]
    video = src.trial("videos", trial_id)
    responses = src.trial("responses", trial_id)
    assert_bits_equal(ns["image"], video[:, :, frame], "plotted frame")
    means = np.nanmean(responses.astype(np.float64), axis=1)
    assert means[ns["neuron"]] >= means.max() * (1 - 1e-6), "not the most active neuron"
    assert_bits_equal(ns["trace"], responses[ns["neuron"]], "plotted trace")
    assert np.isnan(ns["trace"]).any(), "the plotted trial should show a NaN tail"
    unit_ids = src.load("meta/neurons/unit_ids.npy")
    assert ns["neurons"].unit_id[ns["neuron"]] == unit_ids[ns["neuron"]]
    assert ns["row"].valid_frames == first_nan_frame(src, trial_id)
    _check_png(png)


def test_committed_image_is_a_plot_of_the_current_recipe():
    _check_png(IMAGE)


# ----------------------------------------------------------------------------- 2. duckdb

def test_recipe_duckdb(dataset, src):
    ns = run_recipe("duckdb", dataset)
    train = ns["train"]
    positions = train_positions(src)
    assert train.trial.tolist() == positions
    assert train.trial_id.tolist() == [src.trial_ids[p] for p in positions]
    for p, got in zip(positions, train.itertuples()):
        tid = src.trial_ids[p]
        valid = first_nan_frame(src, tid)
        assert got.valid_frames == valid
        beh = src.trial("behavior", tid).astype(np.float64)
        assert got.running_speed == pytest.approx(beh[1, :valid].mean(), rel=1e-12)
        assert got.pupil_dilation == pytest.approx(beh[0, :valid].mean(), rel=1e-12)
    assert_bits_equal(ns["batch"], src.stack("responses")[positions], "train batch")


# ----------------------------------------------------------------------------- 3. standardize

def test_recipe_standardize(dataset, src):
    ns = run_recipe("standardize", dataset)
    trial = train_positions(src)[1]
    tid = src.trial_ids[trial]
    valid = first_nan_frame(src, tid)
    assert (ns["trial"], ns["valid"]) == (trial, valid)
    frames = slice(0, valid)
    raw = {"videos": src.trial("videos", tid)[..., frames],
           "responses": src.trial("responses", tid)[..., frames],
           "behavior": src.trial("behavior", tid)[..., frames],
           "pupil_center": src.trial("pupil_center", tid)[..., frames]}
    for var, x in ns["sample"].items():
        assert x.shape == raw[var].shape, f"{var}: {x.shape}"
        assert x.dtype == np.float32, f"{var}: {x.dtype}"
        assert not np.isnan(x).any(), f"{var}: NaN left after cutting at the first NaN frame"
        np.testing.assert_allclose(x, official(src, var, raw[var], frames), rtol=2e-6,
                                   atol=1e-6, err_msg=var)
        assert not np.allclose(x, raw[var]), f"{var} was not standardised"


def test_standardizer_on_every_trial_including_the_floor_and_zero_std(dataset, src):
    ns = run_recipe("standardize", dataset)
    standardize = ns["Standardizer"](str(dataset))
    std = src.load("meta/statistics/responses/all/std.npy")
    assert (std < 0.01 * np.nanmean(std)).any(), "the sample should exercise the std floor"
    assert (src.load("meta/statistics/videos/all/std.npy") == 0).any()
    for tid in src.trial_ids:
        frames = slice(0, first_nan_frame(src, tid))
        for var in ("videos", "responses", "behavior", "pupil_center"):
            x = src.trial(var, tid)[..., frames]
            got = standardize(var, x, frames)
            assert not np.isnan(got).any(), f"{var} of trial_id {tid}"
            np.testing.assert_allclose(got, official(src, var, x, frames), rtol=2e-6,
                                       atol=1e-6, err_msg=f"{var} of trial_id {tid}")
    # a window in the middle of a trial uses the statistics of its own frames
    frames = slice(20, 50)
    x = src.trial("responses", src.trial_ids[0])[:, frames]
    np.testing.assert_allclose(standardize("responses", x, frames),
                               official(src, "responses", x, frames), rtol=2e-6)


# ----------------------------------------------------------------------------- 4. windows

def _expected_window(src: Source, trial: int, start: int, frames: int) -> dict:
    tid = src.trial_ids[trial]
    w = slice(start, start + frames)
    return {"videos": np.moveaxis(src.trial("videos", tid)[..., w], -1, 0),
            "responses": src.trial("responses", tid)[:, w].T,
            "behavior": src.trial("behavior", tid)[:, w].T,
            "pupil_center": src.trial("pupil_center", tid)[:, w].T}


def test_recipe_windows(window_dataset, src):
    ns = run_recipe("windows", window_dataset)
    Windows, train = ns["SensoriumWindows"], ns["train"]
    n, N, T = src.shape
    W = train.frames
    positions = train_positions(src)
    assert len(train) == len(positions) * 4
    starts = []
    for i in range(len(train)):
        item = train[i]
        trial, start = item["trial"], item["start"]
        assert trial == positions[i // 4]
        assert isinstance(trial, int) and isinstance(start, int)
        valid = first_nan_frame(src, src.trial_ids[trial])
        assert 0 <= start and start + W <= valid, f"window {start}+{W} beyond {valid} frames"
        want = {"videos": (W, 36, 64), "responses": (W, N), "behavior": (W, 2),
                "pupil_center": (W, 2)}
        for var, exp in _expected_window(src, trial, start, W).items():
            x = item[var]
            assert x.shape == want[var] and x.dtype == np.float32, f"{var}: {x.shape} {x.dtype}"
            assert x.flags.c_contiguous
            assert not np.isnan(x).any()
            assert_bits_equal(x, exp, f"item {i} {var}")
        starts.append(start)
    assert len(set(starts)) > 3, f"windows are not random: starts {starts}"
    with pytest.raises(IndexError):
        train[len(train)]
    # items stack into a batch the way a DataLoader's default collate stacks them
    batch = {k: np.stack([train[i][k] for i in range(4)]) for k in ("videos", "responses")}
    assert batch["videos"].shape == (4, W, 36, 64) and batch["responses"].shape == (4, W, N)


def test_training_store_holds_every_value_of_the_source(window_dataset, src):
    """Whatever the layout, zarr-python reads every value of the source, bit for bit, and the
    store verifies."""
    import zarr

    g = zarr.open_group(window_dataset / "data.zarr", mode="r")
    for var in ("videos", "responses"):
        values = g[var][...]
        for position, tid in enumerate(src.trial_ids):
            assert_bits_equal(values[position], src.trial(var, tid), f"{var} trial {tid}")
    assert helpers.run("verify", window_dataset).returncode == 0


def test_windows_are_deterministic_per_seed_and_epoch(dataset):
    ns = run_recipe("windows", dataset)
    Windows = ns["SensoriumWindows"]

    def starts(ds):
        return [ds[i]["start"] for i in range(len(ds))]

    a, b = Windows(str(dataset), windows_per_trial=4, seed=7), \
        Windows(str(dataset), windows_per_trial=4, seed=7)
    assert starts(a) == starts(b)
    assert starts(a) == starts(a), "reading an item twice gives the same window"
    assert starts(Windows(str(dataset), windows_per_trial=4, seed=8)) != starts(a)
    first = starts(a)
    a.set_epoch(1)
    assert starts(a) != first
    a.set_epoch(0)
    assert starts(a) == first


def test_windows_leave_out_short_trials_and_select_tiers(dataset, src):
    ns = run_recipe("windows", dataset)
    Windows = ns["SensoriumWindows"]
    valid = [first_nan_frame(src, t) for t in src.trial_ids]
    long_train = [p for p in train_positions(src) if valid[p] >= 72]
    assert 0 < len(long_train) < len(train_positions(src)), "the sample should have both"
    ds = Windows(str(dataset), frames=72)
    assert len(ds) == len(long_train)
    for i in range(len(ds)):
        item = ds[i]
        assert item["trial"] == long_train[i]
        assert item["start"] + 72 <= valid[item["trial"]]
    both = Windows(str(dataset), frames=30, tiers=("train", "oracle"))
    assert [both[i]["trial"] for i in range(len(both))] == [
        p for p, t in enumerate(src.tiers) if t in ("train", "oracle") and valid[p] >= 30]
    # a window as long as a whole trial has exactly one place to go
    full = Windows(str(dataset), frames=src.shape[2])
    assert len(full) == sum(1 for p in train_positions(src) if valid[p] == src.shape[2])
    assert all(full[i]["start"] == 0 for i in range(len(full)))


def test_recipe_windows_standardized(dataset, src):
    ns = run_recipe("windows-standardized", dataset)
    raw_ds, z_ds = ns["train"], ns["train_z"]
    assert len(z_ds) == len(raw_ds)
    for i in range(len(z_ds)):
        item, raw = z_ds[i], raw_ds[i]
        assert (item["trial"], item["start"]) == (raw["trial"], raw["start"])
        frames = slice(item["start"], item["start"] + z_ds.frames)
        for var, exp in _expected_window(src, item["trial"], item["start"], z_ds.frames).items():
            x = item[var]
            assert x.dtype == np.float32 and not np.isnan(x).any(), var
            # back to the store layout (frame last) for the reference formula
            want = official(src, var, np.moveaxis(exp, 0, -1), frames)
            np.testing.assert_allclose(np.moveaxis(x, 0, -1), want, rtol=2e-6, atol=1e-6,
                                       err_msg=f"item {i} {var}")


def _items_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        if isinstance(w, np.ndarray):
            assert_bits_equal(got[k], w, f"{what} {k}")
        else:
            assert got[k] == w, f"{what} {k}"


def test_windows_read_with_tensorstore_or_else_zarr_python(window_dataset, monkeypatch):
    """open_array takes tensorstore when it is installed (tests/python/requirements.txt installs
    it) and falls back to zarr-python without it; both give the same items."""
    import zarr

    fast = run_recipe("windows", window_dataset)["train"]
    assert type(fast.videos).__name__ == type(fast.responses).__name__ == "TensorStore"
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # `import tensorstore` now fails
    plain = run_recipe("windows", window_dataset)["train"]
    assert isinstance(plain.videos, zarr.Array) and isinstance(plain.responses, zarr.Array)
    assert len(plain) == len(fast)
    for i in range(len(fast)):
        _items_equal(fast[i], plain[i], f"item {i}")


SPAWNED_WORKERS = """
import multiprocessing

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.map(train_z.__getitem__, range(len(train_z)))
    for i, item in enumerate(got):
        want = train_z[i]
        assert item.keys() == want.keys(), i
        for k, w in want.items():
            same = w.tobytes() == item[k].tobytes() if isinstance(w, np.ndarray) else w == item[k]
            assert same, (i, k)
    print(f"{len(got)} items, the same from 2 spawned workers")
"""


def test_windows_dataset_reads_in_spawned_workers(dataset, tmp_path):
    """What the torch block relies on, without torch: the standardised dataset (tensorstore's
    arrays and the transform) pickles into spawned worker processes, which read the items the
    parent reads."""
    proc = run_script(recipe_script("windows-standardized") + SPAWNED_WORKERS, dataset, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\d+ items, the same from 2 spawned workers$", proc.stdout, re.M), \
        proc.stdout


def test_recipe_torch(dataset, tmp_path):
    r = recipes()["torch"]
    compile(r["code"], str(PAGE), "exec")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the DataLoader block was only compiled")
    # as a script: spawned workers import the script's own module again
    proc = run_script(recipe_script("torch"), dataset, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes = re.findall(r"torch\.Size\(\[(\d+), 30, 36, 64\]\)", proc.stdout)
    assert shapes and int(shapes[0]) == 4, proc.stdout


# ----------------------------------------------------------------------------- 5. polars

def test_recipe_polars(dataset, src):
    ns = run_recipe("polars", dataset)
    summary = ns["summary"]
    assert summary["trial"].to_list() == list(range(src.n_trials))
    assert summary["trial_id"].to_list() == src.trial_ids
    assert summary["tier"].to_list() == src.tiers
    by_tier: dict[str, list[float]] = {}
    for p, row in enumerate(summary.iter_rows(named=True)):
        tid = src.trial_ids[p]
        valid = first_nan_frame(src, tid)
        beh = src.trial("behavior", tid)[:, :valid].astype(np.float64)
        assert row["frames"] == valid
        assert row["running_speed"] == pytest.approx(beh[1].mean(), rel=1e-5)
        assert row["running_speed_max"] == beh[1].max()
        assert row["running_fraction"] == pytest.approx((beh[1] > 1.0).mean(), rel=1e-12)
        assert row["pupil_dilation"] == pytest.approx(beh[0].mean(), rel=1e-5)
        by_tier.setdefault(src.tiers[p], []).append(beh[1].mean())
    per_tier = ns["per_tier"]
    assert per_tier["tier"].to_list() == sorted(by_tier)
    assert per_tier["trials"].to_list() == [len(by_tier[t]) for t in sorted(by_tier)]
    np.testing.assert_allclose(per_tier["running_speed"].to_numpy(),
                               [np.mean(by_tier[t]) for t in sorted(by_tier)], rtol=1e-5)


# ----------------------------------------------------------------------------- 6. one neuron

def test_recipe_one_neuron(dataset, src):
    ns = run_recipe("one-neuron", dataset)
    unit_ids = src.load("meta/neurons/unit_ids.npy").tolist()
    assert ns["UNIT_ID"] in unit_ids
    neuron = unit_ids.index(ns["UNIT_ID"])
    assert ns["neuron"] == neuron and neuron > 0
    stack = src.stack("responses")
    assert_bits_equal(ns["trace"], stack[:, neuron, :], "one neuron across every trial")
    recorded = ~np.array(src.withheld)
    assert 0 < recorded.sum() < src.n_trials
    np.testing.assert_allclose(ns["per_trial"],
                               np.nanmean(stack[recorded, neuron, :].astype(np.float64), axis=1),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- image

def write_image() -> None:
    """Regenerate docs/img/trial.png: convert the committed sample, run recipe `plot`."""
    if not helpers.binary().is_file():
        sys.exit(f"no binary at {helpers.binary()}: cargo build --release first")
    with tempfile.TemporaryDirectory() as tmp:
        proc = helpers.run("convert", FIXTURE, "--out", tmp)
        if proc.returncode != 0:
            sys.exit(helpers.describe_run(proc))
        IMAGE.parent.mkdir(parents=True, exist_ok=True)
        run_recipe("plot", Path(tmp) / NAME, SENSORIUM_RECIPE_PNG=IMAGE)
    print(IMAGE)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-image"]:
        sys.exit("usage: python tests/python/test_recipes.py --write-image")
    write_image()


# ----------------------------------------------------------------------------- 7. bucket

def test_recipe_bucket(src, tmp_path):
    """Recipe 7 against a real S3-compatible server: the fixture converted into a bucket, then
    read by the recipe as written, with only the standard AWS variables set."""
    import s3server
    server = s3server.start(tmp_path / "moto.log")
    try:
        server.make_bucket("recipes")
        env = server.env(SENSORIUM_INGEST_WORK=str(tmp_path / "work"))
        proc = subprocess.run([str(helpers.binary()), "-q", "convert", str(FIXTURE), "--out",
                               "s3://recipes/store"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, helpers.describe_run(proc)
        aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
        ns = run_recipe("bucket", Path("unused"),
                        SENSORIUM_BUCKET_DATASET=f"s3://recipes/store/{NAME}", **aws)
    finally:
        server.stop()
    assert_bits_equal(ns["responses"], helpers.to_le(src.stack("responses"))[0], "responses[0]")
    assert ns["trials"].column("trial_id").to_pylist() == src.trial_ids
    expected = src.expected_long("behavior")
    for name, values in expected.items():
        assert ns["behavior"][name].to_list() == list(values), f"behavior.{name}"
