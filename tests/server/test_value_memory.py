"""A value that does not fit is refused with its reason (issue 24, item 3): counted from the
checkpoint's tensor shapes before anything is loaded, listed as refused in /v1/values with "needs X,
budget Y", logged, counted in a metric; a load that runs out of memory anyway is a refusal too."""

from __future__ import annotations

import logging

import pytest
import torch

from server.metrics import Metrics
from server.value_manager import ValueManager
from valuefn import loader as loaders
from valuefn.loader import BackbonePool, ValueLoader, backbone_numel, checkpoint_shapes, format_bytes, init_value
from valuefn.model import ValueModelConfig
from valuefn.registry import Registry

TWO_LAYERS = ValueModelConfig(num_layers=2, lora_r=4, dtype="float32")


def test_what_a_value_needs_is_counted_from_the_checkpoint_before_it_loads(tiny_model_dir):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"), memory_budget=1 << 30)
    frozen = TWO_LAYERS.model_copy(update={"lora_r": 0})
    need = pool.bytes_needed(frozen)
    template = pool.template(frozen)  # now loaded: the estimate was what it takes
    assert need == sum(t.numel() * t.element_size() for t in template.state_dict().values()) == pool.bytes_in_use()
    assert pool.bytes_needed(frozen) == 0  # shared by every value on it
    merged = pool.bytes_needed(TWO_LAYERS)  # a LoRA value copies only the weights its merge changes
    assert 0 < merged == pool.merged_bytes(TWO_LAYERS) < need
    shapes = checkpoint_shapes(tiny_model_dir)
    assert backbone_numel(shapes, 1) < backbone_numel(shapes, 2) == backbone_numel(shapes, None)
    assert format_bytes(13 << 30) == "13.00 GiB"


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "values")
    init_value(registry, "big", tiny_model_dir, TWO_LAYERS)
    return registry


async def test_a_value_over_the_budget_is_refused_listed_logged_and_counted(registry, tiny_model_dir, caplog):
    need = BackbonePool(tiny_model_dir, torch.device("cpu")).bytes_needed(TWO_LAYERS)
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"), memory_budget=need // 2)
    metrics = Metrics()
    manager = ValueManager(registry, ValueLoader(registry, pool, dtype="float32"), base_id="tiny", metrics=metrics)
    with caplog.at_level(logging.WARNING):
        await manager.reconcile()
    assert not manager.has("big") and pool.bytes_in_use() == 0  # nothing was loaded
    status = manager.list().data[0]
    assert status.name == "big" and status.serving_version is None
    reason = status.refused[0].reason
    assert reason.startswith("out_of_memory: big@1 does not fit")
    assert f"needs {format_bytes(need)}, budget {format_bytes(need // 2)}" in reason
    assert any(r.levelno >= logging.WARNING and "needs" in r.getMessage() for r in caplog.records)
    assert metrics.registry.get_sample_value("iro_value_refused_memory_total", {"value": "big"}) == 1
    assert metrics.registry.get_sample_value("iro_value_refused_total", {"value": "big"}) == 1

    roomy = BackbonePool(tiny_model_dir, torch.device("cpu"), memory_budget=need)
    manager = ValueManager(registry, ValueLoader(registry, roomy, dtype="float32"), base_id="tiny", metrics=Metrics())
    await manager.reconcile()
    assert manager.has("big") and roomy.bytes_in_use() == need


async def test_running_out_of_memory_while_loading_is_a_refusal_too(registry, tiny_model_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loaders, "build_value_model", out_of_memory)
    metrics = Metrics()
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"), memory_budget=1 << 30)
    manager = ValueManager(registry, ValueLoader(registry, pool, dtype="float32"), base_id="tiny", metrics=metrics)
    await manager.reconcile()
    reason = manager.list().data[0].refused[0].reason
    assert "needs" in reason and "budget" in reason and "OutOfMemoryError while loading" in reason
    assert metrics.registry.get_sample_value("iro_value_refused_memory_total", {"value": "big"}) == 1


async def test_any_other_load_failure_is_listed_as_refused_not_a_debug_line(registry, tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")

    monkeypatch.setattr(loaders, "build_value_model", broken)
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))  # no budget on the CPU
    manager = ValueManager(registry, ValueLoader(registry, pool, dtype="float32"), base_id="tiny", metrics=Metrics())
    await manager.reconcile()
    assert manager.list().data[0].refused[0].reason == "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED"
