"""`POST /v1/score` (iro extension): values of given responses to one prompt under a value chain."""

from __future__ import annotations

from common.protocol import ScoreRequest, ScoreResponse
from server.errors import GuidanceError
from server.openai.serving import render_chat
from valuefn.scorer import ScoreItem, chain_scores


class ScoreServing:
    def __init__(self, engine, scorer, values):
        self.engine = engine
        self.scorer = scorer
        self.values = values

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        chain = await self.values.chain_for(request.value)
        encode = self.engine.tokenizer.encode
        if request.messages is not None:
            prompt_ids = render_chat(self.engine.tokenizer, request.messages).token_ids
        else:
            prompt_ids = encode(request.prompt, add_special_tokens=False)
        seqs = [prompt_ids + encode(r, add_special_tokens=False) for r in request.responses]
        if max(len(s) for s in seqs) > self.engine.max_model_len:
            raise GuidanceError("prompt + response longer than the context", param="responses")
        if any(len(s) == len(prompt_ids) for s in seqs) or not prompt_ids:
            raise GuidanceError("prompt and responses must not be empty", param="responses")
        raw = await self.scorer.values(chain, [ScoreItem(s, len(prompt_ids), len(prompt_ids)) for s in seqs])
        return ScoreResponse(value=chain.name, versions=chain.versions, scores=chain_scores(raw, chain.betas).tolist(),
                             values=raw.tolist())
