"""Turning registry entries into scoring-ready value chains (verified before use), and
publishing value models into the registry.

    loader = ValueLoader(registry, BackbonePool(model_path))
    chain = loader.load_chain("demo")          # V_1..V_t of demo's CURRENT version

A value must fit the memory planned for values (on a GPU: what the engine leaves, less the key/value
cache's share, `BackbonePool.memory_budget`): what it needs is counted from the checkpoint's tensor
shapes before anything is loaded, and a value that does not fit, or that runs out of memory while
loading, is refused (`CheckpointError`, reason "out_of_memory", "needs X GiB, budget Y GiB").
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import torch

from common.dtype import resolve_dtype
from common.search_settings import SearchSettings
from valuefn.checkpoint import (
    FORMAT_VERSION, CheckpointError, Manifest, build_value_model, check_backbone,
    load_trained_tensors, read_manifest, write_checkpoint_files,
)
from valuefn.kv_pool import CacheBudget, default_budget_bytes
from valuefn.model import (ValueModel, ValueModelConfig, backbone_identity, copy_backbone, default_device, load_backbone,
                           share_tensors)
from valuefn.registry import Registry
from valuefn.scorer import LoadedValue, ScoreItem, ValueChain, check_kv_reuse, forward_values, sliding_window

log = logging.getLogger(__name__)

GiB = 1 << 30
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def format_bytes(n: int) -> str:
    """GiB with two decimals (MiB below 0.1 GiB, so a small model's numbers still say something).

    >>> format_bytes(13 * GiB + GiB // 2), format_bytes(5 << 20)
    ('13.50 GiB', '5.00 MiB')
    """
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.2f} MiB"


def checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a model folder's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def backbone_numel(shapes: dict[str, tuple[int, ...]], num_layers: int | None,
                   target_modules: list[str] | None = None) -> int:
    """Elements of the backbone a value runs on (`load_backbone`): the first `num_layers` decoder
    layers (None: all) with the embeddings and norms, never the LM head; with `target_modules`, only
    those modules' weights in the kept layers (what merging a LoRA adapter copies, `merge_lora`)."""
    total = 0
    for key, shape in shapes.items():
        if key.startswith("lm_head.") or ".lm_head." in key:
            continue
        layer = _LAYER.search(key)
        if layer is not None and num_layers is not None and int(layer[1]) >= num_layers:
            continue
        if target_modules is not None:
            parts = key.split(".")
            if layer is None or parts[-1] != "weight" or len(parts) < 2 or parts[-2] not in target_modules:
                continue
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def default_memory_budget(device: torch.device, cache_bytes: int, gpu_memory_utilization: float) -> int | None:
    """Bytes of backbones the values of one process may hold on `device`: on a GPU, the memory the
    engine leaves to values at its share `gpu_memory_utilization` (`common.engine_args.value_memory_bytes`,
    planned from the device's total, so the same before and after the engine starts) less the key/value
    cache's `cache_bytes`; None (no limit) on the CPU."""
    if device.type != "cuda":
        return None
    from common.engine_args import device_value_memory

    return max(0, device_value_memory(gpu_memory_utilization, device) - cache_bytes)


class BackbonePool:
    """Backbones of the base model, loaded once per layer count and dtype (a config's "auto": this
    machine's choice for the pool's device, `common.dtype`); values get copies.

    The values' memory on the device is planned here, from the engine's share of a GPU
    (`gpu_memory_utilization`, the server's setting): `cache_budget`, the key/value pool every value
    it loads shares (`value_cache_gib`, default `valuefn.kv_pool.default_budget_bytes`), and
    `memory_budget`, the bytes the backbones (and the weights a LoRA merge copies) may take (None:
    `default_memory_budget`: the engine's leftover less the cache on a GPU, no limit on the CPU)."""

    def __init__(self, model_path: str | Path, device: torch.device | None = None, *,
                 memory_budget: int | None = None, value_cache_gib: float | None = None,
                 gpu_memory_utilization: float | None = None):
        from common.engine_args import DEFAULT_GPU_MEMORY_UTILIZATION

        self.model_path = Path(model_path)
        self.device = device or default_device()
        self.identity = backbone_identity(self.model_path)
        share = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        self.cache_budget = CacheBudget(default_budget_bytes(self.device, value_cache_gib=value_cache_gib,
                                                             gpu_memory_utilization=share))
        self.memory_budget = (memory_budget if memory_budget is not None
                              else default_memory_budget(self.device, self.cache_budget.max_bytes, share))
        self._templates: dict[tuple[int | None, str, bool], torch.nn.Module] = {}
        self._template_bytes: dict[tuple[int | None, str, bool], int] = {}
        self._merged_bytes: dict[int, int] = {}
        """id(value model) -> bytes its LoRA merge copied, while the model lives."""
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._lock = threading.Lock()

    @functools.cached_property
    def hf_config(self):
        """The base model's transformers config (read once; no weights)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.model_path))

    @staticmethod
    def _key(config: ValueModelConfig, device_type: str) -> tuple[int | None, str, bool]:
        final_norm = config.value_layers is None  # feature-layer values read the raw residual stream
        return config.num_layers, resolve_dtype(config.dtype, device_type), final_norm

    def template(self, config: ValueModelConfig) -> torch.nn.Module:
        key = self._key(config, self.device.type)
        num_layers, dtype, final_norm = key
        with self._lock:
            if key not in self._templates:
                self._templates[key] = load_backbone(self.model_path, num_layers, getattr(torch, dtype),
                                                     self.device, final_norm=final_norm)
                self._template_bytes[key] = sum(t.numel() * t.element_size()
                                                for t in self._templates[key].state_dict().values())
            return self._templates[key]

    def _count(self, config: ValueModelConfig, target_modules: list[str] | None = None) -> int:
        if self._shapes is None:
            self._shapes = checkpoint_shapes(self.model_path)
        size = torch.empty((), dtype=getattr(torch, self._key(config, self.device.type)[1])).element_size()
        return backbone_numel(self._shapes, config.num_layers, target_modules) * size

    def merged_bytes(self, config: ValueModelConfig) -> int:
        """Bytes of the weights a value's LoRA merge copies (0 without LoRA)."""
        return self._count(config, config.target_modules) if config.lora_r > 0 else 0

    def bytes_needed(self, config: ValueModelConfig) -> int:
        """Bytes a value of `config` adds to this pool: its backbone when no value loaded it yet, and
        the weights its LoRA merge copies. Counted from the checkpoint's tensor shapes, loading nothing."""
        template = 0 if self._key(config, self.device.type) in self._templates else self._count(config)
        return template + self.merged_bytes(config)

    def bytes_in_use(self) -> int:
        """Bytes of the loaded backbones and of the LoRA merges of values still alive."""
        with self._lock:
            return sum(self._template_bytes.values()) + sum(self._merged_bytes.values())

    def check_fits(self, config: ValueModelConfig, what: str) -> int:
        """Raise CheckpointError (reason "out_of_memory") when a value of `config` does not fit what
        is left of `memory_budget`; return the bytes it needs."""
        need = self.bytes_needed(config) if self.memory_budget is not None else 0
        if self.memory_budget is not None and need > self.memory_budget - self.bytes_in_use():
            raise CheckpointError(self.no_room(what, need), reason="out_of_memory")
        return need

    def no_room(self, what: str, need: int) -> str:
        """Why a value of `need` bytes does not fit: "... needs X GiB, budget Y GiB (...)"."""
        used = self.bytes_in_use()
        hint = "lower --gpu-memory-utilization, or train the value on fewer layers (num_layers)"
        if self.memory_budget is None:
            return f"{what} does not fit in memory on {self.device}: needs {format_bytes(need)}; {hint}"
        return (f"{what} does not fit in the values' memory on {self.device}: needs {format_bytes(need)}, budget "
                f"{format_bytes(max(0, self.memory_budget - used))} (of {format_bytes(self.memory_budget)}; "
                f"{format_bytes(used)} held by loaded values); {hint}")

    def track(self, model: torch.nn.Module, merged_bytes: int) -> None:
        """Count the weights `model`'s LoRA merge copied until the model is freed."""
        if merged_bytes and self.memory_budget is not None:
            with self._lock:
                self._merged_bytes[id(model)] = merged_bytes
            weakref.finalize(model, self._merged_bytes.pop, id(model), None)

    def fresh(self, config: ValueModelConfig) -> torch.nn.Module:
        """A backbone a value model of `config` may own: a copy when LoRA goes into it, the shared
        (frozen, never modified) template when it has none."""
        template = self.template(config)
        return template if config.lora_r == 0 else copy_backbone(template)

    def for_inference(self, config: ValueModelConfig) -> torch.nn.Module:
        """A backbone to merge a value's LoRA into (`ValueModel.merged`): the template's modules,
        sharing its tensors (merging replaces the weights it changes)."""
        template = self.template(config)
        return template if config.lora_r == 0 else share_tensors(template)


class ValueLoader:
    """Loads verified value versions; shares a version between chains that contain it.

    Every value runs in `dtype` ("auto": this machine's choice, `common.dtype`), whatever dtype its
    manifest records: that one was the training machine's choice."""

    def __init__(self, registry: Registry, pool: BackbonePool, dtype: str = "auto",
                 engine_probe: Callable[[tuple, tuple[int, ...] | None], Any] | None = None):
        self.registry = registry
        self.pool = pool
        self.dtype = resolve_dtype(dtype, pool.device.type)
        self.engine_probe = engine_probe
        """(heads, layers) -> the heads' values on a short test sequence, computed by the serving
        engine; None where the engine cannot compute them. With it, an engine value the engine can
        compute is checked there and its backbone is built only if the scorer ever has to run it."""
        self._loaded: weakref.WeakValueDictionary[tuple[str, int], LoadedValue] = weakref.WeakValueDictionary()
        self._probe_features: dict[str, torch.Tensor] = {}
        """Architecture -> the test sequence's features on the shared backbone (`_probe`)."""
        self._kv_reuse: dict[str, bool] = {}
        """Architecture (the run-as model config) -> `check_kv_reuse`'s verdict: the check tests
        whether this transformers' attention follows the cache protocol for that architecture, which
        no later version of it changes, so a hot swap does not run it again (0.1-0.2 s under load)."""

    def load_version(self, name: str, version: int) -> LoadedValue:
        cached = self._loaded.get((name, version))
        if cached is not None:
            return cached
        start = time.perf_counter()
        directory = self.registry.path(name, version)
        manifest = read_manifest(directory)
        if manifest.name != name or manifest.version != version:
            raise CheckpointError(f"{directory}: manifest says {manifest.name}@{manifest.version}",
                                  reason="bad_manifest", path=directory)
        check_backbone(manifest, self.pool.identity, directory)
        adapter, head = load_trained_tensors(directory, manifest)
        verified = time.perf_counter()
        run_as = manifest.model_copy(update={"model": manifest.model.model_copy(update={"dtype": self.dtype})})
        if run_as.model.engine_value and self.engine_probe is not None:
            value = self._engine_value(name, version, manifest, run_as, adapter, head)
            if value is not None:
                self._loaded[(name, version)] = value
                log.info("loaded value %s@%d in %.3f s (read + verify %.3f, test in the engine %.3f; no backbone "
                         "here: the engine computes it)", name, version, time.perf_counter() - start,
                         verified - start, time.perf_counter() - verified)
                return value
        need = self.pool.check_fits(run_as.model, f"{name}@{version}")  # refused before anything is allocated
        architecture = run_as.model.model_dump_json()  # what the per-architecture caches are keyed by
        try:
            model = build_value_model(self.pool.for_inference(run_as.model), run_as, adapter, head)
            value = LoadedValue(name, version, manifest, model, budget=self.pool.cache_budget)
            built = time.perf_counter()
            # One test forward: a checkpoint whose numbers are garbage is refused before it serves.
            finite = torch.isfinite(self._probe(value, architecture)).all()
        except (torch.OutOfMemoryError, MemoryError) as exc:  # the budget's estimate was short: still a refusal
            need = need or self.pool.bytes_needed(run_as.model)
            raise CheckpointError(f"{self.pool.no_room(f'{name}@{version}', need)} ({type(exc).__name__} while "
                                  "loading)", reason="out_of_memory", path=directory) from None
        self.pool.track(model, self.pool.merged_bytes(run_as.model))
        if not finite:
            raise CheckpointError(f"{name}@{version} produces non-finite values", reason="bad_values", path=directory)
        if not model.config.engine_value:
            if architecture not in self._kv_reuse:
                self._kv_reuse[architecture] = check_kv_reuse(value)
            value.kv_reuse = self._kv_reuse[architecture]
        else:  # no LoRA: nothing to check but the window the pool's attention does not apply
            value.kv_reuse = sliding_window(model.backbone.config) is None
        self._loaded[(name, version)] = value
        end = time.perf_counter()
        log.info("loaded value %s@%d in %.3f s (read + verify %.3f, build %.3f, test forward %.3f)", name, version,
                 end - start, verified - start, built - verified, end - built)
        return value

    def _engine_value(self, name: str, version: int, manifest: Manifest, run_as: Manifest, adapter,
                      head) -> LoadedValue | None:
        """An engine value checked by the engine (one short test sequence, its head run there) whose
        model is built only when the scorer needs it; None when the engine cannot compute it."""
        width = self.pool.identity["hidden_size"] * run_as.model.head_inputs
        weight, bias = head.get("weight"), head.get("bias")
        if weight is None or bias is None or weight.numel() != width or bias.numel() != 1:
            raise CheckpointError(f"{name}@{version}: its head does not fit {width} features of this base model",
                                  reason="shape_mismatch", path=self.registry.path(name, version))
        weights = torch.cat([weight.detach().float().flatten(), bias.detach().float().flatten()])  # (D + 1,)
        layers = tuple(run_as.model.value_layers) if run_as.model.value_layers else None
        values = self.engine_probe((tuple(weights.tolist()),), layers)
        if values is None:
            return None
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            raise CheckpointError(f"{name}@{version} produces non-finite values", reason="bad_values",
                                  path=self.registry.path(name, version))

        def build() -> ValueModel:
            self.pool.check_fits(run_as.model, f"{name}@{version}")
            model = build_value_model(self.pool.for_inference(run_as.model), run_as, adapter, head)
            self.pool.track(model, self.pool.merged_bytes(run_as.model))
            log.info("value %s@%d: built its backbone for the scorer (the engine could not value a step)", name, version)
            return model

        return LoadedValue(name, version, manifest, build=build, config=run_as.model, head=weights,
                           kv_reuse=sliding_window(self.pool.hf_config) is None, budget=self.pool.cache_budget)

    def _probe(self, value: LoadedValue, architecture: str) -> torch.Tensor:
        """The values of one short test sequence. A value without LoRA runs on the pool's shared,
        never modified backbone, so the sequence's features depend on its architecture alone: they
        are computed once per architecture and a version runs only its head (for an engine value the
        features are the whole base model's forward, 0.4-0.6 s of a hot swap under load)."""
        model = value.model
        if model.config.lora_r > 0:
            return torch.as_tensor(forward_values(value, [ScoreItem([1, 2, 3, 4], 0)], use_cache=False))
        with torch.inference_mode():
            if architecture not in self._probe_features:
                ids = torch.tensor([[1, 2, 3, 4]], device=self.pool.device)
                self._probe_features[architecture] = model.features(ids)[0]
            return model.head(self._probe_features[architecture]).squeeze(-1)

    def load_chain(self, spec_name: str, version: int | None = None) -> ValueChain:
        """The chain V_1..V_t that `name@version` (default CURRENT) names, every link verified."""
        if version is None:
            _, version = self.registry.resolve(spec_name)
        top = self.load_version(spec_name, version)
        links = []
        for link in top.manifest.chain:
            value = top if link.version == version else self.load_version(spec_name, link.version)
            links.append((value, link.beta))
        if not links or links[-1][0] is not top:
            raise CheckpointError(f"{spec_name}@{version}: its chain must end with itself", reason="bad_manifest")
        return ValueChain(spec_name, tuple(links))


def make_manifest(name: str, config: ValueModelConfig, identity: dict, *, defaults: SearchSettings | None = None,
                  training: dict | None = None, metrics: dict | None = None) -> Manifest:
    """A manifest for a new version (version and chain are filled in by `Registry.publish`)."""
    from valuefn.checkpoint import ChainLink

    return Manifest(format_version=FORMAT_VERSION, name=name, version=1, backbone=identity, model=config,
                    head={"in_features": identity["hidden_size"] * config.head_inputs, "out_features": 1}, chain=[ChainLink(version=1)],
                    defaults=defaults or SearchSettings(), training=training or {}, metrics=metrics or {})


def publish_model(registry: Registry, name: str, model: ValueModel, identity: dict, *, extend_chain: bool,
                  beta: float = 1.0, defaults: SearchSettings | None = None, training: dict | None = None,
                  metrics: dict | None = None) -> int:
    manifest = make_manifest(name, model.config, identity, defaults=defaults, training=training, metrics=metrics)
    return registry.publish(name, lambda d: write_checkpoint_files(model, d), manifest,
                            extend_chain=extend_chain, beta=beta)


def init_value(registry: Registry, name: str, model_path: str | Path, config: ValueModelConfig | None = None,
               *, seed: int = 0, defaults: SearchSettings | None = None) -> int:
    """Publish a new untrained version of `name` (fresh head, identity LoRA); return its number."""
    config = (config or ValueModelConfig(num_layers=4)).resolved()
    pool = BackbonePool(model_path, torch.device("cpu"))
    torch.manual_seed(seed)
    model = ValueModel(pool.fresh(config), config)
    return publish_model(registry, name, model, pool.identity, extend_chain=False, defaults=defaults,
                         training={"kind": "init", "seed": seed})
