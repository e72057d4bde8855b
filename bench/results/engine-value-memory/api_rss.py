import json, time, tempfile, psutil, httpx
from pathlib import Path
from bench.server import start
from common.model_store import prepare_default_model
from common.engine_args import default_value_layers
from valuefn.loader import init_value
from valuefn.model import ValueModelConfig
from valuefn.registry import Registry

if __name__ == "__main__":
    mp = prepare_default_model()
    work = Path(tempfile.mkdtemp())
    srv = start(work, args=["--enforce-eager"], wait=900)
    try:
        api = psutil.Process(srv.proc.pid)
        rss = lambda: api.memory_info().rss / 2**20
        r0 = rss()
        v = init_value(Registry(srv.values_dir), "m", mp, ValueModelConfig.for_engine_value(feature_layers=[2, 15, 27]))
        with httpx.Client(base_url=srv.url, timeout=600) as h:
            while True:
                d = {x["name"]: x for x in h.get("/v1/values").json()["data"]}
                if d.get("m", {}).get("serving_version") == v: break
                time.sleep(0.1)
            model = h.get("/v1/models").json()["data"][0]["id"]
            r = h.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "guidance": {"value": "m", "w": 2, "k": 2, "l": 8}})
            assert r.status_code == 200, r.text
            r1 = rss()
            s = h.post("/v1/score", json={"value": "m", "prompt": "Hi", "responses": ["Hello there"]})
            assert s.status_code == 200, s.text
            r2 = rss()
        print(json.dumps({"api_rss_mib_start": round(r0), "after_engine_value_served_and_guided": round(r1), "after_v1_score_built_backbone": round(r2)}))
    finally:
        srv.stop()
