"""The object-store registry measured against moto's S3 server in this process:

- two publishers racing, `--each` publishes each: distinct versions, lost claims, duration;
- publish latency (claim, files, manifest, CURRENT) of a `--mib` MiB adapter, sequentially;
- poll-detect latency: from a publish returning (CURRENT written) to a reader's `watch` calling
  its reconcile with the new CURRENT, at each `--poll` interval.

    python -m bench.registry_s3 --out bench/results/s3-registry/moto.json

The numbers include moto (Python, same process, GIL shared with the clients); a real S3 endpoint
adds network round trips and removes moto's CPU from this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _publish(registry, name: str, payload: bytes) -> int:
    from common.hashing import sha256_file
    from registry.policies import ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_FORMAT_VERSION

    def write(d: Path) -> dict[str, str]:
        (d / ADAPTER_WEIGHTS).write_bytes(payload)
        (d / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        return {f: sha256_file(d / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": {}, "method": "apa",
                "lora_rank": 4, "training": {"tag": payload[:32].hex()}}
    return registry.publish(name, write, manifest)


def race(bucket: str, work: Path, each: int) -> dict:
    from registry import open_registry
    from registry.policies import PolicyRegistry

    pubs = [open_registry(f"s3://{bucket}/race", PolicyRegistry, cache_dir=work / f"pub{i}") for i in range(2)]
    got: list[list[tuple[int, bytes]]] = [[], []]
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        for n in range(each):
            payload = f"publisher {i} #{n} {uuid.uuid4()}".encode()
            got[i].append((_publish(pubs[i], "p", payload), payload))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    reader = open_registry(f"s3://{bucket}/race", PolicyRegistry, cache_dir=work / "reader")
    versions = [v for g in got for v, _ in g]
    intact = all((reader.path("p", v) / "adapter_model.safetensors").read_bytes() == payload for g in got for v, payload in g)
    claims = [k["Key"] for k in reader.store.client.list_objects_v2(Bucket=bucket, Prefix="race/p/").get("Contents", [])
              if k["Key"].endswith("/.claim")]
    return {"publishers": 2, "each": each, "versions_returned": len(versions), "distinct": len(set(versions)),
            "listed_by_a_reader": len(reader.versions("p")), "every_version_holds_its_publishers_bytes": intact,
            "claims": len(claims), "current": reader.current("p"), "seconds": round(seconds, 2),
            "per_publisher": [[v for v, _ in g] for g in got]}


def publish_latency(bucket: str, work: Path, n: int, mib: float) -> dict:
    from registry import open_registry
    from registry.policies import PolicyRegistry

    reg = open_registry(f"s3://{bucket}/latency", PolicyRegistry, cache_dir=work / "lat")
    payload = os.urandom(int(mib * (1 << 20)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _publish(reg, "p", payload)
        times.append(time.perf_counter() - t0)
    reader = open_registry(f"s3://{bucket}/latency", PolicyRegistry, cache_dir=work / "lat-reader")
    loads = []
    for v in reader.versions("p")[:5]:
        t0 = time.perf_counter()
        reader.path("p", v)  # download + sha256 check + atomic rename
        loads.append(time.perf_counter() - t0)
    return {"n": n, "adapter_mib": mib, "publish_s_median": round(statistics.median(times), 4),
            "publish_s_max": round(max(times), 4), "first_read_s_median": round(statistics.median(loads), 4)}


async def poll_detect(bucket: str, work: Path, interval: float, n: int) -> dict:
    from registry import open_registry
    from registry.policies import PolicyRegistry

    prefix = f"poll-{str(interval).replace('.', '_')}"
    writer = open_registry(f"s3://{bucket}/{prefix}", PolicyRegistry, cache_dir=work / f"{prefix}-w")
    reader = open_registry(f"s3://{bucket}/{prefix}", PolicyRegistry, cache_dir=work / f"{prefix}-r",
                           poll_interval=interval)
    await asyncio.to_thread(_publish, writer, "p", b"v1")
    seen: dict[int, float] = {}
    stop = asyncio.Event()

    async def reconcile():
        current = await asyncio.to_thread(reader.current, "p")
        seen.setdefault(current, time.perf_counter())

    task = asyncio.create_task(reader.watch(reconcile, stop))
    while 1 not in seen:
        await asyncio.sleep(0.01)
    delays = []
    for _ in range(n):
        await asyncio.sleep(interval * 0.37)  # publish at varying points of the poll cycle
        version = await asyncio.to_thread(_publish, writer, "p", os.urandom(64))
        published = time.perf_counter()
        while version not in seen:
            await asyncio.sleep(0.005)
        delays.append(seen[version] - published)
    stop.set()
    await task
    return {"poll_interval_s": interval, "n": n, "detect_s_median": round(statistics.median(delays), 3),
            "detect_s_max": round(max(delays), 3), "detect_s_min": round(min(delays), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--each", type=int, default=20)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--poll", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--detections", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from bench.moto_s3 import start_endpoint
    from registry.s3 import make_client

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    endpoint = start_endpoint()
    os.environ["AWS_ENDPOINT_URL"] = endpoint.url
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    make_client().create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"cpu": _cpu(), "cores": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                  "store": "moto ThreadedMotoServer (in process)", "race": race(bucket, work, args.each),
                  "publish": publish_latency(bucket, work, args.publishes, args.mib),
                  "poll_detect": [asyncio.run(poll_detect(bucket, work, p, args.detections)) for p in args.poll],
                  "load_avg_at_end": os.getloadavg()}
    endpoint.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
