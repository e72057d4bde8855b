"""Where does a guided request's time go? In-process: one engine, plain n=16 vs CBS with a free
scorer vs CBS with the real scorer, all on the same 16 prompts, in one run, and CBS with an engine-head value (the engine
computes the value while it samples; no scorer pass).

    python -m bench.profile_guided [--engine-threads 0-1] [--scorer-threads 2] [--block-size 16] [--value-layers 4]
                                   [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.guided import MAX_TOKENS, PROMPTS, TEMPERATURE
from common.sampling import Sampling
from common.search_settings import SearchSettings
from server.engine import EngineRequest, VllmEngine
from server.search import Searcher, SearchParams


class FreeScorer:
    async def values(self, chain, items):
        return np.random.default_rng(len(items)).normal(size=(len(items), 1))


class TimedScorer:
    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    async def values(self, chain, items):
        t0 = time.perf_counter()
        out = await self.inner.values(chain, items)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class Chain:
    betas = [1.0]
    links = ((None, 1.0),)


async def main(args):
    from common.model_store import prepare_default_model
    from valuefn.loader import BackbonePool, ValueLoader, init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry
    from valuefn.scorer import Scorer

    model_path = prepare_default_model()
    engine = VllmEngine.start(str(model_path), "m", max_model_len=2048, kv_cache_gib=2, block_size=args.block_size,
                              enforce_eager=not args.compile, dtype=args.dtype, engine_threads=args.engine_threads,
                              max_num_batched_tokens=args.max_num_batched_tokens)
    await engine.read_worker_report()
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for p in PROMPTS]
    reg = Registry(Path(tempfile.mkdtemp()) / "values")
    init_value(reg, "p", model_path, ValueModelConfig(num_layers=args.value_layers, dtype=args.dtype))
    loader = ValueLoader(reg, BackbonePool(model_path))
    chain = loader.load_chain("p")
    scorer = Scorer(threads=args.scorer_threads)
    layers = list(engine.value_layers) or None  # the default engine value: the exposed residual-stream layers
    init_value(reg, "h", model_path, ValueModelConfig.for_engine_value(value_layers=layers, dtype=args.dtype))
    head_chain = loader.load_chain("h")  # the engine values candidates
    ref = SearchSettings()  # IRO's reference search: cbs, w=4, k=4, l=8
    params = SearchParams(mode=ref.mode, w=ref.w, k=ref.k, l=ref.l, max_tokens=MAX_TOKENS,
                          sampling=Sampling(temperature=TEMPERATURE), align=args.block_size if args.align else 1)

    async def plain():
        return await asyncio.gather(*[engine.sample(EngineRequest(p, 16, MAX_TOKENS, Sampling(temperature=TEMPERATURE))) for p in prompts])

    async def guided(sc, ch, p=params):
        s = Searcher(engine, sc)
        return await asyncio.gather(*[s.run(ch, ids, p) for ids in prompts])

    unaligned = dataclasses.replace(params, align=1)
    t0 = time.perf_counter(); await plain(); print(f"warm-up plain {time.perf_counter() - t0:.1f}s", flush=True)
    if not args.skip_real:
        t0 = time.perf_counter(); await guided(scorer, chain); print(f"warm-up CBS {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter(); await guided(scorer, head_chain)
    print(f"warm-up engine-head CBS {time.perf_counter() - t0:.1f}s", flush=True)
    for rnd in range(args.rounds):
        t0 = time.perf_counter(); outs = await plain(); tp = time.perf_counter() - t0
        ntok = sum(len(s.token_ids) for o in outs for s in o)
        line = [f"round {rnd}: plain {tp:.2f}s ({ntok} tok, {ntok/tp:.0f} tok/s)"]
        variants = [("free-scorer CBS", lambda: guided(TimedScorer(FreeScorer()), Chain()))]
        if args.align:
            variants.append(("free-scorer CBS unaligned", lambda: guided(TimedScorer(FreeScorer()), Chain(), unaligned)))
        real = TimedScorer(scorer)
        if not args.skip_real:
            variants.append(("real CBS", lambda: guided(real, chain)))
        variants.append(("engine-head CBS", lambda: guided(scorer, head_chain)))
        if args.align:
            variants.append(("engine-head CBS unaligned", lambda: guided(scorer, head_chain, unaligned)))
        for name, run in variants:
            t0 = time.perf_counter(); res = await run(); t = time.perf_counter() - t0
            line.append(f"{name} {t:.2f}s ({sum(r.completion_tokens for r in res)} tok) ratio {t/tp:.2f}")
            print(line[-1], flush=True)
        if not args.skip_real:
            line.append(f"real scorer wait {real.seconds:.1f}s over {real.calls} calls, forward busy "
                        f"{scorer.busy_seconds:.1f}s in {scorer.batches} batches")
        print(" | ".join(line), flush=True)
    scorer.close()
    engine.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-threads", default="all")
    ap.add_argument("--scorer-threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--value-layers", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine (enforce_eager=False)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="engine and value dtype (float32 on CPUs without AVX-512 bf16, where bf16 is emulated)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--skip-real", action="store_true", help="no CBS with the scorer (engine-side variants only)")
    ap.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                    help="align chunk boundaries to the KV block size (SearchParams.align)")
    asyncio.run(main(ap.parse_args()))
