"""What the real CPU engine's workers report (`GET /v1/engine`, the `iro doctor` block the server
logs at start): the V1 CPU runner with every patch installed and the default value in the engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_the_workers_report_the_cpu_runner_with_engine_values(server):
    with server.admin() as admin:
        r = admin.get("/v1/engine")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["model_runner"]["runner"] == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    patches = report["patches"]
    assert patches.pop("source").startswith("the engine's workers")
    assert patches == {name: "installed" for name in ("value_heads_v1", "value_heads_v2", "block16", "seed_fix",
                                                      "lora_grouped", "lora_compiled", "grammar_prefix")}
    assert report["values"]["engine value (default)"].startswith("engine (heads on the final state and on layers 2,15,27;")
    assert report["values"]["LoRA value"].startswith("scorer")
    with server.http() as http:  # an API key is not an admin key (when they differ)
        assert http.get("/v1/engine").status_code in ((401, 403) if server.api_key != server.admin_key else (200,))
    assert "iro doctor (the engine as started)" in server.log_path.read_text(errors="replace")
