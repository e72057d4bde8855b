"""Value registry + hot-swap through the real server: publish under load, admin, refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving

pytestmark = pytest.mark.e2e

GUIDED = {"w": 2, "k": 2, "l": 4}


def status(server, name):
    with server.admin() as admin:
        return {v["name"]: v for v in admin.get("/v1/values").json()["data"]}.get(name)


def test_publish_while_clients_request_zero_failures_and_fast_swap(server):
    v1 = iro_values_init(server, "swap")
    wait_serving(server, "swap", v1)
    failures, versions_seen = [], set()
    stop = asyncio.Event()

    async def client(i):
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     headers={"Authorization": f"Bearer {server.api_key}"}) as http:
            n = 0
            while not stop.is_set() or n < 2:
                if i % 2:
                    r = await http.post("/v1/chat/completions", json={
                        "model": f"{server.model_id}+swap", "max_tokens": 8, "guidance": GUIDED,
                        "messages": [{"role": "user", "content": f"Say something {i}-{n}"}]})
                    if r.status_code == 200:
                        versions_seen.add(tuple(r.json()["guidance"]["versions"]))
                else:
                    r = await http.post("/v1/score", json={"value": "swap", "prompt": f"p{i}", "responses": ["a", "b"]})
                    if r.status_code == 200:
                        versions_seen.add(tuple(r.json()["versions"]))
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:200]))
                n += 1

    async def main():
        tasks = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(1.0)  # let the load build up before publishing
        v2 = await asyncio.to_thread(iro_values_init, server, "swap")
        published = time.monotonic()
        swap_seconds = await asyncio.to_thread(wait_serving, server, "swap", v2, 60.0)
        # keep the load on until a request is answered by the new version
        deadline = time.monotonic() + 60
        while (v2,) not in versions_seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        return v2, swap_seconds, time.monotonic() - published

    v2, swap_seconds, _ = asyncio.run(main())
    assert failures == []
    assert swap_seconds < 60  # served at all, under load (how fast: bench/, hot_swap_seconds)
    assert {(v1,), (v2,)} <= versions_seen


def test_admin_load_pin_rollback_unload(server):
    v1 = iro_values_init(server, "adm")
    v2 = iro_values_init(server, "adm")
    wait_serving(server, "adm", v2)
    with server.admin() as admin, server.http() as user:
        # the API key alone is not enough for admin routes
        assert user.get("/v1/values").status_code in (401, 403)
        assert user.post("/v1/values/adm/rollback").status_code in (401, 403)
        r = admin.post("/v1/values/adm/load", json={"version": v1})
        assert r.status_code == 200 and r.json()["serving_version"] == v1 and r.json()["pinned"]
        r = admin.post("/v1/values/adm/load", json={"version": 999})
        assert r.status_code == 404 and r.json()["error"]["message"]
        r = admin.post("/v1/values/adm/load", json={})  # CURRENT again, unpinned
        assert r.status_code == 200 and r.json()["serving_version"] == v2 and not r.json()["pinned"]
        r = admin.post("/v1/values/adm/rollback")
        assert r.status_code == 200 and r.json()["serving_version"] == v1 and r.json()["current_on_disk"] == v1
        on_disk = disk_state(server.values_dir / "adm")
        assert admin.delete("/v1/values/adm").status_code == 200
        assert disk_state(server.values_dir / "adm") == on_disk  # DELETE unloads; the registry is untouched
        assert f"{server.model_id}+adm" not in [m["id"] for m in user.get("/v1/models").json()["data"]]
        r = user.post("/v1/chat/completions", json={"model": f"{server.model_id}+adm", "max_tokens": 4,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
        assert admin.post("/v1/values/adm/load").status_code == 200
        assert admin.post("/v1/values/..%2Fetc/load").status_code in (400, 404)


def disk_state(folder) -> dict[str, bytes]:
    """Every file under a value's folder with its bytes (versions, manifests, CURRENT)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_pin_is_released_when_current_changes(server):
    v1 = iro_values_init(server, "pin")
    v2 = iro_values_init(server, "pin")
    wait_serving(server, "pin", v2)
    with server.admin() as admin:
        r = admin.post("/v1/values/pin/load", json={"version": v1})
        assert r.status_code == 200 and r.json()["serving_version"] == v1 and r.json()["pinned"]
        assert status(server, "pin")["serving_version"] == v1  # CURRENT is still v2: the pin holds
    v3 = iro_values_init(server, "pin")  # CURRENT changes: the watcher serves it and forgets the pin
    wait_serving(server, "pin", v3)
    st = status(server, "pin")
    assert st["current_on_disk"] == v3 and not st["pinned"]


def corrupt_copy(server, name, src: int, dst: int, damage: str) -> None:
    d = server.values_dir / name
    tmp = d / f".tmp-test-{dst}"
    shutil.copytree(d / f"v{src:04d}", tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = dst
    manifest["chain"] = [{"version": dst, "beta": 1.0}]
    if damage == "flip_byte":
        data = bytearray((tmp / "adapter.safetensors").read_bytes())
        data[len(data) // 3] ^= 0x55
        (tmp / "adapter.safetensors").write_bytes(bytes(data))
    elif damage == "missing_file":
        (tmp / "head.safetensors").unlink()
    elif damage == "other_backbone":
        manifest["backbone"]["config_sha256"] = "0" * 64
    elif damage == "future_format":
        manifest["format_version"] = 1000
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(d / f"v{dst:04d}")
    (d / "CURRENT.tmp").write_text(f"v{dst:04d}\n")
    (d / "CURRENT.tmp").rename(d / "CURRENT")


@pytest.mark.parametrize("damage", ["flip_byte", "missing_file", "other_backbone", "future_format"])
def test_bad_version_is_refused_and_the_old_one_keeps_serving(server, damage):
    name = f"bad-{damage.replace('_', '-')}"
    good = iro_values_init(server, name)
    wait_serving(server, name, good)
    corrupt_copy(server, name, good, good + 1, damage)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = status(server, name)
        if st["refused"]:
            break
        time.sleep(0.05)
    assert [r["version"] for r in st["refused"]] == [good + 1]
    expected = {"flip_byte": "hash_mismatch", "missing_file": "missing_file", "other_backbone": "backbone_mismatch",
                "future_format": "future_format"}[damage]
    assert st["refused"][0]["reason"].startswith(expected)
    assert st["serving_version"] == good
    assert expected in server.log_path.read_text(errors="replace")  # the reason is logged
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": f"{server.model_id}+{name}", "max_tokens": 4,
                                                    "guidance": GUIDED, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["guidance"]["versions"] == [good]
        r = http.post("/v1/chat/completions", json={"model": server.model_id, "max_tokens": 4,  # asked for by name
                                                    "guidance": {**GUIDED, "value": f"{name}@{good + 1}"},
                                                    "messages": [{"role": "user", "content": "hi"}]})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "value_refused" and error["param"] == "guidance.value"
        assert expected in error["message"]
    # the next good publish is picked up
    fixed = iro_values_init(server, name)
    wait_serving(server, name, fixed)
