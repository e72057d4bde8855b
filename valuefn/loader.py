"""Turning registry entries into scoring-ready value chains (verified before use), and
publishing value models into the registry.

    loader = ValueLoader(registry, model_path)
    chain = loader.load_chain("demo")          # V_1..V_t of demo's CURRENT version
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path

import torch

from common.dtype import resolve_dtype
from valuefn.checkpoint import (
    FORMAT_VERSION, CheckpointError, Manifest, SearchDefaults, build_value_model, check_backbone,
    load_trained_tensors, read_manifest, write_checkpoint_files,
)
from valuefn.model import (ValueModel, ValueModelConfig, backbone_identity, copy_backbone, default_device, load_backbone,
                           share_tensors)
from valuefn.registry import Registry
from valuefn.scorer import LoadedValue, ScoreItem, ValueChain, check_kv_reuse, forward_values

log = logging.getLogger(__name__)


class BackbonePool:
    """Backbones of the base model, loaded once per layer count and dtype (a config's "auto": this
    machine's choice for the pool's device, `common.dtype`); values get copies."""

    def __init__(self, model_path: str | Path, device: torch.device | None = None):
        self.model_path = Path(model_path)
        self.device = device or default_device()
        self.identity = backbone_identity(self.model_path)
        self._templates: dict[tuple[int | None, str, bool], torch.nn.Module] = {}
        self._lock = threading.Lock()

    def template(self, config: ValueModelConfig) -> torch.nn.Module:
        dtype = resolve_dtype(config.dtype, self.device.type)
        final_norm = config.feature_layers is None  # feature-layer values read the raw residual stream
        key = (config.num_layers, dtype, final_norm)
        with self._lock:
            if key not in self._templates:
                self._templates[key] = load_backbone(self.model_path, config.num_layers, getattr(torch, dtype),
                                                     self.device, final_norm=final_norm)
            return self._templates[key]

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

    def __init__(self, registry: Registry, pool: BackbonePool, dtype: str = "auto"):
        self.registry = registry
        self.pool = pool
        self.dtype = resolve_dtype(dtype, pool.device.type)
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
        model = build_value_model(self.pool.for_inference(run_as.model), run_as, adapter, head)
        value = LoadedValue(name, version, manifest, model)
        built = time.perf_counter()
        architecture = run_as.model.model_dump_json()  # what the per-architecture caches are keyed by
        # One test forward: a checkpoint whose numbers are garbage is refused before it serves.
        if not torch.isfinite(self._probe(value, architecture)).all():
            raise CheckpointError(f"{name}@{version} produces non-finite values", reason="bad_values", path=directory)
        if not model.config.engine_head:
            if architecture not in self._kv_reuse:
                self._kv_reuse[architecture] = check_kv_reuse(value)
            value.kv_reuse = self._kv_reuse[architecture]
        self._loaded[(name, version)] = value
        end = time.perf_counter()
        log.info("loaded value %s@%d in %.3f s (read + verify %.3f, build %.3f, test forward %.3f)", name, version,
                 end - start, verified - start, built - verified, end - built)
        return value

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


def make_manifest(name: str, config: ValueModelConfig, identity: dict, *, defaults: SearchDefaults | None = None,
                  training: dict | None = None, metrics: dict | None = None) -> Manifest:
    """A manifest for a new version (version and chain are filled in by `Registry.publish`)."""
    from valuefn.checkpoint import ChainLink

    return Manifest(format_version=FORMAT_VERSION, name=name, version=1, backbone=identity, model=config,
                    head={"in_features": identity["hidden_size"] * config.head_inputs, "out_features": 1}, chain=[ChainLink(version=1)],
                    defaults=defaults or SearchDefaults(), training=training or {}, metrics=metrics or {})


def publish_model(registry: Registry, name: str, model: ValueModel, identity: dict, *, extend_chain: bool,
                  beta: float = 1.0, defaults: SearchDefaults | None = None, training: dict | None = None,
                  metrics: dict | None = None) -> int:
    manifest = make_manifest(name, model.config, identity, defaults=defaults, training=training, metrics=metrics)
    return registry.publish(name, lambda d: write_checkpoint_files(model, d), manifest,
                            extend_chain=extend_chain, beta=beta)


def init_value(registry: Registry, name: str, model_path: str | Path, config: ValueModelConfig | None = None,
               *, seed: int = 0, defaults: SearchDefaults | None = None) -> int:
    """Publish a new untrained version of `name` (fresh head, identity LoRA); return its number."""
    config = (config or ValueModelConfig(num_layers=4)).resolved()
    pool = BackbonePool(model_path, torch.device("cpu"))
    torch.manual_seed(seed)
    model = ValueModel(pool.fresh(config), config)
    return publish_model(registry, name, model, pool.identity, extend_chain=False, defaults=defaults,
                         training={"kind": "init", "seed": seed})
