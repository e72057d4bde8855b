"""A scripted engine and an app around it: serving logic and error mapping without vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.engine import EngineClient
from server.openai.serving import OpenAIServing
from server.settings import ServerSettings

API_KEY = "unit-key"


class ByteTokenizer:
    """One token per UTF-8 byte; a chat template of `<role>content` lines."""

    eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("this template has no tool role")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


class ScriptedEngine(EngineClient):
    """Answers every request with `script` (cut to max_tokens), one token per character.

    `fail_after` tokens into a request it raises `error` (to test error paths).
    """

    model_id = "tiny"
    max_model_len = 64
    eos_token_ids = [0]

    def __init__(self, script: str = "abcdefghijklmnopqrstuvwxyz", error: Exception | None = None, fail_after: int = 0):
        self._tokenizer = ByteTokenizer()
        self.script = script
        self.error = error
        self.fail_after = fail_after
        self.dead = False
        self.requests: list[tuple[list[int], object]] = []
        self.closed = 0

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def errored(self) -> bool:
        return self.dead

    async def stream(self, request, request_id, *, delta=False):
        params = request
        self.requests.append((list(request.prompt_ids), request))
        text = self.script[:params.max_tokens]
        try:
            if delta:
                for pos, ch in enumerate(text):
                    if self.error is not None and pos == self.fail_after:
                        raise self.error
                    last = pos == len(text) - 1
                    yield self._output([ch], params, "length" if last else None)
            else:
                if self.error is not None:
                    raise self.error
                yield self._output(list(text), params, "length")
        finally:
            self.closed += 1

    def _output(self, chars, params, finish_reason):
        outputs = [SimpleNamespace(index=i, text="".join(chars), token_ids=[ord(c) for c in chars],
                                   finish_reason=finish_reason, logprobs=None) for i in range(params.n)]
        return SimpleNamespace(outputs=outputs)

    async def sample(self, request):  # pragma: no cover - not used by the OpenAI endpoints
        raise NotImplementedError


def make_client(engine: EngineClient | None = None, *, serving: bool = True, raise_server_exceptions: bool = True,
                **settings) -> TestClient:
    """A TestClient on `build_app` with `engine` behind the serving object (no lifespan, no vLLM)."""
    app = build_app(ServerSettings(api_key=API_KEY, max_n=4, max_queue=8, **settings))
    if serving:
        engine = engine or ScriptedEngine()
        app.state.serving = OpenAIServing(engine, max_n=app.state.settings.max_n,
                                          max_queue=app.state.settings.max_queue, metrics=app.state.metrics)
    return TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"},
                      raise_server_exceptions=raise_server_exceptions)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def client(engine) -> TestClient:
    return make_client(engine)
