"""Scale-out on Ray Serve, measured on this machine (docs/scale-out.md):

    python -m bench.scale_out --out bench/results/scale-out/<name>.json

1. `iro serve --replicas 2` (one local Ray, Ray Serve's proxy, 2 engines) with value `swap` v1;
   `clients` guided clients (our AsyncIroClient: retries on connection errors, 429 and 503) run
   through the proxy for the whole measurement.
2. publish v2 -> seconds until every replica reports v2 in `GET /v1/values`' `replicas`.
3. SIGKILL one replica process while both hold guided requests (`--max-ongoing` per replica
   spreads the one value's load over both) -> seconds until Ray Serve's replacement reports the
   current version; failed requests the clients saw (the proxy answers a request lost with its
   replica as a retryable 503, which our client retries).
4. with `--registry s3`: the object store stopped for `--outage` seconds and restarted ->
   `/health` through the proxy (degraded, then ok) and failed requests.
5. throughput: guided requests/s for `--seconds` with 2 replicas, then with one `iro serve`
   (no Ray) on the same engine settings.
6. with `--loop-iterations N`: `iro loop --preset smoke` against the proxy, its values published
   to the same registry (`--values-dir s3://...`); how its requests spread over the replicas (each
   replica's request counters in the proxy's `/metrics`) and which version each replica serves.

The registry is a local folder both replicas read, or (`--registry s3`) a bucket on moto's S3
server in this process (`bench.moto_s3`), CURRENT polled every second (the registry's default).
Ray's memory monitor is off (`RAY_memory_monitor_refresh_ms=0`): on a machine shared with other
work it killed replicas for memory other processes used. Helpers here are shared by
tests/e2e/test_ray_serve_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import httpx

from bench import server as bench_server

API_KEY, ADMIN_KEY = "scale-key", "scale-admin"
SMALL_ENGINE = {"IRO_KV_CACHE_GIB": "1", "IRO_MAX_NUM_BATCHED_TOKENS": "256", "IRO_ENFORCE_EAGER": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_monitor_refresh_ms": "0"}
"""Engine settings small enough for two engines on a 2-core machine (as tests/conftest.py's server)."""
GUIDANCE = {"w": 2, "k": 2, "l": 4}
REPLICA_TITLE = "ServeReplica:iro:IroReplica"


def start_replicas(workdir: Path, replicas: int, *, env: dict | None = None, wait: float = 900):
    """`iro serve --replicas N` in a subprocess (its own session); returns once /health is 200."""
    full = {"IRO_API_KEY": API_KEY, "IRO_ADMIN_KEY": ADMIN_KEY, "RAY_DEDUP_LOGS": "0", **SMALL_ENGINE, **(env or {})}
    args = ["--replicas", str(replicas)] if replicas > 1 else []
    return bench_server.start(workdir, env=full, args=args, wait=wait, cwd=Path(__file__).resolve().parents[1])


def stop(srv) -> None:
    """Stop `iro serve` (SIGTERM: it shuts Ray down), then end whatever Ray process of its session
    outlived it (Ray's agents do when the raylet dies first, e.g. killed for memory)."""
    srv.stop()
    session = srv.proc.pid  # started with start_new_session: the session id is its pid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) == session:
                os.kill(int(proc.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def publish(location, name: str) -> int:
    """A new untrained version of `name` (as `iro values init`) in a folder or `s3://bucket/prefix`."""
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.registry import Registry, open_registry

    return init_value(open_registry(str(location), Registry, create=True), name, prepare_default_model())


def s3_registry() -> tuple[object, str, dict]:
    """moto's S3 server in this process, a bucket, and the environment that reaches it (the
    standard AWS settings): for the server, and for this process to publish (the caller sets it)."""
    import boto3

    from bench.moto_s3 import start_endpoint

    endpoint = start_endpoint()
    env = {"AWS_ENDPOINT_URL": endpoint.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="iro-scale-out")
    return endpoint, "s3://iro-scale-out/values", env


def health(url: str) -> tuple[int, str | None]:
    try:
        r = httpx.get(url + "/health", timeout=10)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    return r.status_code, (r.json().get("status") if r.status_code == 200 else r.text[:100])


def replicas_serving(url: str, name: str) -> dict[str, int | None]:
    """replica -> the version of `name` it serves, from `GET /v1/values` through the proxy."""
    r = httpx.get(url + "/v1/values", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    r.raise_for_status()
    return {rep["replica"]: rep["values"].get(name) for rep in r.json().get("replicas") or []}


def wait_replicas(url: str, name: str, version: int, count: int, *, timeout: float = 600,
                  exclude: set[str] = frozenset()) -> tuple[float, dict]:
    """Seconds until `count` replicas (none of `exclude`) report `name` at `version`."""
    t0 = time.monotonic()
    seen = {}
    while time.monotonic() - t0 < timeout:
        try:
            seen = replicas_serving(url, name)
        except httpx.HTTPError:
            seen = {}
        if sum(1 for rep, v in seen.items() if v == version and rep not in exclude) >= count:
            return time.monotonic() - t0, seen
        time.sleep(0.1)  # polling the replicas' reports with a deadline
    raise AssertionError(f"{count} replicas serving {name}@{version} not seen in {timeout}s: {seen}")


class GuidedLoad:
    """`clients` concurrent guided chat requests through the proxy until `stop()`; counts answers,
    failures (after our client's retries) and the value versions that answered."""

    def __init__(self, url: str, model: str, clients: int, *, max_tokens: int = 8):
        self.url, self.model, self.clients, self.max_tokens = url, model, clients, max_tokens
        self.ok, self.failures, self.versions = 0, [], set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _client(self, i: int) -> None:
        from clients import AsyncIroClient
        from clients.errors import IroClientError

        async with AsyncIroClient(self.url + "/v1", api_key=API_KEY, timeout=300, max_retries=4) as client:
            n = 0
            while not self._stop.is_set():
                try:
                    answer = await client.chat([{"role": "user", "content": f"Say something {i}-{n}"}],
                                               model=self.model, guidance=GUIDANCE, max_tokens=self.max_tokens)
                    self.ok += 1
                    self.versions.add(tuple(answer.guidance.versions))
                except IroClientError as exc:
                    self.failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                n += 1

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def replica_metrics(url: str) -> dict[str, dict[str, float]]:
    """replica -> guided/plain chat requests answered so far and requests in flight, from the
    proxy's `/metrics` (every replica's, labelled `replica`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            replica = sample.labels.get("replica")
            if replica is None:
                continue
            row = out.setdefault(replica, {"chat_requests": 0.0, "in_flight": 0.0})
            if sample.name == "iro_requests_total" and sample.labels.get("endpoint") == "/v1/chat/completions":
                row["chat_requests"] += sample.value
            elif sample.name == "iro_requests_in_flight":
                row["in_flight"] = sample.value
    return out


def served_at(log_path: Path, name: str, version: int) -> dict[int, float]:
    """replica process id -> when it started serving `name` v`version` (Unix time), from the
    replicas' `serving value NAME vN` log lines: the swap as the replica saw it, unlike an admin
    request through the proxy, which queues behind the guided requests of a full replica."""
    import datetime
    import re

    line = re.compile(r"pid=(\d+)\).*?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO server\.registry_manager: "
                      rf"serving value {re.escape(name)} v{version}\b")
    seen = {}
    for text in log_path.read_text(errors="replace").splitlines():
        match = line.search(text)
        if match:
            stamp = datetime.datetime.strptime(match.group(2), "%Y-%m-%d %H:%M:%S,%f").astimezone()
            seen.setdefault(int(match.group(1)), stamp.timestamp())
    return seen


def replica_pids(root_pid: int) -> list[int]:
    """Pids of the Ray Serve replica processes under `iro serve --replicas` (by process title)."""
    out = []
    for pid in bench_server._descendants(root_pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if REPLICA_TITLE in title:
            out.append(pid)
    return out


async def _throughput(url: str, model: str, clients: int, seconds: float) -> dict:
    load = GuidedLoad(url, model, clients)
    load.start()
    await asyncio.sleep(seconds)  # the measurement window
    ok_before = load.ok
    await load.stop()
    return {"requests_per_s": round(ok_before / seconds, 3), "answered": ok_before, "failed": len(load.failures)}


def run(out: Path, *, clients: int, seconds: float, registry: str = "local", outage: float = 30.0,
        max_ongoing: int = 8, loop_iterations: int = 0) -> dict:
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="scale-out-"))
    result = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_before": os.getloadavg()},
              "command": f"python -m bench.scale_out --registry {registry} --clients {clients} --seconds {seconds:g} "
                         f"--outage {outage:g} --max-ongoing {max_ongoing} --loop-iterations {loop_iterations}",
              "clients": clients, "guidance": GUIDANCE, "max_tokens": 8, "replica_max_ongoing_requests": max_ongoing}
    endpoint, env = None, {"IRO_REPLICA_MAX_ONGOING_REQUESTS": str(max_ongoing)}
    if registry == "s3":
        endpoint, location, s3_env = s3_registry()
        os.environ.update(s3_env)  # publishing from here
        env = {**env, **s3_env, "IRO_VALUES_DIR": location}
        result["registry"] = "S3 API: moto's server in the bench process (bench.moto_s3), CURRENT polled every 1 s"
    else:
        location = work / "values"
        location.mkdir(parents=True)
        result["registry"] = "a local folder both replicas read (watchfiles: no poll interval)"
    v1 = publish(location, "swap")
    t0 = time.monotonic()
    srv = start_replicas(work, 2, env=env)
    result["start_2_replicas_s"] = round(time.monotonic() - t0, 1)
    try:
        model = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
        model = f"{model.split('+')[0]}+swap"
        wait_replicas(srv.url, "swap", v1, 2)

        async def measure():
            load = GuidedLoad(srv.url, model, clients)
            load.start()
            await asyncio.sleep(5)  # load builds up before the publish
            v2 = await asyncio.to_thread(publish, location, "swap")
            published = time.time()
            swap_s, _ = await asyncio.to_thread(wait_replicas, srv.url, "swap", v2, 2)
            swapped, t_logs = served_at(srv.log_path, "swap", v2), time.monotonic()
            while len(swapped) < 2 and time.monotonic() - t_logs < 30:  # Ray streams replica logs with a delay
                await asyncio.sleep(0.5)
                swapped = served_at(srv.log_path, "swap", v2)
            result["publish_to_each_replica_serves_v2_s"] = sorted(round(t - published, 2) for t in swapped.values())
            result["publish_to_every_replica_serves_v2_seen_through_the_proxy_s"] = round(swap_s, 2)
            result["publish_failed_requests"] = len(load.failures)
            result["publish_versions_answered"] = sorted(load.versions)
            # a replica killed under the same load, once both hold requests
            before = set(replicas_serving(srv.url, "swap"))
            t_busy = time.monotonic()
            while True:
                spread = await asyncio.to_thread(replica_metrics, srv.url)
                if len(spread) == 2 and min(r["in_flight"] for r in spread.values()) > 0 or time.monotonic() - t_busy > 60:
                    break
                await asyncio.sleep(0.2)
            result["in_flight_per_replica_at_kill"] = sorted(r["in_flight"] for r in spread.values())
            result["chat_requests_per_replica_before_kill"] = sorted(r["chat_requests"] for r in spread.values())
            victim = replica_pids(srv.proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            back_s, _ = await asyncio.to_thread(wait_replicas, srv.url, "swap", v2, 1, exclude=before)
            result["replica_killed_until_replacement_serves_s"] = round(back_s, 1)
            result["replica_killed_failed_requests"] = len(load.failures) - result["publish_failed_requests"]
            if endpoint is not None:  # the store stopped for `outage` s, then back
                failed = len(load.failures)
                endpoint.stop()
                stopped, seen = time.monotonic(), []
                while time.monotonic() - stopped < outage:
                    state = await asyncio.to_thread(health, srv.url)
                    if not seen or seen[-1][1:] != state:
                        seen.append((round(time.monotonic() - stopped, 1), *state))
                    await asyncio.sleep(0.5)
                endpoint.start()
                restarted = time.monotonic()
                while (state := await asyncio.to_thread(health, srv.url)) != (200, "ok"):
                    if seen[-1][1:] != state:
                        seen.append((round(time.monotonic() - stopped, 1), *state))
                    if time.monotonic() - restarted > 120:
                        break
                    await asyncio.sleep(0.5)
                seen.append((round(time.monotonic() - stopped, 1), *state))
                result["store_outage_s"] = outage
                result["store_outage_health"] = seen
                result["store_outage_ok_again_after_restart_s"] = round(time.monotonic() - restarted, 1)
                result["store_outage_failed_requests"] = len(load.failures) - failed
            result["failures"] = load.failures[:20]
            await load.stop()
            result["answered_during_publish_kill_outage"] = load.ok
            spread = await asyncio.to_thread(replica_metrics, srv.url)
            result["throughput_2_replicas"] = await _throughput(srv.url, model, clients, seconds)
            after = await asyncio.to_thread(replica_metrics, srv.url)
            result["throughput_2_replicas"]["chat_requests_per_replica"] = sorted(
                after[r]["chat_requests"] - spread.get(r, {}).get("chat_requests", 0.0) for r in after)

        asyncio.run(measure())
        if loop_iterations:
            result["loop"] = _loop(srv.url, location, env, work, loop_iterations)
    finally:
        stop(srv)
    srv1 = start_replicas(work / "one", 1, env={**env, "IRO_VALUES_DIR": str(location)})
    try:
        model1 = f"{httpx.get(srv1.url + '/v1/models', headers={'Authorization': f'Bearer {API_KEY}'}).json()['data'][0]['id']}+swap"
        result["throughput_1_server"] = asyncio.run(_throughput(srv1.url, model1, clients, seconds))
    finally:
        stop(srv1)
        if endpoint is not None:
            endpoint.stop()
    result["machine"]["load_average_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _loop(url: str, location, env: dict, work: Path, iterations: int) -> dict:
    """`iro loop --preset smoke` against the proxy, publishing to `location`; its requests per replica."""
    before = replica_metrics(url)
    command = [str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "iro"), "loop", "--task", "review-sentiment",
               "--preset", "smoke", "--iterations", str(iterations), "--name", "loopv", "--server", url,
               "--values-dir", str(location), "--run-dir", str(work / "loop"), "--no-progress"]
    t0 = time.monotonic()
    done = subprocess.run(command, env={**os.environ, **env, "IRO_API_KEY": API_KEY, "IRO_ADMIN_KEY": ADMIN_KEY},
                          capture_output=True, text=True)
    after = replica_metrics(url)
    served = replicas_serving(url, "loopv")
    return {"command": " ".join(["iro", *command[1:]]), "exit_code": done.returncode,
            "wall_s": round(time.monotonic() - t0, 1), "output_tail": (done.stdout + done.stderr)[-1500:],
            "chat_requests_per_replica": {r: after[r]["chat_requests"] - before.get(r, {}).get("chat_requests", 0.0)
                                          for r in after},
            "loopv_version_per_replica": served}


def _cpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].splitlines()[0].strip()
    except (OSError, IndexError):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale-out/moto-2-replicas.json"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--registry", choices=["local", "s3"], default="s3")
    parser.add_argument("--outage", type=float, default=30.0, help="Seconds the object store is stopped (s3).")
    parser.add_argument("--max-ongoing", type=int, default=8, help="Requests one replica takes at once "
                        "(replica_max_ongoing_requests): below the clients, so the one value spreads over both.")
    parser.add_argument("--loop-iterations", type=int, default=0, help="Then run `iro loop --preset smoke` this many "
                        "iterations against the proxy (0: skip).")
    args = parser.parse_args()
    print(json.dumps(run(args.out, clients=args.clients, seconds=args.seconds, registry=args.registry,
                         outage=args.outage, max_ongoing=args.max_ongoing, loop_iterations=args.loop_iterations),
                     indent=2))


if __name__ == "__main__":
    main()
