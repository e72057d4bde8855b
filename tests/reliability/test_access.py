"""Access control on the shared server: the admin key is separate from the API key, value names
and versions cannot reach outside the registry (path traversal, symlinks), only safetensors
files listed in a manifest are read, bodies are size-limited, and prompts are not logged."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving
from tests.reliability.conftest import wait_until

pytestmark = pytest.mark.e2e

ADMIN_ROUTES = [("GET", "/v1/values"), ("GET", "/v1/values/demo"), ("POST", "/v1/values/demo/load"),
                ("POST", "/v1/values/demo/rollback"), ("DELETE", "/v1/values/demo")]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_routes_refuse_the_api_key(server, method, path):
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 403),
                            ({"Authorization": f"Bearer {server.api_key}"}, 403),
                            ({"Authorization": f"Basic {server.admin_key}"}, 401)):
        r = httpx.request(method, server.url + path, headers=headers, timeout=30)
        assert r.status_code == status, (headers, r.text)
        assert r.json()["error"]["type"] in ("authentication_error", "permission_error")
    # and the admin key is not an API key
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {server.admin_key}"}, timeout=30)
    assert r.status_code == 401


TRAVERSALS = ["..", "...", ".hidden", "a%2Fb", "..%2F..%2Fetc", "%2e%2e", "%2e%2e%2fvalues-escape", "a%5Cb",
              "x" * 65, "%00", "demo%00"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_value_names_cannot_leave_the_registry(server, name):
    outside = server.values_dir.parent
    before = sorted(p.name for p in outside.iterdir())
    with server.admin() as admin:
        for method, path in (("GET", f"/v1/values/{name}"), ("POST", f"/v1/values/{name}/load"),
                             ("POST", f"/v1/values/{name}/rollback"), ("DELETE", f"/v1/values/{name}")):
            r = admin.request(method, path)
            assert r.status_code in (400, 404, 405), (method, path, r.status_code, r.text)
    plain = httpx.QueryParams({"n": name}).get("n")  # the decoded name, as a JSON client would send it
    with server.http() as http:
        r = http.post("/v1/score", json={"value": plain, "prompt": "hi", "responses": ["a"]})
        assert r.status_code in (400, 404), r.text
        r = http.post("/v1/chat/completions", json={"model": server.model_id, "max_tokens": 2,
                                                    "guidance": {"value": plain},
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (400, 404), r.text
        r = http.post("/v1/chat/completions", json={"model": f"{server.model_id}+{plain}", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code in (400, 404), r.text
    assert sorted(p.name for p in outside.iterdir()) == before  # nothing created or removed outside


def test_value_versions_are_validated(server):
    with server.http() as http:
        for spec in ("demo@0", "demo@-1", "demo@1.5", "demo@../1", "demo@1@2", "demo@99999999999999999999"):
            r = http.post("/v1/score", json={"value": spec, "prompt": "hi", "responses": ["a"]})
            assert r.status_code in (400, 404), (spec, r.text)
    with server.admin() as admin:
        for version in (0, -1, 1.5, "../1", "v1"):
            r = admin.post("/v1/values/demo/load", json={"version": version})
            assert r.status_code in (400, 404), (version, r.text)


def test_symlinks_leading_outside_the_registry_are_never_loaded(server, tmp_path, request):
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.registry import Registry

    outside = Registry(tmp_path / "elsewhere")
    init_value(outside, "evil", prepare_default_model())
    good = iro_values_init(server, "linked")
    wait_serving(server, "linked", good)
    name_dir = server.values_dir / "linked"
    # (1) a whole value that is a symlink to a folder outside
    (server.values_dir / "evil").unlink(missing_ok=True)
    (server.values_dir / "evil").symlink_to(outside.root / "evil", target_is_directory=True)
    request.addfinalizer(lambda: (server.values_dir / "evil").unlink(missing_ok=True))
    # (2) a version folder that is a symlink outside, made CURRENT
    shutil.copytree(outside.root / "evil" / "v0001", tmp_path / "v-out")
    (name_dir / f"v{good + 1:04d}").symlink_to(tmp_path / "v-out", target_is_directory=True)
    # (3) a real version folder whose weight file is a symlink (to an identical file outside)
    v3 = name_dir / f".tmp-link-{good + 2}"
    shutil.copytree(name_dir / f"v{good:04d}", v3)
    manifest = json.loads((v3 / "manifest.json").read_text())
    manifest["version"], manifest["chain"] = good + 2, [{"version": good + 2, "beta": 1.0}]
    (v3 / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(v3 / "head.safetensors", tmp_path / "head.safetensors")
    (v3 / "head.safetensors").unlink()
    (v3 / "head.safetensors").symlink_to(tmp_path / "head.safetensors")
    v3.rename(name_dir / f"v{good + 2:04d}")
    (name_dir / "CURRENT.new").write_text(f"v{good + 2:04d}\n")
    (name_dir / "CURRENT.new").rename(name_dir / "CURRENT")

    def status():
        with server.admin() as admin:
            return admin.get("/v1/values/linked").json()
    st = wait_until(status, lambda s: good + 2 in [r["version"] for r in s["refused"]], timeout=15)
    assert "symlink" in {r["version"]: r["reason"] for r in st["refused"]}[good + 2]
    assert st["serving_version"] == good
    assert good + 1 not in st["versions_on_disk"]  # the escaping version folder is not a version
    with server.admin() as admin, server.http() as http:
        values = admin.get("/v1/values").json()
        assert "evil" not in [v["name"] for v in values["data"]] and values["registry_error"] is None
        assert admin.post("/v1/values/evil/load").status_code in (400, 404)
        assert admin.post("/v1/values/linked/load", json={"version": good + 1}).status_code in (400, 404)
        r = http.post("/v1/score", json={"value": f"linked@{good + 1}", "prompt": "hi", "responses": ["a"]})
        assert r.status_code in (400, 404)
        r = http.post("/v1/score", json={"value": "evil", "prompt": "hi", "responses": ["a"]})
        assert r.status_code == 404


def publish_copy(server, name: str, source: int, edit) -> int:
    """Copy `name@source` into a new version, let `edit(folder, manifest)` change it, make it CURRENT."""
    name_dir = server.values_dir / name
    version = max(int(p.name[1:]) for p in name_dir.glob("v[0-9]*")) + 1
    tmp = name_dir / f".tmp-copy-{version}"
    shutil.copytree(name_dir / f"v{source:04d}", tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"], manifest["chain"] = version, [{"version": version, "beta": 1.0}]
    edit(tmp, manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(name_dir / f"v{version:04d}")
    (name_dir / "CURRENT.new").write_text(f"v{version:04d}\n")
    (name_dir / "CURRENT.new").rename(name_dir / "CURRENT")
    return version


def test_only_safetensors_listed_in_the_manifest_are_read(server):
    from valuefn.checkpoint import sha256_file

    good = iro_values_init(server, "files")
    wait_serving(server, "files", good)

    def add_pickle(folder, manifest):  # a pickle next to the weights, listed with its hash
        (folder / "extra.pt").write_bytes(b"\x80\x04K\x01.")
        manifest["files"]["extra.pt"] = sha256_file(folder / "extra.pt")

    def escape(folder, manifest):  # a listed file outside the folder
        manifest["files"]["../CURRENT"] = "0" * 64

    def unlisted_pickle(folder, manifest):  # a stray pickle nobody lists: never opened, the version loads
        (folder / "stray.bin").write_bytes(b"\x80\x04K\x01.")

    def status():
        with server.admin() as admin:
            return admin.get("/v1/values/files").json()
    for edit in (add_pickle, escape):
        bad = publish_copy(server, "files", good, edit)
        st = wait_until(status, lambda s: bad in [r["version"] for r in s["refused"]], timeout=15)
        reason = {r["version"]: r["reason"] for r in st["refused"]}[bad]
        assert reason.startswith("bad_file") and st["serving_version"] == good, st
    fine = publish_copy(server, "files", good, unlisted_pickle)
    wait_serving(server, "files", fine)


def test_body_limit_applies_to_every_route(server):
    big = b"{" + b" " * 2_000_001 + b"}"
    with server.admin() as admin:
        r = admin.post("/v1/values/demo/load", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"]
    with server.http() as http:
        r = http.post("/v1/score", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.get("/health").status_code == 200


def test_prompts_and_answers_are_not_logged(server):
    marker = f"canary-{os.getpid()}-{time.time_ns()}"
    value = iro_values_init(server, "quiet")
    wait_serving(server, "quiet", value)
    user = [{"role": "user", "content": f"Repeat after me: {marker}"}]
    with server.http() as http:
        assert http.post("/v1/chat/completions", json={"model": server.model_id, "messages": user,
                                                       "max_tokens": 4}).status_code == 200
        guided = {"model": f"{server.model_id}+quiet", "messages": user, "max_tokens": 4,
                  "guidance": {"w": 2, "k": 2, "l": 2}}
        assert http.post("/v1/chat/completions", json=guided).status_code == 200
        with http.stream("POST", "/v1/completions", json={"model": server.model_id, "prompt": marker,
                                                          "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        scored = http.post("/v1/score", json={"value": "quiet", "prompt": marker, "responses": [marker]})
        assert scored.status_code == 200
        # refused requests too (the error message may echo the input to the client, never to the log)
        assert http.post("/v1/completions", json={"model": marker, "prompt": marker}).status_code == 404
        assert http.post("/v1/chat/completions", json={"model": server.model_id, "messages": user,
                                                       "temperature": marker}).status_code == 400
        assert http.get("/health").status_code == 200
    assert marker not in server.log_path.read_text(errors="replace")
