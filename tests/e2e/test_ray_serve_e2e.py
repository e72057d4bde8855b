"""`iro serve --replicas 2` on Ray Serve with the value registry on moto's S3 server: 16 guided
clients through the proxy while v2 is published; both replicas end up serving v2 and no request
fails. One test (two engines start: minutes on 2 cores); the measurements are bench/scale_out.py's."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from bench import scale_out

pytestmark = pytest.mark.e2e
pytest.importorskip("ray.serve")
pytest.importorskip("moto")


def test_two_replicas_serve_a_published_version_with_no_failed_request(tmp_path, monkeypatch):
    endpoint, location, env = scale_out.s3_registry()
    for name, value in env.items():  # this process publishes to the same store
        monkeypatch.setenv(name, value)
    v1 = scale_out.publish(location, "swap")
    srv = scale_out.start_replicas(tmp_path, 2, env={**env, "IRO_VALUES_DIR": location})
    try:
        auth = {"Authorization": f"Bearer {scale_out.API_KEY}"}
        base = httpx.get(srv.url + "/v1/models", headers=auth).json()["data"][0]["id"]
        scale_out.wait_replicas(srv.url, "swap", v1, 2, timeout=600)  # each loaded v1 (an engine start each: minutes on a busy machine)
        # the single server's API through the proxy: auth, errors, metrics
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        bad = httpx.post(srv.url + "/v1/chat/completions", headers=auth, json={
            "model": f"{base}+swap", "messages": [{"role": "user", "content": "hi"}], "guidance": {"w": 0}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "guidance.w"
        metrics = httpx.get(srv.url + "/metrics").text  # every replica's, each labelled
        assert len(set(re.findall(r'iro_requests_in_flight\{replica="([^"]+)"\}', metrics))) == 2

        async def run():
            load = scale_out.GuidedLoad(srv.url, f"{base}+swap", 16)
            load.start()
            while load.ok < 8:  # the load is on before the publish
                await asyncio.sleep(0.2)
            v2 = await asyncio.to_thread(scale_out.publish, location, "swap")
            _, serving = await asyncio.to_thread(scale_out.wait_replicas, srv.url, "swap", v2, 2, timeout=300)
            while (v2,) not in load.versions and not load.failures:  # answered by v2 through the proxy
                await asyncio.sleep(0.2)
            await load.stop()
            return v2, serving, load

        v2, serving, load = asyncio.run(run())
        assert load.failures == []
        assert len(serving) == 2 and set(serving.values()) == {v2}
        assert {(v1,), (v2,)} <= load.versions
    finally:
        scale_out.stop(srv)
        endpoint.stop()
