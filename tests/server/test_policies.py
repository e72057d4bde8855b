"""PolicyManager logic without an engine: verify-before-serve, refusals with a reason while the old
version serves, new versions get new adapter ids, model ids resolve and set the request's adapter."""

import asyncio

import pytest
import torch

from server.policies import PolicyManager
from valuefn.model import backbone_identity
from registry.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def publish(registry, name, model, identity, *, rank=4, corrupt=False):
    def write(d):
        files = write_adapter_files(model, d)
        return {k: ("0" * 64 if corrupt and k.endswith(".safetensors") else v) for k, v in files.items()}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": identity,
                "method": "apa", "lora_rank": rank}
    return registry.publish_adapter(name, write, manifest)


class FakeValues:
    def has(self, name):
        return name == "val"


def test_manager_serves_refuses_and_swaps(tiny_model_dir, peft_model, tmp_path):
    identity = backbone_identity(tiny_model_dir)
    registry = PolicyRegistry(tmp_path)
    manager = PolicyManager(registry, identity=identity, base_id="tiny", max_lora_rank=8)
    publish(registry, "pol", peft_model, identity)
    asyncio.run(manager.reconcile())
    assert manager.names() == ["pol"]
    first = manager.served["pol"].lora

    publish(registry, "pol", peft_model, identity, corrupt=True)  # v2: a weights file that fails its hash
    asyncio.run(manager.reconcile())
    status = manager.status("pol")
    assert status.serving_version == 1 and status.current_on_disk == 2
    assert status.refused[0].version == 2 and "sha256" in status.refused[0].reason

    publish(registry, "pol", peft_model, identity)  # v3: good again
    asyncio.run(manager.reconcile())
    assert manager.served["pol"].version == 3
    assert manager.served["pol"].lora.lora_int_id != first.lora_int_id  # in-flight v1 requests keep theirs

    publish(registry, "big", peft_model, identity, rank=4)
    manager.loader.max_lora_rank = 2
    asyncio.run(manager.reconcile())
    assert "big" not in manager.served and "rank" in manager.status("big").refused[0].reason

    with pytest.raises(Exception, match="being served"):  # ConflictError: 409
        asyncio.run(manager.delete_version("pol", 3))
    asyncio.run(manager.delete_version("pol", 2))
    assert registry.versions("pol") == [1, 3]


def test_resolve_names_the_request_adapter(tiny_model_dir, peft_model, tmp_path):
    identity = backbone_identity(tiny_model_dir)
    registry = PolicyRegistry(tmp_path)
    manager = PolicyManager(registry, identity=identity, base_id="tiny", max_lora_rank=8)
    publish(registry, "pol", peft_model, identity)
    asyncio.run(manager.reconcile())
    assert manager.resolve("pol") is manager.served["pol"] and manager.resolve("pol").lora is not None
    assert manager.resolve("pol+val", FakeValues()) is manager.served["pol"]
    assert manager.resolve("pol+nope", FakeValues()) is None and manager.resolve("tiny") is None
    identity_other = {**identity, "tokenizer_sha256": "x"}
    other = PolicyManager(registry, identity=identity_other, base_id="tiny", max_lora_rank=8)
    asyncio.run(other.reconcile())
    assert other.names() == [] and "base" in other.status("pol").refused[0].reason


def test_vllm_lora_loader_reads_a_published_adapter(tiny_model_dir, peft_model, tmp_path):
    """The version folder is what vLLM's own LoRA loader reads (no engine needed for that)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    identity = backbone_identity(tiny_model_dir)
    registry = PolicyRegistry(tmp_path)
    publish(registry, "pol", peft_model, identity)
    directory = str(registry.path("pol", 1))
    helper = PEFTHelper.from_local_dir(directory, 512)
    assert helper.r == 4 and sorted(helper.target_modules) == ["q_proj", "v_proj"]
    model = LoRAModel.from_local_checkpoint(directory, {"q_proj", "v_proj"}, helper, lora_model_id=1, device="cpu")
    assert sorted(model.loras) == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


# ----------------------------------------------------------------------------- admin errors (issue 25)
def admin_client(manager):
    """The real admin routes and error handlers around `manager` (no engine: serving is a stand-in)."""
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import ServerSettings

    app = build_app(ServerSettings())
    app.state.serving = object()
    app.state.policies = manager
    return TestClient(app)


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_policy_errors_have_the_right_codes_and_no_server_paths(tiny_model_dir, peft_model, tmp_path):
    identity = backbone_identity(tiny_model_dir)
    registry = PolicyRegistry(tmp_path / "registry")
    manager = PolicyManager(registry, identity=identity, base_id="tiny", max_lora_rank=8)
    publish(registry, "pol", peft_model, identity)
    publish(registry, "pol", peft_model, identity, corrupt=True)  # v2, CURRENT, fails its hash
    asyncio.run(manager.reconcile())
    client = admin_client(manager)

    missing = error_of(client.post("/v1/policies/pol/load", json={"version": 9}), 404)  # was 409 + a path
    assert missing["code"] == "policy_not_found" and missing["param"] == "version"
    refused = error_of(client.post("/v1/policies/pol/load", json={"version": 2}), 409)
    assert refused["code"].startswith("policy_refused") and "sha256" in refused["message"]
    assert error_of(client.delete("/v1/policies/pol/versions/2"), 409)["code"] == "policy_is_current"  # was 404
    assert error_of(client.delete("/v1/policies/pol/versions/7"), 404)["code"] == "policy_not_found"
    assert error_of(client.post("/v1/policies/nope/load"), 404)["code"] == "policy_not_found"
    assert error_of(client.get("/v1/policies/pol%0A"), 400)["code"] == "invalid_name"
    for error in (missing, refused):
        assert str(tmp_path) not in error["message"]
    assert all(str(tmp_path) not in r["reason"] for r in client.get("/v1/policies/pol").json()["refused"])


def test_policy_admin_on_a_read_only_registry_is_409_with_the_reason(tiny_model_dir, peft_model, tmp_path,
                                                                      monkeypatch):
    identity = backbone_identity(tiny_model_dir)
    registry = PolicyRegistry(tmp_path)
    manager = PolicyManager(registry, identity=identity, base_id="tiny", max_lora_rank=8)
    for _ in range(3):
        publish(registry, "pol", peft_model, identity)
    asyncio.run(manager.reconcile())
    client = admin_client(manager)

    def read_only(*args, **kwargs):  # the server's account may only read the registry (SECURITY.md)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(registry, "set_current", read_only)
    monkeypatch.setattr("shutil.rmtree", read_only)
    error = error_of(client.post("/v1/policies/pol/rollback"), 409)  # was 500
    assert error["code"] == "registry_read_only" and "Permission denied" in error["message"]
    error = error_of(client.delete("/v1/policies/pol/versions/1"), 409)  # was 500
    assert error["code"] == "registry_read_only"
    assert manager.served["pol"].version == 3 and registry.versions("pol") == [1, 2, 3]


def test_refusals_are_bounded_per_policy(tiny_model_dir, tmp_path):
    from server.registry_manager import MAX_REFUSALS

    manager = PolicyManager(PolicyRegistry(tmp_path), identity={}, base_id="tiny", max_lora_rank=8)
    for version in range(1, MAX_REFUSALS + 10):
        manager._refuse("pol", version, ValueError(f"bad {tmp_path}/pol/v{version:04d}"))
    refused = manager.refused["pol"]
    assert len(refused) == MAX_REFUSALS and max(refused) == MAX_REFUSALS + 9
    assert all(str(tmp_path) not in r.reason for r in refused.values())
