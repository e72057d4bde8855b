"""The architecture matrix: each model family's tiny random model (`common.tiny_models`) through a
real `iro serve --model DIR` on the CPU engine, checked five ways, one server per family.

    python -m bench.arch_matrix                      # every family, a markdown table (README)
    python -m bench.arch_matrix llama gemma2 --json out.json

Per family (`FamilyServer`):

- **plain**: a chat completion, and the engine's top-5 next-token logprobs against the Hugging
  Face forward of the same checkpoint (max |difference|): vLLM's implementation of the family
  computes what transformers' does.
- **engine value**: the default engine value (a head on the residual stream after the layers
  `default_value_layers` names) and the final-state one, scored by Best-of-N; where the values
  came from (engine: no scorer pass; scorer: the fallback) and their max |difference| from the
  value's Hugging Face forward (`valuefn`) of the very token ids sampled.
- **LoRA value**: a LoRA value (scorer), the same comparison.
- **policy adapter**: a random LoRA adapter published into the policy registry, served as a model:
  its logprobs against peft's forward of the adapted model, and unlike the base model's.
- **guided + response_format**: CBS with the default engine value and a JSON schema.

The test (tests/e2e/test_arch_matrix.py) asserts on the same measurements.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import server as bench_server

API_KEY, ADMIN_KEY = "arch-api-key", "arch-admin-key"
SERVER_ENV = {"IRO_API_KEY": API_KEY, "IRO_ADMIN_KEY": ADMIN_KEY, "IRO_MAX_NUM_BATCHED_TOKENS": "256",
              "IRO_KV_CACHE_GIB": "1", "IRO_ENFORCE_EAGER": "1", "IRO_MAX_MODEL_LEN": "512"}
"""Small and eager: an engine start of seconds, throughput is not measured here."""
VALUES = {"engine": "default engine value (layers)", "final": "engine value (final state)", "lora": "LoRA value"}
POLICY = "pol"
POLICY_RANK = 8
PROMPT = ("The lighthouse keeper climbed the narrow stairs every evening at dusk, lit the great lamp, "
          "wound the clockwork that turned its lens, and then sat by the window with a cup of tea, "
          "watching the ships pass far out on the dark water while the wind rose and the")
"""Longer than the 32-token sliding window of the Gemma models, so windowed attention is compared too."""
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
NO_SPECIAL = {"0": -100, "1": -100, "2": -100}
"""The embedded tokenizer's <|endoftext|>, <|im_start|>, <|im_end|>: candidates end by length, so
every sampled token was sampled at a position whose state the engine handed to the heads."""
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}


NO_ENGINE_LORA = {
    family: "with LoRA on (--policies-dir) vLLM 0.32 runs every fused-MoE layer with its Triton MoE kernel "
            "(fused_moe/oracle/unquantized.py picks TRITON whenever LoRA is enabled, whatever the platform or "
            "lora_target_modules): on CPU the engine dies at the first request (\"module 'triton.language' has no "
            "attribute 'float32'\"), so this family is served without a policy registry"
    for family in ("qwen3-moe", "mixtral")}
"""Families whose engine cannot run with LoRA enabled (`--policies-dir`) on CPU, and why (measured)."""


def value_configs(num_layers: int) -> dict:
    """The three values every family is checked with (`VALUES`), as `ValueModelConfig`s."""
    from common.engine_args import default_value_layers
    from valuefn.model import ValueModelConfig

    return {"engine": ValueModelConfig.for_engine_value(value_layers=list(default_value_layers(num_layers))),
            "final": ValueModelConfig.for_engine_value(value_layers=None),
            "lora": ValueModelConfig(num_layers=2, lora_r=8, lora_alpha=16)}


def attention_targets(model) -> list[str]:
    """The linear layers of `model`'s attention blocks by name (q_proj.. or Phi-3's fused qkv_proj):
    what a policy adapter targets in every family (vLLM's CPU LoRA does not reach MoE experts)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and ".self_attn." in name})


def publish_policy(policies_dir: Path, model_dir: Path, *, seed: int = 1):
    """Publish a random rank-8 LoRA adapter on the attention layers as policy `POLICY`; return
    the peft model (float32, eager attention: transformers' reference, the one that applies
    Gemma-2's attention soft-capping) that computes what it should."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from valuefn.model import backbone_identity
    from registry.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=POLICY_RANK, lora_alpha=2 * POLICY_RANK,
                                            target_modules=attention_targets(base), task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": POLICY, "version": 1, "method": "apa",
                "lora_rank": POLICY_RANK, "base": backbone_identity(model_dir)}
    PolicyRegistry(policies_dir).publish_adapter(POLICY, lambda d: write_adapter_files(model, d), manifest)
    return model.eval()


@dataclass
class FamilyServer:
    """A family's tiny model served by `iro serve --model DIR`, its values and policy published."""

    family: str
    model_dir: Path
    process: bench_server.ServerProcess
    policies: bool
    model_id: str = ""
    peft_model: object = None
    values: dict = field(default_factory=dict)
    """{value: serving version, or the reason the server refused it} (`wait_values`)."""
    _hf: dict = field(default_factory=dict)

    @classmethod
    def start(cls, family: str, workdir: Path, *, policies: bool | None = None, wait: float = 300,
              cwd: Path | None = None) -> "FamilyServer":
        """Build, publish and serve; `policies` (default: unless `NO_ENGINE_LORA`) adds the policy
        registry, which turns LoRA on in the engine."""
        from common.tiny_models import build_tiny_model
        from valuefn.loader import init_value
        from valuefn.model import backbone_identity
        from valuefn.registry import Registry

        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = build_tiny_model(family, workdir / "model")
        registry = Registry(workdir / "values")
        for seed, (name, config) in enumerate(value_configs(backbone_identity(model_dir)["total_layers"]).items()):
            with warnings.catch_warnings():  # MoE: peft maps gate/up/down_proj onto the fused experts' parameters
                warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match",
                                        RuntimeWarning)  # and says it once per pattern; the server refuses them
                init_value(registry, name, model_dir, config, seed=seed)
        args = ["--model", str(model_dir)]
        peft_model = None
        policies = family not in NO_ENGINE_LORA if policies is None else policies
        if policies:
            peft_model = publish_policy(workdir / "policies", model_dir)
            args += ["--policies-dir", str(workdir / "policies")]
        process = bench_server.start(workdir, env=SERVER_ENV, args=args, wait=wait, cwd=cwd, ready=False)
        server = cls(family, model_dir, process, policies, peft_model=peft_model)
        try:
            process.wait_healthy(wait)
            server.model_id = server.get("/v1/models").json()["data"][0]["id"]
            server.wait_values()
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def start_seconds(self) -> float:
        return self.process.started_in

    def stop(self) -> None:
        self.process.stop()

    # --- HTTP --------------------------------------------------------------------------------------
    def post(self, path: str, body: dict, *, admin: bool = False) -> httpx.Response:
        key = ADMIN_KEY if admin else API_KEY
        return httpx.post(self.process.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def get(self, path: str, *, admin: bool = False) -> httpx.Response:
        key = ADMIN_KEY if admin else API_KEY
        return httpx.get(self.process.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def ok(self, path: str, body: dict) -> dict:
        r = self.post(path, body)
        if r.status_code != 200:
            raise AssertionError(f"{path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def wait_values(self, timeout: float = 60) -> dict:
        """{value: serving version or the reason it was refused} once every value of `VALUES` is
        served or refused."""
        deadline = time.monotonic() + timeout
        while True:
            data = {v["name"]: v for v in self.get("/v1/values", admin=True).json()["data"]}
            outcome = {n: data[n].get("serving_version") or (data[n].get("refused") or [{}])[0].get("reason")
                       for n in VALUES if n in data}
            if len(outcome) == len(VALUES) and all(outcome.values()):
                self.values = outcome
                return outcome
            if time.monotonic() > deadline:
                raise AssertionError(f"values not served after {timeout}s: {data}")
            time.sleep(0.1)  # polling the server's state with a deadline

    def scorer_passes(self) -> float:
        text = self.get("/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("iro_scorer_batch_size_count"))

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    # --- the Hugging Face side -----------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        from common.dtype import resolve_dtype

        return resolve_dtype("auto")  # what the server's engine and scorer resolve to on this machine

    def hf_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        if "lm" not in self._hf:
            self._hf["lm"] = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype),
                                                                  attn_implementation="eager").eval()
        return self._hf["lm"]

    def hf_values(self, name: str, items: list[tuple[list[int], int]]) -> list[float]:
        """V of each (token ids, response start) under value `name`, by the Hugging Face forward."""
        from valuefn.loader import BackbonePool, ValueLoader
        from valuefn.registry import Registry
        from valuefn.scorer import ScoreItem, forward_values

        import torch

        if "loader" not in self._hf:
            pool = BackbonePool(self.model_dir, torch.device("cpu"))
            self._hf["loader"] = ValueLoader(Registry(self.process.values_dir), pool)
        chain = self._hf["loader"].load_chain(name)
        value = chain.links[-1][0]
        return forward_values(value, [ScoreItem(ids, 0, start) for ids, start in items], use_cache=False).tolist()

    @staticmethod
    def top_logprobs(model, ids: list[int]) -> dict[int, float]:
        import torch

        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        return dict(enumerate(logits.log_softmax(-1).tolist()))

    # --- the five checks -------------------------------------------------------------------------------
    def engine_logprobs(self, model: str) -> tuple[list[int], dict[int, float]]:
        """(prompt ids, {token id: logprob}) of the engine's top-5 next tokens after `PROMPT`."""
        body = self.ok("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                           "logprobs": 5, "return_token_ids": True})
        tokenizer = self.tokenizer()
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
        ids = {}
        for token, logprob in top.items():
            encoded = tokenizer.convert_tokens_to_ids(token)
            if encoded is None or encoded == tokenizer.unk_token_id:
                encoded = tokenizer.encode(token, add_special_tokens=False)[0]
            ids[encoded] = logprob
        return body["prompt_token_ids"][0], ids

    def tokenizer(self):
        from transformers import AutoTokenizer

        if "tok" not in self._hf:
            self._hf["tok"] = AutoTokenizer.from_pretrained(self.model_dir)
        return self._hf["tok"]

    def check_plain(self) -> dict:
        """A chat completion, and the engine's top-5 logprobs against transformers'."""
        chat = self.ok("/v1/chat/completions", {"model": self.model_id, "messages": CHAT, "max_tokens": 8, "n": 2,
                                                "temperature": 0.8, "seed": 1})
        assert len(chat["choices"]) == 2 and all(c["message"]["content"] is not None for c in chat["choices"]), chat
        prompt_ids, engine = self.engine_logprobs(self.model_id)
        hf = self.top_logprobs(self.hf_model(), prompt_ids)
        return {"logprob_diff": max(abs(lp - hf[t]) for t, lp in engine.items()),
                "top_token_agrees": max(engine, key=engine.get) == max(hf, key=hf.get)}

    def check_value(self, name: str, k: int = 4, max_tokens: int = 6) -> dict:
        """Best-of-k with value `name`: where its values were computed (`ran_in`: engine or
        scorer) and their max |difference| from the Hugging Face forward of the sampled ids."""
        if not isinstance(self.values.get(name), int):
            raise AssertionError(f"value {name} refused: {self.values.get(name)}")
        before = self.scorer_passes()
        body = self.ok("/v1/completions", {
            "model": self.model_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "seed": 3,
            "n": k, "logit_bias": NO_SPECIAL, "return_token_ids": True,
            "guidance": {"value": name, "mode": "bon", "k": k}})
        ran_in = "engine" if self.scorer_passes() == before else "scorer"
        prompt = body["prompt_token_ids"][0]
        ids = [c["token_ids"] for c in body["choices"]]
        assert body["guidance"]["candidates_scored"] == k and all(len(x) == max_tokens for x in ids), body
        hf = self.hf_values(name, [(prompt + x, len(prompt)) for x in ids])
        served = body["guidance"]["scores"]  # one value, beta 1: the score is V
        return {"ran_in": ran_in, "value_diff": max(abs(a - b) for a, b in zip(served, hf)),
                "value_scale": max(abs(b) for b in hf)}

    def check_policy(self) -> dict:
        """The policy's logprobs against peft's forward of the adapted model, and the base model's."""
        if not self.policies:
            raise AssertionError(f"no policy registry: {NO_ENGINE_LORA.get(self.family, 'not configured')}")
        cards = {m["id"]: m for m in self.get("/v1/models").json()["data"]}
        assert cards.get(POLICY, {}).get("root") == self.model_id, cards
        prompt_ids, engine = self.engine_logprobs(POLICY)
        _, base = self.engine_logprobs(self.model_id)
        import torch

        with torch.inference_mode():
            logits = self.peft_model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
        hf = dict(enumerate(logits.log_softmax(-1).tolist()))
        base_hf = self.top_logprobs(self.hf_model(), prompt_ids)
        return {"logprob_diff": max(abs(lp - hf[t]) for t, lp in engine.items()),
                "adapter_effect": max(abs(hf[t] - base_hf[t]) for t in engine),
                "differs_from_base": engine != base}

    def whitespace_tokens(self) -> list[int]:
        """Token ids that decode to whitespace only (166 of the embedded tokenizer's)."""
        tokenizer = self.tokenizer()
        return [i for i in range(len(tokenizer)) if (text := tokenizer.decode([i])) and not text.strip()]

    def check_guided_json(self) -> dict:
        """CBS with the default engine value and a JSON schema: a schema-valid answer. A random
        model puts most of its mass on the grammar's optional whitespace (the JSON grammar allows
        any amount), so whitespace tokens are banned with `logit_bias`: the answer then ends."""
        bias = {str(i): -100 for i in self.whitespace_tokens()}
        body = self.ok("/v1/chat/completions", {
            "model": self.model_id, "messages": CHAT, "max_tokens": 32, "temperature": 0.8, "seed": 5,
            "logit_bias": bias, "response_format": RESPONSE_FORMAT,
            "guidance": {"value": "engine", "w": 2, "k": 2, "l": 4}})
        choice = body["choices"][0]
        text = choice["message"]["content"]
        return {"finish_reason": choice["finish_reason"], "text": text, "chunks": body["guidance"]["chunks"],
                "valid": _valid(text)}


def _valid(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"ok"} and isinstance(obj["ok"], bool)


# --- the table ----------------------------------------------------------------------------------------

def measure(family: str, workdir: Path) -> dict:
    """Every check of one family; a check that fails records its error instead of stopping the row."""
    row: dict = {"family": family}
    t0 = time.monotonic()
    try:
        server = FamilyServer.start(family, workdir)
        row["prepare_seconds"] = round(server.process.t0 - t0, 1)
    except Exception as exc:  # noqa: BLE001 - the table records why a family does not start
        row["start"] = {"error": _short(exc)}
        return row
    row["start_seconds"] = round(server.start_seconds, 1)
    try:
        checks = {"plain": server.check_plain, "engine": lambda: server.check_value("engine"),
                  "final": lambda: server.check_value("final"), "lora": lambda: server.check_value("lora"),
                  "policy": server.check_policy, "guided_json": server.check_guided_json}
        for key, check in checks.items():
            t = time.monotonic()
            try:
                row[key] = check()
            except Exception as exc:  # noqa: BLE001
                row[key] = {"error": _short(exc)}
            row[key]["seconds"] = round(time.monotonic() - t, 2)
        warnings = re.findall(r"engine value layers are off: ([^\n]+)", server.log_text())
        row["notes"] = sorted(set(warnings))
    finally:
        server.stop()
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"


def _cell(result: dict | None, key: str | None = None) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return f"fails: {result['error']}"
    if "ran_in" in result:
        return f"{result['ran_in']}, {result['value_diff']:.1e}"
    if "valid" in result:
        return "valid JSON" if result["valid"] else f"invalid ({result['finish_reason']}): {result['text'][:30]!r}"
    if key == "policy":
        return f"ok, {result['logprob_diff']:.1e}" if result["differs_from_base"] else "no effect"
    return f"ok, {result['logprob_diff']:.1e}"


def table(rows: list[dict]) -> str:
    head = ("| family | start (s) | plain (logprob diff) | default engine value (where, diff) | "
            "final-state engine value | LoRA value | policy adapter (logprob diff) | CBS + response_format |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "start" in r:
            lines.append(f"| {r['family']} | fails: {r['start']['error']} |" + " - |" * 6)
            continue
        lines.append(f"| {r['family']} | {r['start_seconds']} | {_cell(r.get('plain'))} | {_cell(r.get('engine'))} | "
                     f"{_cell(r.get('final'))} | {_cell(r.get('lora'))} | {_cell(r.get('policy'), 'policy')} | "
                     f"{_cell(r.get('guided_json'))} |")
    return "\n".join(lines)


def cpu_model() -> str:
    from common.dtype import parse_cpuinfo

    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())[0]
    except OSError:
        return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    from common.tiny_models import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help=f"default: all ({', '.join(FAMILIES)})")
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/arch-matrix"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = []
    for family in args.families:
        row = measure(family, args.workdir / family)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    from common.dtype import resolve_dtype

    print(f"{cpu_model()}, {resolve_dtype('auto')}, vLLM CPU engine (eager)\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_model(), "dtype": resolve_dtype("auto"), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
