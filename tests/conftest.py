"""Shared fixtures: one local Ray for the session, and an S3 server (moto) on 127.0.0.1 that it can reach."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-protocol server on loopback; credentials and endpoint go in the environment, as users would set them."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray, started after the S3 environment so its workers inherit it."""
    import ray

    from pipelines.run.runner import local_ray_defaults

    local_ray_defaults()
    # logical CPUs: two training workers plus Ray Data's decoding tasks, on however many cores there are
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
