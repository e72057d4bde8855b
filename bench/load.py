"""Load test: many concurrent clients mixing plain, guided, streaming and cancelled requests.

    python -m bench.load --url http://127.0.0.1:8000 --api-key KEY --clients 64 --duration 300 \\
        --value demo --json bench/out/load.json

Each client loops until the duration is over, cycling through the request kinds of `--mix`
(a cancelled request is a stream the client hangs up on after its first event, or a plain
request it gives up on after a moment). The report has errors other than those cancellations,
p50/p99 latency per kind, the server's RSS after warm-up and at the end (from
`/proc/<pid>/status` with `--pid`, else `process_resident_memory_bytes` in /metrics), and
whether `iro_engine_requests_in_flight` came back to 0 once the clients stopped. The exit status
is non-zero when there were errors, the engine did not drain, or RSS grew past `--max-rss-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from common.search_settings import SearchOverrides

KINDS = ("plain", "guided", "stream", "cancel")
PROMPTS = ["Write one sentence about the sea.", "Describe a cat in a few words.", "Give me a tip for cooking rice.",
           "What makes a good friend?", "Name three colours of autumn.", "Why is the sky blue?"]


@dataclass
class LoadConfig:
    url: str
    api_key: str | None = None
    clients: int = 64
    duration: float = 300.0
    """Seconds during which clients start new requests."""
    warmup: float = 60.0
    """RSS is sampled this long after the start (the baseline for growth): long enough for the value's
    KV cache (bounded, 512 MiB per loaded version) and the allocator to reach their working size."""
    model: str | None = None
    """Base model id (default: the first model of /v1/models)."""
    value: str | None = None
    """Value for guided requests (default: the first aligned model's value); none: no guided requests."""
    mix: dict[str, int] = field(default_factory=lambda: {"plain": 3, "guided": 2, "stream": 3, "cancel": 2})
    max_tokens: int = 16
    guidance: dict = field(default_factory=lambda: SearchOverrides(w=2, k=2, l=4).given())
    """Search fields of the guided requests (`common.search_settings.SearchOverrides`)."""
    pid: int | None = None
    """Server pid for VmRSS (default: /metrics process_resident_memory_bytes)."""
    drain_timeout: float = 30.0
    request_timeout: float = 300.0


@dataclass
class LoadReport:
    clients: int
    duration: float
    requests: dict[str, int]
    cancelled: int
    errors: int
    error_samples: list[str]
    latency_p50: float | None
    latency_p99: float | None
    latency_by_kind: dict[str, dict[str, float]]
    requests_per_second: float
    rss_warm_mib: float | None
    rss_end_mib: float | None
    rss_growth_pct: float | None
    engine_drained: bool
    drain_seconds: float | None

    def summary(self) -> str:
        lat = (f"p50 {self.latency_p50:.2f} s, p99 {self.latency_p99:.2f} s" if self.latency_p50 is not None
               else "no completed request")
        rss = (f"RSS {self.rss_warm_mib:.0f} -> {self.rss_end_mib:.0f} MiB ({self.rss_growth_pct:+.1f}%)"
               if self.rss_growth_pct is not None else "RSS unknown")
        return (f"{self.clients} clients, {self.duration:.0f} s: {sum(self.requests.values())} requests "
                f"({', '.join(f'{k} {v}' for k, v in self.requests.items())}), {self.requests_per_second:.2f}/s; "
                f"errors {self.errors}, cancelled {self.cancelled}; {lat}; {rss}; engine drained: "
                f"{self.engine_drained}" + (f" in {self.drain_seconds:.1f} s" if self.drain_seconds is not None else ""))


class _Cancelled(Exception):
    pass


async def _metric(http: httpx.AsyncClient, name: str) -> float | None:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


async def server_rss_mib(http: httpx.AsyncClient, pid: int | None) -> float | None:
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None
    value = await _metric(http, "process_resident_memory_bytes")
    return value / 2**20 if value is not None else None


def _schedule(mix: dict[str, int]) -> list[str]:
    """The kinds a client cycles through, interleaved (e.g. plain, guided, stream, cancel, plain, ...)."""
    counts = dict(mix)
    out: list[str] = []
    while any(counts.values()):
        for kind in KINDS:
            if counts.get(kind, 0) > 0:
                out.append(kind)
                counts[kind] -= 1
    return out


class LoadRunner:
    def __init__(self, config: LoadConfig):
        self.config = config
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.requests: Counter = Counter()
        self.cancelled = 0
        self.errors: list[str] = []

    def _body(self, kind: str, client: int, n: int) -> dict:
        c = self.config
        body = {"model": c.model, "max_tokens": c.max_tokens, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"{PROMPTS[(client + n) % len(PROMPTS)]} ({client}.{n})"}]}
        if kind == "guided":
            body["guidance"] = {"value": c.value, **c.guidance}
        if kind in ("stream", "cancel") and n % 2 == 0:
            body["stream"] = True
        if kind == "cancel":
            body["max_tokens"] = max(c.max_tokens, 64)  # long enough to still be running when abandoned
        return body

    async def _one(self, http: httpx.AsyncClient, kind: str, body: dict) -> None:
        if body.get("stream"):
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code} {(await response.aread())[:200]!r}")
                done = False
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"error"' in line[:20]:
                        raise RuntimeError(f"error event {line[:200]}")
                    if kind == "cancel" and line.startswith("data: {"):
                        raise _Cancelled()  # hang up mid-stream
                    done = done or line == "data: [DONE]"
                if not done:
                    raise RuntimeError("stream ended without [DONE]")
            return
        if kind == "cancel":
            try:
                await asyncio.wait_for(http.post("/v1/chat/completions", json=body), timeout=0.5)
            except (asyncio.TimeoutError, TimeoutError):
                raise _Cancelled() from None
            return
        response = await http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {response.text[:200]}")
        if kind == "guided" and "guidance" not in response.json():
            raise RuntimeError("guided answer without guidance metadata")

    async def client(self, index: int, stop_at: float) -> None:
        kinds = [k for k in _schedule(self.config.mix) if k != "guided" or self.config.value]
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        async with httpx.AsyncClient(base_url=self.config.url, headers=headers,
                                     timeout=self.config.request_timeout) as http:
            n = 0
            while time.monotonic() < stop_at:
                kind = kinds[(index + n) % len(kinds)]
                start = time.monotonic()
                try:
                    await self._one(http, kind, self._body(kind, index, n))
                    self.latencies[kind].append(time.monotonic() - start)
                except _Cancelled:
                    self.cancelled += 1
                except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
                self.requests[kind] += 1
                n += 1

    async def run(self) -> LoadReport:
        c = self.config
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        async with httpx.AsyncClient(base_url=c.url, headers=headers, timeout=60) as http:
            models = [m["id"] for m in (await http.get("/v1/models")).raise_for_status().json()["data"]]
            c.model = c.model or models[0]
            if c.value is None:
                c.value = next((m.split("+", 1)[1] for m in models if m.startswith(c.model + "+")), None)
            start = time.monotonic()
            stop_at = start + c.duration
            tasks = [asyncio.create_task(self.client(i, stop_at)) for i in range(c.clients)]
            rss_warm = None
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks)), timeout=min(c.warmup, c.duration))
            except (asyncio.TimeoutError, TimeoutError):
                rss_warm = await server_rss_mib(http, c.pid)
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - start
            drain_start = time.monotonic()
            in_flight = await _metric(http, "iro_engine_requests_in_flight")
            while in_flight and time.monotonic() - drain_start < c.drain_timeout:
                await asyncio.sleep(0.2)  # the gauge is refreshed every 0.5 s by the server
                in_flight = await _metric(http, "iro_engine_requests_in_flight")
            drained = in_flight == 0
            rss_end = await server_rss_mib(http, c.pid)
        everything = [x for v in self.latencies.values() for x in v]
        pct = (lambda xs, q: float(np.percentile(xs, q)) if xs else None)
        return LoadReport(
            clients=c.clients, duration=elapsed, requests=dict(self.requests), cancelled=self.cancelled,
            errors=len(self.errors), error_samples=self.errors[:10], latency_p50=pct(everything, 50),
            latency_p99=pct(everything, 99),
            latency_by_kind={k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in self.latencies.items()},
            requests_per_second=sum(self.requests.values()) / elapsed, rss_warm_mib=rss_warm, rss_end_mib=rss_end,
            rss_growth_pct=(100 * (rss_end - rss_warm) / rss_warm) if rss_warm and rss_end else None,
            engine_drained=drained, drain_seconds=time.monotonic() - drain_start if drained else None)


def run_load(config: LoadConfig) -> LoadReport:
    return asyncio.run(LoadRunner(config).run())


def _mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
        mix[kind.strip()] = int(weight or 1)
    return mix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="seconds")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline RSS sample")
    p.add_argument("--model", help="base model id (default: the first of /v1/models)")
    p.add_argument("--value", help="value for guided requests (default: the first aligned model's)")
    p.add_argument("--mix", type=_mix, default="plain=3,guided=2,stream=3,cancel=2", help="kind=weight,...")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--pid", type=int, help="server pid, to read VmRSS from /proc (default: /metrics)")
    p.add_argument("--max-rss-growth", type=float, help="fail when RSS grows more than this many percent")
    p.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args(argv)
    mix = a.mix if isinstance(a.mix, dict) else _mix(a.mix)
    report = run_load(LoadConfig(url=a.url.rstrip("/"), api_key=a.api_key, clients=a.clients, duration=a.duration,
                                 warmup=a.warmup, model=a.model, value=a.value, mix=mix, max_tokens=a.max_tokens,
                                 pid=a.pid))
    print(report.summary())
    for sample in report.error_samples:
        print("  error:", sample)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(asdict(report), indent=2))
    rss_bad = a.max_rss_growth is not None and (report.rss_growth_pct is None or report.rss_growth_pct > a.max_rss_growth)
    return 1 if report.errors or not report.engine_drained or rss_bad else 0


if __name__ == "__main__":
    sys.exit(main())
