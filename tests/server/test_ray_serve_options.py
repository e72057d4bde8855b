"""The Ray Serve options a replica deployment gets from the settings (tests/e2e/test_ray_serve_e2e.py
runs the deployment)."""

from __future__ import annotations

import pytest

from server.settings import ServerSettings


@pytest.mark.slow  # imports Ray Serve: seconds
def test_replica_options_come_from_the_settings():
    pytest.importorskip("ray.serve")  # imported here: collecting this file costs no Ray import
    from server.ray_serve import replica_options

    options = replica_options(ServerSettings(replicas=3, replica_max_ongoing_requests=4))
    assert (options["num_replicas"], options["max_ongoing_requests"]) == (3, 4)
    assert replica_options(ServerSettings())["max_ongoing_requests"] == 16
