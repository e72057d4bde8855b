"""The value model: a (possibly truncated) decoder backbone + LoRA adapters + a scalar head.

The head gives one scalar per token; `pooling` turns those into V(prompt, partial response):
`last` takes the scalar at the sequence's last token, `mean` averages the scalars of the response
tokens so far (a head on mean-pooled hidden states, since the head is linear). The backbone is
the base model's own weights (optionally only its first `num_layers` decoder layers); only the
LoRA adapters and the head are trained and stored.

Why `mean` is the default: a causal LM's last hidden state is about the next token, not
about the text so far. A linear probe on SmolLM2's first 8 layers, predicting the sentiment reward
of 1,760 rollouts (5-fold by prompt), reached Spearman 0.17 from the last token and 0.56 from the
response mean; LoRA training with `last` pooling stayed near 0 on held-out rollouts.

`mean_before` averages the scalars at the positions that *sampled* the response tokens (the
prompt's last token .. the response's second-to-last). With `lora_r=0` and all layers
(an engine value), the scalar is a linear head on the frozen base model's final hidden states,
which the serving engine computes anyway: such a value costs the search no forward pass of its
own (the engine hands the head's outputs back with every sampled token).

    >>> cfg = ValueModelConfig(num_layers=2)
    >>> cfg.lora_r
    16
"""

from __future__ import annotations

import copy
import logging
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import AliasChoices, BaseModel, Field, model_validator
from torch import nn

from common.dtype import resolve_dtype
from common.hashing import sha256_file  # noqa: F401  (re-exported: valuefn.checkpoint and the trainer use it)

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def value_dtype(requested: str, device: str | None = None) -> str:
    """The dtype a value trains in: `requested`, or for "auto" the machine's choice (`common.dtype`),
    except float16 (a GPU without native bf16, compute capability < 8.0), where values train in
    float32: the trainer keeps no float32 master weights, and a float16 regression target overflows.

    >>> value_dtype("bfloat16"), value_dtype("auto", device="cpu") in ("bfloat16", "float32")
    ('bfloat16', True)
    """
    dtype = resolve_dtype(requested, device)
    return "float32" if dtype == "float16" else dtype


class ValueModelConfig(BaseModel):
    """Architecture of a value model; stored in every manifest so a checkpoint can be rebuilt."""

    num_layers: int | None = Field(None, ge=1)
    """Decoder layers of the backbone to keep (None: all). Fewer layers: faster, weaker."""
    lora_r: int = Field(16, ge=0)
    """LoRA rank; 0: no adapters, the backbone stays frozen and only the head is trained."""
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """The dtype it trains in ("auto": this machine's choice, `common.dtype`); manifests record it
    resolved. Serving runs the backbone in the serving machine's dtype (`BackbonePool`)."""
    pooling: Literal["last", "mean", "mean_before"] = "mean"
    """How per-token head outputs become V: the last token's (`last`), the mean over the response
    tokens so far (`mean`; the prompt's last token when there is no response yet), or the mean
    over the positions that sampled them (`mean_before`: the prompt's last token .. the response's
    second-to-last)."""
    value_layers: list[int] | None = Field(None, validation_alias=AliasChoices("value_layers", "feature_layers"))
    """Residual-stream layers whose states feed the head (k: the stream after k decoder layers),
    each RMS-normalised (no weights) and concatenated; None: the backbone's final normed state.
    The backbone then keeps only the first max(value_layers) layers. With `lora_r=0` and
    `mean_before` this is an engine value: vLLM hands the same states back as auxiliary hidden
    states (the mechanism of EAGLE-3 speculative decoding) while it samples. Manifests written
    before the rename call it `feature_layers`; both read the same."""

    @model_validator(mode="after")
    def _value_layers_fit(self) -> "ValueModelConfig":
        if self.value_layers is not None:
            layers = sorted(set(self.value_layers))
            if not layers or layers[0] < 1:
                raise ValueError("value_layers must name layers >= 1 (the stream after that many decoder layers)")
            if self.num_layers is not None and self.num_layers != layers[-1]:
                raise ValueError(f"value_layers {layers} need num_layers = {layers[-1]} (or unset), "
                                 f"not {self.num_layers}")
            self.value_layers, self.num_layers = layers, layers[-1]
        return self

    @property
    def engine_value(self) -> bool:
        """True for an engine value: V needs only hidden states the serving engine computes anyway
        (its final normed ones, all layers, or the residual stream at `value_layers`); no LoRA."""
        return (self.lora_r == 0 and self.pooling == "mean_before"
                and (self.value_layers is not None or self.num_layers is None))

    @property
    def head_inputs(self) -> int:
        """How many hidden-state vectors the head reads per token (concatenated)."""
        return len(self.value_layers) if self.value_layers else 1

    @classmethod
    def for_engine_value(cls, value_layers: list[int] | None = None, **kwargs) -> "ValueModelConfig":
        """An engine value: no LoRA, `mean_before` pooling, on the final normed hidden state
        (`value_layers=None`) or on residual-stream layers the engine exposes."""
        return cls(num_layers=None, lora_r=0, pooling="mean_before", value_layers=value_layers, **kwargs)

    def resolved(self, device: str | None = None) -> "ValueModelConfig":
        """This config with "auto" dtype made this machine's choice for `device` (what a manifest records)."""
        return self.model_copy(update={"dtype": value_dtype(self.dtype, device)})

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, value_dtype(self.dtype))


def pool_values(scalars, response_start: int | None, pooling: str) -> float:
    """V of one sequence from its per-token head outputs `scalars` (a 1-d array over all tokens).

    >>> pool_values([0.0, 1.0, 2.0, 6.0], 2, "mean"), pool_values([0.0, 1.0, 2.0, 6.0], 2, "last")
    (4.0, 6.0)
    >>> pool_values([0.0, 1.0], 2, "mean")  # no response token yet: the prompt's last token
    1.0
    >>> pool_values([0.0, 1.0, 2.0, 6.0], 2, "mean_before")  # positions 1 and 2 sampled tokens 2 and 3
    1.5
    """
    if pooling == "last" or response_start is None or response_start >= len(scalars):
        return float(scalars[-1])
    shift = POOLING_SHIFT[pooling]
    window = scalars[max(response_start - shift, 0): len(scalars) - shift]
    return float(np.add.reduce(window) / len(window))


POOLING_SHIFT = {"last": 0, "mean": 0, "mean_before": 1}
"""How many positions before each response token the scalar that values it sits."""


def pool_response(values: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, W) head outputs at response tokens 0..W-1 -> (B, W) V after each response token.

    >>> pool_response(torch.tensor([[1.0, 3.0, 5.0]]), "mean").tolist()
    [[1.0, 2.0, 3.0]]

    For `mean_before` the caller passes the outputs at the positions that sampled the tokens
    (`POOLING_SHIFT`).
    """
    if pooling == "last":
        return values
    counts = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)
    return values.cumsum(dim=1) / counts


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dimension (float32 in, float32 out): the feature-layer values'
    input scaling, computed identically by the engine (`server.engine_patches`).

    >>> rms_normalise(torch.tensor([[3.0, -3.0]])).tolist()
    [[1.0, -1.0]]
    """
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backbone_identity(model_path: str | Path) -> dict:
    """What a checkpoint must match to be used with this base model: config and tokenizer hashes.

    Token ids flow unchanged from the engine to the scorer, so the tokenizer must be identical.
    """
    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    keep = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rope_theta", "rope_parameters", "head_dim")
    canonical = json.dumps({k: config.get(k) for k in keep}, sort_keys=True)
    tok_files = [p for p in ("tokenizer.json", "tokenizer.model", "vocab.json") if (path / p).is_file()]
    tok_hash = hashlib.sha256(b"".join(sha256_file(path / p).encode() for p in tok_files)).hexdigest()
    return {
        "name": config.get("_name_or_path") or path.name,
        "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "tokenizer_sha256": tok_hash,
        "hidden_size": config["hidden_size"],
        "total_layers": config["num_hidden_layers"],
    }


def load_backbone(model_path: str | Path, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | None = None, *, final_norm: bool = True) -> nn.Module:
    """The base model's decoder (no LM head), truncated to its first `num_layers` layers.

    Only the tensors those layers need are read (safetensors files are read lazily), straight
    to `device`: a 4-layer value of an 8B model reads ~1 GB, not 16. `final_norm=False` drops
    the final norm: the last hidden state is then the raw residual stream (feature-layer values)."""
    from transformers import AutoModel

    device = device or default_device()
    try:
        model = _load_layers(Path(model_path), num_layers, dtype, device)
    except Exception as exc:  # noqa: BLE001 - an unusual checkpoint layout: read it all
        log.info("partial load of %s failed (%s); loading the whole model", model_path, exc)
        model = None
    if model is None:
        model = truncate(AutoModel.from_pretrained(str(model_path), dtype=dtype), num_layers)
    if not final_norm:
        model.norm = nn.Identity()
    return model.to(device).eval()


def _load_layers(path: Path, num_layers: int | None, dtype: torch.dtype, device: torch.device) -> nn.Module | None:
    """The decoder's first `num_layers` layers (None: all) from the checkpoint's safetensors files
    (never its LM head), or None when it has no safetensors files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    files = sorted(path.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(str(path))
    if not files:
        return None
    if num_layers is not None and num_layers < config.num_hidden_layers:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        model = AutoModel.from_config(config, dtype=dtype)
    wanted = set(model.state_dict())
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = key[len("model."):] if key.startswith("model.") else key
                if name in wanted:
                    state[name] = f.get_tensor(key).to(dtype)
    missing = wanted - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    for name, module in model.named_modules():  # non-persistent buffers (rotary frequencies) are rebuilt
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not name.endswith("rotary_emb"):
                raise ValueError(f"cannot rebuild buffers of {name}")
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(config=config).to(device))
    return model


def truncate(model: nn.Module, num_layers: int | None) -> nn.Module:
    if num_layers is not None and num_layers < len(model.layers):
        model.layers = model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def copy_backbone(template: nn.Module) -> nn.Module:
    """A trainable copy of a backbone that shares the (never trained) embedding matrix."""
    embed = template.get_input_embeddings()
    return copy.deepcopy(template, memo={id(embed): embed, id(embed.weight): embed.weight})


def share_tensors(template: nn.Module) -> nn.Module:
    """A copy of a backbone's modules that shares every tensor with it: for `merge_lora`, which
    replaces the weights it changes, so a loaded value copies only those (a fast hot swap)."""
    memo = {id(t): t for t in (*template.parameters(), *template.buffers())}
    return copy.deepcopy(template, memo=memo)


def merge_lora(backbone: nn.Module, adapter: dict[str, torch.Tensor], config: ValueModelConfig) -> None:
    """W += B @ A * alpha / r for every LoRA pair in `adapter` (keys as peft saves them:
    `base_model.model.<module>.lora_A.weight`). Raises ValueError on keys or shapes that do not fit."""
    if config.lora_r == 0:
        if adapter:
            raise ValueError(f"a model without LoRA got adapter tensors {list(adapter)[:3]}")
        return
    modules = dict(backbone.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key)
        if match is None or not isinstance(modules.get(match[1]), nn.Linear):
            raise ValueError(f"adapter has keys this model does not: {key}")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    expected = {n for n, m in modules.items() if isinstance(m, nn.Linear) and n.split(".")[-1] in config.target_modules}
    if set(pairs) != expected or any(len(p) != 2 for p in pairs.values()):
        missing = sorted(expected - {n for n, p in pairs.items() if len(p) == 2})
        raise ValueError(f"adapter does not cover the model's LoRA modules (e.g. {missing[:3]})")
    scaling = config.lora_alpha / config.lora_r
    with torch.no_grad():
        for name, pair in pairs.items():
            weight = modules[name].weight
            a, b = pair["lora_A"].float(), pair["lora_B"].float()
            if a.shape != (config.lora_r, weight.shape[1]) or b.shape != (weight.shape[0], config.lora_r):
                raise ValueError(f"{name}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {tuple(weight.shape)}")
            merged = torch.addmm(weight.float(), b.to(weight.device), a.to(weight.device), alpha=scaling)
            modules[name].weight = nn.Parameter(merged.to(weight.dtype), requires_grad=False)  # never in place:
            # `backbone` may share its tensors with the pool's template (`share_tensors`)


class ValueModel(nn.Module):
    """backbone (+ LoRA) -> last hidden state -> linear head -> one scalar per token."""

    def __init__(self, backbone: nn.Module, config: ValueModelConfig, *, with_lora: bool = True):
        """`with_lora=False`: no adapters are added (the backbone already holds merged ones)."""
        super().__init__()
        self.config = config
        for p in backbone.parameters():
            p.requires_grad_(False)
        if config.lora_r > 0 and with_lora:
            from peft import LoraConfig, get_peft_model

            # Full names of the nn.Linear modules the targets name (as `merge_lora` expects): a bare
            # suffix would also make peft wrap a MoE layer's fused expert weights, which it then
            # adapts as parameters that no merge (and no engine) knows.
            targets = sorted(n for n, m in backbone.named_modules()
                             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in config.target_modules)
            backbone = get_peft_model(backbone, LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=targets, bias="none"))
        self.backbone = backbone
        features = backbone.config.hidden_size * config.head_inputs
        self.head = nn.Linear(features, 1, dtype=torch.float32, device=next(backbone.parameters()).device)
        nn.init.normal_(self.head.weight, std=1.0 / features**0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False):
        """Values for every position, (B, T) float32, and the updated KV cache."""
        features, cache = self.features(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        return self.head(features).squeeze(-1), cache  # (B, T)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False):
        """The head's inputs for every position, (B, T, D) float32, and the updated KV cache."""
        layers = self.config.value_layers
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache,
                            output_hidden_states=layers is not None)
        if layers is None:
            return out.last_hidden_state.float(), out.past_key_values  # (B, T, H)
        # the backbone has no final norm (`final_norm=False`): every entry is the raw stream
        return torch.cat([rms_normalise(out.hidden_states[k].float()) for k in layers], dim=-1), out.past_key_values

    # --- what a checkpoint stores: adapters + head, with normalised keys -----------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.lora_r == 0:
            return {}
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.backbone).items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.head.state_dict().items()}

    def load_trained(self, adapter: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> None:
        if self.config.lora_r == 0:
            if adapter:
                raise ValueError(f"a model without LoRA got adapter tensors {list(adapter)[:3]}")
        else:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.backbone, adapter)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"adapter has keys this model does not: {unexpected[:3]}")
        self.head.load_state_dict(head)

    def for_inference(self) -> "ValueModel":
        """Merge LoRA into the backbone weights (no adapter overhead when scoring)."""
        if hasattr(self.backbone, "merge_and_unload"):
            self.backbone = self.backbone.merge_and_unload()
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    @classmethod
    def merged(cls, backbone: nn.Module, config: ValueModelConfig, adapter: dict[str, torch.Tensor],
               head: dict[str, torch.Tensor]) -> "ValueModel":
        """An inference model with `adapter` (peft LoRA tensors) merged straight into `backbone`
        (which may share tensors with the pool's template: merging replaces weights, never writes
        into them): the weights `for_inference` gives, without building peft modules, which were
        most of the time of a hot swap."""
        merge_lora(backbone, adapter, config)
        model = cls(backbone, config, with_lora=False)
        model.head.load_state_dict(head)
        return model.for_inference()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
