"""Stores in object storage, against a real S3-compatible server process on localhost
(s3server.py): convert, verify, ingest and `--force` into a bucket; the store read straight
from the bucket by zarr-python, pyarrow and polars and compared value for value with the
source; the objects byte-identical to a local conversion; kills at any moment, two writers at
once, bad credentials, a missing bucket and a server that stops, each with a clear error and
nothing committed that should not be."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import gen_mouse
import helpers
import s3server
from helpers import Source, assert_bits_equal, to_le

FIXTURE = next((helpers.REPO / "fixtures").glob("*.zip"))
NAME = helpers.dataset_name(FIXTURE.stem)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = s3server.start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test, named after it."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    s3.make_bucket(name)
    return name


def run(s3, *args, work: Path, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(helpers.binary()), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout,
                          env=s3.env(SENSORIUM_INGEST_WORK=str(work), **env))


def local_dataset(tmp_path: Path, source: Path = FIXTURE, *extra) -> Path:
    store = tmp_path / "local"
    proc = helpers.run("convert", source, "--out", store, *extra)
    assert proc.returncode == 0, helpers.describe_run(proc)
    return store / helpers.dataset_name(source.stem)


def assert_objects_match_local(s3, bucket: str, prefix: str, local: Path) -> None:
    """Object for object, the bucket holds the local conversion's files (run.json records
    timings, so only its presence is compared)."""
    objects = s3.objects(bucket, prefix)
    files = helpers.tree_files(local)
    assert sorted(objects) == sorted(files), (sorted(set(objects) ^ set(files)))[:10]
    differ = [k for k in files if k != "run.json" and objects[k] != files[k]]
    assert not differ, f"{len(differ)} objects differ from the local run, e.g. {differ[:5]}"


def test_convert_verify_and_read_from_the_bucket(s3, bucket, tmp_path):
    url = f"s3://{bucket}/store"
    proc = run(s3, "convert", FIXTURE, "--out", url, work=tmp_path / "work")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert f"{url}/{NAME}" in proc.stdout
    proc = run(s3, "verify", f"{url}/{NAME}", "--against", FIXTURE, work=tmp_path / "work")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert proc.stdout.startswith(f"ok     {url}/{NAME}:"), proc.stdout
    proc = run(s3, "verify", url, work=tmp_path / "work")
    assert proc.returncode == 0, helpers.describe_run(proc)
    # the work folder keeps nothing once the dataset is committed
    leftovers = [p for p in (tmp_path / "work").rglob("*") if p.is_file()
                 and not p.name.startswith(".")]
    assert not leftovers, leftovers
    assert_objects_match_local(s3, bucket, f"store/{NAME}", local_dataset(tmp_path))
    assert s3.objects(bucket, "store/catalog").keys() == {f"{NAME}.parquet"}

    src = Source(FIXTURE)
    check_zarr_from_bucket(s3, f"s3://{bucket}/store/{NAME}", src)
    check_tables_from_bucket(s3, bucket, f"store/{NAME}", src)

    again = run(s3, "convert", FIXTURE, "--out", url, work=tmp_path / "work")
    assert again.returncode == 0 and "up to date" in again.stdout, helpers.describe_run(again)
    plan = run(s3, "plan", FIXTURE, "--out", url, work=tmp_path / "work")
    assert plan.returncode == 0, helpers.describe_run(plan)
    assert f"{NAME} -> {url}/{NAME} " in plan.stdout and "(up to date)" in plan.stdout, plan.stdout
    fresh = run(s3, "plan", FIXTURE, "--out", f"s3://{bucket}/other", work=tmp_path / "work")
    assert fresh.returncode == 0 and "(up to date)" not in fresh.stdout, fresh.stdout


def check_zarr_from_bucket(s3, dataset_url: str, src: Source) -> None:
    import zarr
    group = zarr.open_group(f"{dataset_url}/data.zarr", mode="r",
                            storage_options=s3.storage_options())
    for var in ("videos", "responses"):
        assert_bits_equal(group[var][...], src.stack(var), f"{dataset_url} {var}")
    k = src.n_trials // 2
    assert_bits_equal(group["videos"][k], to_le(src.stack("videos"))[k], "one trial")


def check_tables_from_bucket(s3, bucket: str, prefix: str, src: Source) -> None:
    import polars as pl
    import pyarrow.parquet as pq
    expected = src.expected_trials()
    table = pq.read_table(f"{bucket}/{prefix}/trials.parquet", filesystem=s3.pyarrow_fs())
    for name, values in expected.items():
        assert table.column(name).to_pylist() == list(values), f"pyarrow trials.{name}"
    df = pl.read_parquet(f"s3://{bucket}/{prefix}/trials.parquet",
                         storage_options=s3.polars_options())
    assert df.columns == list(expected)
    for name, values in expected.items():
        assert df[name].to_list() == list(values), f"polars trials.{name}"
    neurons = pl.read_parquet(f"s3://{bucket}/{prefix}/neurons.parquet",
                              storage_options=s3.polars_options())
    for name, values in src.expected_neurons().items():
        assert neurons[name].to_list() == list(values), f"polars neurons.{name}"
    long = pq.read_table(f"{bucket}/{prefix}/behavior.parquet", filesystem=s3.pyarrow_fs())
    for name, values in src.expected_long("behavior").items():
        got = np.asarray(long.column(name).to_numpy())
        assert_bits_equal(got, np.asarray(values), f"pyarrow behavior.{name}")


@pytest.fixture(scope="module")
def big_mouse(tmp_path_factory) -> Path:
    """Videos of 16 trials make shards above the single-request size: multipart uploads."""
    return gen_mouse.generate(tmp_path_factory.mktemp("big"), trials=40, neurons=300,
                              frames=300, seed=41)


def test_killed_at_any_moment_then_rerun_gives_the_same_objects(s3, bucket, tmp_path,
                                                                big_mouse):
    url = f"s3://{bucket}/store"
    name = helpers.dataset_name(big_mouse.stem)
    work = tmp_path / "work"
    for delay in (0.3, 0.8, 1.3, 1.8, 2.5, 3.5):
        proc = subprocess.Popen([str(helpers.binary()), "-q", "convert", str(big_mouse),
                                 "--out", url, "--threads", "1"],
                                env=s3.env(SENSORIUM_INGEST_WORK=str(work)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        objects = s3.objects(bucket, f"store/{name}")
        if "manifest.json" in objects:
            # committed before the kill: then it is whole
            v = run(s3, "verify", f"{url}/{name}", work=work)
            assert v.returncode == 0, helpers.describe_run(v)
            shutil.rmtree(work, ignore_errors=True)
            for key in list(objects) + [f"catalog/{name}.parquet"]:
                s3.client().delete_object(Bucket=bucket, Key=f"store/{key}")
        else:
            v = run(s3, "verify", f"{url}/{name}", work=work)
            assert v.returncode != 0, "a dataset without its manifest must not verify"
    # The killed runs' locks name a dead process of this host: taken over at once.
    proc = run(s3, "convert", big_mouse, "--out", url, work=work)
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert_objects_match_local(s3, bucket, f"store/{name}", local_dataset(tmp_path, big_mouse))
    v = run(s3, "verify", f"{url}/{name}", "--against", big_mouse, work=work)
    assert v.returncode == 0, helpers.describe_run(v)


def test_force_replacement_leaves_only_the_new_version(s3, bucket, tmp_path):
    url = f"s3://{bucket}/store"
    work = tmp_path / "work"
    pipeline = tmp_path / "level9.yaml"
    text = (helpers.REPO / "pipelines" / "sensorium2023.yaml").read_text()
    assert "level: 3" in text
    pipeline.write_text(text.replace("level: 3", "level: 9"))
    first = run(s3, "convert", FIXTURE, "--out", url, work=work)
    assert first.returncode == 0, helpers.describe_run(first)
    second = run(s3, "convert", FIXTURE, "--out", url, "--pipeline", pipeline, "--force",
                 work=work)
    assert second.returncode == 0, helpers.describe_run(second)
    assert_objects_match_local(s3, bucket, f"store/{NAME}",
                               local_dataset(tmp_path, FIXTURE, "--pipeline", pipeline))
    v = run(s3, "verify", f"{url}/{NAME}", "--against", FIXTURE, work=work)
    assert v.returncode == 0, helpers.describe_run(v)


def test_another_source_is_refused_without_force(s3, bucket, tmp_path):
    url = f"s3://{bucket}/store"
    other = gen_mouse.generate(tmp_path / "other", trials=6, neurons=20, frames=30, seed=5)
    first = run(s3, "convert", FIXTURE, "--out", url, "--name", "mouse", work=tmp_path / "w")
    assert first.returncode == 0, helpers.describe_run(first)
    before = s3.objects(bucket, "store/mouse")
    second = run(s3, "convert", other, "--out", url, "--name", "mouse", work=tmp_path / "w")
    assert second.returncode == 73, helpers.describe_run(second)
    assert f"{url}/mouse: dataset already exists" in second.stderr
    task = run(s3, "convert", other, "--out", url, "--name", "mouse", "--shard", "0/2",
               work=tmp_path / "w")
    assert task.returncode == 73, helpers.describe_run(task)
    assert s3.objects(bucket, "store/mouse") == before
    assert s3.objects(bucket, "store/.mouse.shards") == {}


def test_two_writers_of_one_name(s3, bucket, tmp_path, big_mouse):
    url = f"s3://{bucket}/store"
    name = helpers.dataset_name(big_mouse.stem)
    procs = [subprocess.Popen([str(helpers.binary()), "-q", "convert", str(big_mouse),
                               "--out", url, "--threads", "1"],
                              env=s3.env(SENSORIUM_INGEST_WORK=str(tmp_path / f"w{i}")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 75]), results
    if codes == [0, 75]:
        refusal = next(err for rc, err in results if rc == 75)
        assert f"another writer holds dataset {name}: convert (pid" in refusal, refusal
    v = run(s3, "verify", f"{url}/{name}", "--against", big_mouse, work=tmp_path / "v")
    assert v.returncode == 0, helpers.describe_run(v)


def test_ingest_into_a_bucket(s3, bucket, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(FIXTURE, inbox)
    url = f"s3://{bucket}/store"
    args = ("ingest", inbox, "--out", url, "--min-age", "0", "--settle", "0")
    first = run(s3, *args, work=tmp_path / "work")
    assert first.returncode == 0, helpers.describe_run(first)
    assert f"-> {NAME}" in first.stdout and "1 added" in first.stdout, first.stdout
    second = run(s3, *args, work=tmp_path / "work")
    assert second.returncode == 0, helpers.describe_run(second)
    assert "0 added, 1 skipped" in second.stdout, second.stdout
    v = run(s3, "verify", url, work=tmp_path / "work")
    assert v.returncode == 0, helpers.describe_run(v)


def test_bad_credentials(s3, bucket, tmp_path):
    proc = run(s3, "convert", FIXTURE, "--out", f"s3://{bucket}/store", work=tmp_path,
               AWS_SECRET_ACCESS_KEY="wrong")
    assert proc.returncode == 77, helpers.describe_run(proc)
    assert "the server refused the credentials" in proc.stderr
    assert "AWS_SECRET_ACCESS_KEY" in proc.stderr and "panicked" not in proc.stderr
    assert s3.objects(bucket, "store") == {}


def profile_env(s3, tmp_path: Path, config: str, credentials: str, **extra) -> dict:
    """The server's environment with keys, region and endpoint moved into AWS profile files
    under a fresh HOME."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True, exist_ok=True)
    (home / ".aws" / "config").write_text(config)
    (home / ".aws" / "credentials").write_text(credentials)
    env = s3.env(HOME=str(home), SENSORIUM_INGEST_WORK=str(tmp_path / "work"), **extra)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(var)
    return env


def test_aws_profile(s3, bucket, tmp_path):
    """Keys, region and endpoint from a named profile, as the AWS CLI reads them; a missing
    profile and one that fetches its keys through a process are refused before any request."""
    config = (f"[profile lab]\nregion = {s3server.REGION}\nendpoint_url = {s3.endpoint}\n\n"
              "[profile sso]\ncredential_process = /usr/bin/false\n\n"
              "[profile role]\nrole_arn = arn:aws:iam::123456789012:role/x\n")
    keys = f"aws_access_key_id = {s3.key}\naws_secret_access_key = {s3.secret}\n"
    credentials = f"[lab]\n{keys}\n[role]\n{keys}"
    env = profile_env(s3, tmp_path, config, credentials, AWS_PROFILE="lab")
    url = f"s3://{bucket}/store"
    for command in (["convert", FIXTURE, "--out", url], ["verify", f"{url}/{NAME}"]):
        proc = subprocess.run([str(helpers.binary()), *map(str, command)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, helpers.describe_run(proc)
    assert f"{NAME}/manifest.json" in s3.objects(bucket, "store")

    # A session token in the environment belongs to other keys: not attached to the profile's.
    env = profile_env(s3, tmp_path, config, credentials, AWS_PROFILE="lab",
                      AWS_SESSION_TOKEN="left-over-token")
    proc = subprocess.run([str(helpers.binary()), "verify", f"{url}/{NAME}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, helpers.describe_run(proc)

    for profile, want in (("nope", "AWS_PROFILE=nope: no such profile"),
                          ("sso", "export-credentials --profile sso"),
                          ("role", "through `role_arn`")):
        env = profile_env(s3, tmp_path, config, credentials, AWS_PROFILE=profile)
        proc = subprocess.run([str(helpers.binary()), "convert", str(FIXTURE), "--out",
                               f"s3://{bucket}/other"], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2, helpers.describe_run(proc)
        assert want in proc.stderr and "panicked" not in proc.stderr, proc.stderr
    assert s3.objects(bucket, "other") == {}


def test_https_endpoint(tmp_path):
    """Over TLS (what every real bucket uses): a server whose certificate a test CA signed.
    Trusted through SSL_CERT_FILE, the mouse converts and verifies; not trusted, the run stops
    with 74 naming the endpoint, and commits nothing."""
    server = s3server.start(tmp_path / "moto.log", tls=True)
    try:
        server.make_bucket("tls")
        url = "s3://tls/store"
        for command in (["convert", FIXTURE, "--out", url], ["verify", f"{url}/{NAME}"]):
            proc = run(server, *command, work=tmp_path / "w")
            assert proc.returncode == 0, helpers.describe_run(proc)
        untrusted = run(server, "convert", FIXTURE, "--out", "s3://tls/other", work=tmp_path / "u",
                        SSL_CERT_FILE=str(tmp_path / "server.pem"))
        assert untrusted.returncode == 74, helpers.describe_run(untrusted)
        assert "s3://tls/other" in untrusted.stderr and "panicked" not in untrusted.stderr
        assert server.objects("tls", "other") == {}
        assert f"{NAME}/manifest.json" in server.objects("tls", "store")
    finally:
        server.stop()


def test_missing_bucket(s3, tmp_path):
    proc = run(s3, "convert", FIXTURE, "--out", "s3://no-such-bucket/store", work=tmp_path)
    assert proc.returncode == 74, helpers.describe_run(proc)
    assert "s3://no-such-bucket/store" in proc.stderr
    assert "the bucket does not exist" in proc.stderr


def test_server_stops_mid_run(tmp_path, big_mouse):
    server = s3server.start(tmp_path / "moto.log")
    try:
        server.make_bucket("stopping")
        proc = subprocess.Popen([str(helpers.binary()), "-q", "convert", str(big_mouse),
                                 "--out", "s3://stopping/store", "--threads", "1"],
                                env=server.env(SENSORIUM_INGEST_WORK=str(tmp_path / "w")),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        server.stop()
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        server.stop()
    assert rc == 74, err
    assert "s3://stopping/store" in err and "the server cannot be reached" in err, err
    assert "panicked" not in err


def test_unsupported_scheme_is_refused(tmp_path):
    proc = helpers.run("convert", FIXTURE, "--out", "ftp://host/store", cwd=tmp_path)
    assert proc.returncode == 2, helpers.describe_run(proc)
    assert "stores of scheme `ftp://` are not supported" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written locally"


def test_names_that_keys_would_change_are_refused(s3, bucket, tmp_path):
    """A dataset name or prefix that the client would percent-encode (readers would then find
    it under another name) or that holds a space is refused before anything is written."""
    for out, name in ((f"s3://{bucket}/store", "mouse#1"), (f"s3://{bucket}/a%25b", None),
                      (f"s3://{bucket}/lab%20store", None)):
        extra = ["--name", name] if name else []
        refused = run(s3, "convert", FIXTURE, "--out", out, *extra, work=tmp_path)
        assert refused.returncode == 2, helpers.describe_run(refused)
        assert "holds characters object storage keys avoid" in refused.stderr, refused.stderr
        assert "--name" in refused.stderr and "panicked" not in refused.stderr
    assert s3.client().list_objects_v2(Bucket=bucket).get("Contents", []) == []


def test_file_url_is_a_local_store(tmp_path):
    proc = helpers.run("convert", FIXTURE, "--out", f"file://{tmp_path}/store")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert (tmp_path / "store" / NAME / "manifest.json").is_file()


def test_sharded_run_into_a_bucket(s3, bucket, tmp_path, big_mouse):
    """Three tasks on three "nodes" (work folders of their own), finalize on a fourth: the
    bucket then holds, object for object, what a single local conversion writes."""
    url = f"s3://{bucket}/store"
    name = helpers.dataset_name(big_mouse.stem)
    for k in range(3):
        proc = run(s3, "convert", big_mouse, "--out", url, "--shard", f"{k}/3", "--threads", "1",
                   work=tmp_path / f"node{k}")
        assert proc.returncode == 0, helpers.describe_run(proc)
        assert f"{url}/.{name}.shards" in proc.stdout, proc.stdout
        if k == 0:
            other = tmp_path / "other.yaml"
            text = (helpers.REPO / "pipelines" / "sensorium2023.yaml").read_text()
            other.write_text(text.replace("level: 3", "level: 9"))
            refused = run(s3, "convert", big_mouse, "--out", url, "--shard", "1/3",
                          "--pipeline", other, work=tmp_path / "stranger")
            assert refused.returncode == 73, helpers.describe_run(refused)
    assert s3.objects(bucket, f"store/{name}") == {}, "nothing is committed before finalize"
    proc = run(s3, "finalize", f"{url}/{name}", work=tmp_path / "node9")
    assert proc.returncode == 0, helpers.describe_run(proc)
    assert_objects_match_local(s3, bucket, f"store/{name}", local_dataset(tmp_path, big_mouse))
    assert s3.objects(bucket, f"store/.{name}.shards") == {}
    again = run(s3, "finalize", f"{url}/{name}", work=tmp_path / "node9")
    assert again.returncode == 0 and "is complete" in again.stdout, helpers.describe_run(again)
    v = run(s3, "verify", f"{url}/{name}", "--against", big_mouse, work=tmp_path / "v")
    assert v.returncode == 0, helpers.describe_run(v)


def test_a_damaged_local_copy_is_never_committed(s3, bucket, tmp_path):
    """A finished local copy (a run killed before its upload) damaged afterwards: the commit
    compares every file with the manifest and refuses, naming the file."""
    import blake3
    url = f"s3://{bucket}/store"
    work = tmp_path / "work"
    folder = work / blake3.blake3(url.encode()).hexdigest()[:16]
    proc = helpers.run("convert", FIXTURE, "--out", folder)
    assert proc.returncode == 0, helpers.describe_run(proc)
    chunk = next(p for p in sorted((folder / NAME / "data.zarr" / "videos").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = run(s3, "convert", FIXTURE, "--out", url, work=work)
    assert proc.returncode == 65, helpers.describe_run(proc)
    assert "missing or changed since it was written" in proc.stderr
    assert "--force" in proc.stderr
    assert "manifest.json" not in s3.objects(bucket, f"store/{NAME}")
    proc = run(s3, "convert", FIXTURE, "--out", url, "--force", work=work)
    assert proc.returncode == 0, helpers.describe_run(proc)
    v = run(s3, "verify", f"{url}/{NAME}", "--against", FIXTURE, work=work)
    assert v.returncode == 0, helpers.describe_run(v)
