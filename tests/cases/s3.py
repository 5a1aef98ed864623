"""A real S3-compatible server on loopback (moto's standalone server), as the `s3` fixture.

Registered for every test by tests/conftest.py: the S3 tests and the Ray engine's
straight-to-bucket build use the same one.
"""

from __future__ import annotations

import pytest

BUCKET = "croupier-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (port picked by the OS) and the environment that points at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "croupier-test",
           "AWS_SECRET_ACCESS_KEY": "croupier-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
        client.create_bucket(Bucket=BUCKET)
        try:
            yield {"env": env, "client": client}
        finally:
            server.stop()
