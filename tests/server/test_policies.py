"""PolicyManager logic without an engine: verify-before-serve, refusals with a reason while the old
version serves, new versions get new adapter ids, model ids resolve and set the request's adapter."""

import asyncio

import pytest
import torch

from server.policies import PolicyManager
from valuefn.model import backbone_identity
from valuefn.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files


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
    assert status["served_version"] == 1 and status["current"] == 2
    assert status["refused"][0]["version"] == 2 and "sha256" in status["refused"][0]["reason"]

    publish(registry, "pol", peft_model, identity)  # v3: good again
    asyncio.run(manager.reconcile())
    assert manager.served["pol"].version == 3
    assert manager.served["pol"].lora.lora_int_id != first.lora_int_id  # in-flight v1 requests keep theirs

    publish(registry, "big", peft_model, identity, rank=4)
    manager.max_lora_rank = 2
    asyncio.run(manager.reconcile())
    assert "big" not in manager.served and "rank" in manager.status("big")["refused"][0]["reason"]

    with pytest.raises(Exception, match="being served"):  # ConflictError: 409
        manager.delete("pol", 3)
    manager.delete("pol", 2)
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
    assert other.names() == [] and "base" in other.status("pol")["refused"][0]["reason"]


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
