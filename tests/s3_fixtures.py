"""moto's S3 server on 127.0.0.1 for one test, with the AWS variables pointing every client at it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def moto_s3(monkeypatch, bucket: str) -> Iterator[object]:
    """A running moto S3 server holding ``bucket``; yields a boto3 client. Stopped when the block ends."""
    # pinned dev dependencies (pyproject.toml, [dev]): an import error fails the test, never skips it
    import boto3
    import moto.server as server_mod

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        server.stop()
