"""`POST /v1/score` (iro extension): values of given responses to one prompt under a value chain.

Its cost is bounded before the scorer sees it: at most `max_score_responses` responses and
`max_score_tokens` tokens (prompt + response, summed over the responses), and at most
`max_score_queue` requests scoring or waiting at once (429 with Retry-After past it). A client
that disconnects cancels its request (the route's `until_disconnect`), and the scorer drops a job
whose future was cancelled before its batch starts.

A chain of engine values that the engine computes is valued in the engine (its heads at every
prompt position of one request per response, `EngineRequest.prompt_values`), the way guided
decoding values candidates: no backbone in this process. Other chains go to the scorer.
"""

from __future__ import annotations

import asyncio

import anyio
import numpy as np

from common.protocol import ScoreRequest, ScoreResponse
from common.sampling import Sampling
from server.engine import EngineRequest
from server.errors import GuidanceError, InvalidRequestError, IroError, OverloadedError
from server.openai.serving import off_loop, render_chat
from valuefn.scorer import ScoreItem, chain_scores


class ScoreServing:
    def __init__(self, engine, scorer, values, *, max_responses: int = 256, max_tokens: int = 16384,
                 max_queue: int = 8, tokenizer_limiter: anyio.CapacityLimiter | None = None):
        self.engine = engine
        self.scorer = scorer
        self.values = values
        self.max_responses = max_responses
        self.max_tokens = max_tokens
        self.max_queue = max_queue
        self.tokenizer_limiter = tokenizer_limiter or anyio.CapacityLimiter(1)
        self._in_progress = 0

    def _encode(self, request: ScoreRequest) -> tuple[list[int], list[list[int]]]:
        encode = self.engine.tokenizer.encode
        if request.messages is not None:
            prompt_ids = render_chat(self.engine.tokenizer, request.messages).token_ids
        else:
            prompt_ids = encode(request.prompt, add_special_tokens=False)
        return prompt_ids, [prompt_ids + encode(r, add_special_tokens=False) for r in request.responses]

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        if len(request.responses) > self.max_responses:
            raise InvalidRequestError(f"responses holds {len(request.responses)} texts; this server scores at most "
                                      f"{self.max_responses} per request", param="responses", code="too_many_entries")
        if self._in_progress >= self.max_queue:
            raise OverloadedError(f"the scorer is busy ({self._in_progress} /v1/score requests in progress, limit "
                                  f"{self.max_queue}); retry later", code="scorer_busy")
        self._in_progress += 1
        try:
            return await self._score(request)
        finally:
            self._in_progress -= 1

    async def _engine_values(self, chain, prompt_ids: list[int], seqs: list[list[int]]) -> np.ndarray | None:
        """(responses, chain members) raw values computed by the engine, as guided decoding values
        candidates (each response token's heads at the position before it, averaged: `mean_before`),
        when every member is an engine value the engine computes; None otherwise, or when a value
        comes back non-finite (the scorer then runs the chain)."""
        heads, engine = chain.value_heads, self.engine
        if heads is None or not getattr(engine, "values_prompts", False) or len(heads) > engine.max_value_heads:
            return None
        layers = chain.value_layers
        if not set(layers or ()) <= set(engine.value_layers):
            return None
        samples = await asyncio.gather(*[engine.sample(EngineRequest(
            seq, n=1, max_tokens=1, sampling=Sampling(temperature=0.0), detokenize=False, value_heads=heads,
            value_layers=layers, prompt_values=True)) for seq in seqs])
        raw = np.array([np.asarray(s[0].prompt_values[len(prompt_ids):], dtype=np.float64).mean(axis=0)
                        for s in samples])
        return raw if raw.shape == (len(seqs), len(heads)) and np.isfinite(raw).all() else None

    async def _score(self, request: ScoreRequest) -> ScoreResponse:
        try:
            chain = await self.values.chain_for(request.value)
        except IroError as exc:  # the manager names the guidance field; here the value is `value`
            if exc.param == "guidance.value":
                exc.param = "value"
            raise
        prompt_ids, seqs = await off_loop(self.tokenizer_limiter, self._encode, request)
        if max(len(s) for s in seqs) > self.engine.max_model_len:
            raise GuidanceError("prompt + response longer than the context", param="responses")
        if any(len(s) == len(prompt_ids) for s in seqs) or not prompt_ids:
            raise GuidanceError("prompt and responses must not be empty", param="responses")
        total = sum(len(s) for s in seqs)
        if total > self.max_tokens:
            raise InvalidRequestError(f"scoring these responses takes {total} tokens (prompt + response, summed); "
                                      f"this server scores at most {self.max_tokens} per request",
                                      param="responses", code="too_many_tokens")
        raw = await self._engine_values(chain, prompt_ids, seqs)
        if raw is None:
            raw = await self.scorer.values(chain, [ScoreItem(s, len(prompt_ids), len(prompt_ids)) for s in seqs])
        return ScoreResponse(value=chain.name, versions=chain.versions, scores=chain_scores(raw, chain.betas).tolist(),
                             values=raw.tolist())
