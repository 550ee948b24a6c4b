"""A real S3-compatible server for the tests: moto's standalone server (`moto_server`, from
the `moto[server]` package in requirements.txt), run as a process on localhost.

Why moto and not a server built from crates.io (rustfs, s3s-fs): building one adds minutes of
compilation to every clean CI run, and moto implements what the converter relies on:
conditional writes (If-None-Match, If-Match), user metadata, multipart uploads, and request
signing with credentials it checks (an IAM user is created first; every later request must be
signed with its key).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

POLICY = ('{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*",'
          '"Resource":"*"}]}')
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    key: str
    secret: str
    # The test CA of a TLS server (`start(tls=True)`), else None.
    ca_file: Path | None = None

    def env(self, **changes) -> dict:
        """The environment a converter run gets: the standard AWS variables."""
        # Only this server's settings: none of the caller's own AWS_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret,
                   AWS_REGION=REGION, AWS_ENDPOINT_URL=self.endpoint,
                   # and none of the caller's AWS profiles
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   SENSORIUM_INGEST_RETRY_SECONDS="3")
        if self.ca_file:
            env["SSL_CERT_FILE"] = str(self.ca_file)
        env.update(changes)
        return env

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=REGION,
                            verify=str(self.ca_file) if self.ca_file else None)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """key (relative to prefix) -> bytes of every object under prefix."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=prefix.rstrip("/") + "/"):
            for o in page.get("Contents", []):
                body = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                out[o["Key"][len(prefix.rstrip("/")) + 1:]] = body
        return out

    def storage_options(self) -> dict:
        """fsspec/s3fs options (zarr-python)."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    def polars_options(self) -> dict:
        return {"aws_access_key_id": self.key, "aws_secret_access_key": self.secret,
                "aws_region": REGION, "aws_endpoint_url": self.endpoint, "aws_allow_http": "true"}

    def pyarrow_fs(self):
        import pyarrow.fs
        return pyarrow.fs.S3FileSystem(access_key=self.key, secret_key=self.secret,
                                       endpoint_override=self.endpoint, region=REGION)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for 127.0.0.1 and localhost: (CA
    certificate, server certificate, server key), PEM files in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    days = datetime.timedelta(days=2)

    def cert(subject, issuer, public_key, signer, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - days).not_valid_after(now + days)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("sensorium-ingest test CA"), name("sensorium-ingest test CA"),
              ca_key.public_key(), ca_key, True)
    server = cert(name("127.0.0.1"), ca.subject, key.public_key(), ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def start(log: Path, tls: bool = False) -> S3Server:
    """Starts moto_server on a free port with credentials enforced after the first three
    requests, which create the IAM user whose key the tests use. `tls`: HTTPS with a
    certificate from a test CA, which clients trust through SSL_CERT_FILE (`S3Server.env`)."""
    import boto3
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    command = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    ca_file = None
    if tls:
        ca_file, cert, key = make_certificates(log.parent)
        command += ["-c", str(cert), "-k", str(key)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start; see {log}")
            time.sleep(0.1)
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap", region_name=REGION,
                       verify=str(ca_file) if ca_file else None)
    iam.create_user(UserName="tests")
    iam.put_user_policy(UserName="tests", PolicyName="all", PolicyDocument=POLICY)
    key = iam.create_access_key(UserName="tests")["AccessKey"]
    return S3Server(proc, endpoint, key["AccessKeyId"], key["SecretAccessKey"], ca_file)
