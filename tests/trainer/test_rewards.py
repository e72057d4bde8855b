"""Reward plug-ins: built-ins, hf: (tiny random classifiers), python:, http: (a real local server), sums."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer.rewards import (
    HFRewardModel, HTTPReward, Reward, RewardError, label_records, length, parse_reward, record_prompt, sentiment,
)

from .conftest import build_tiny_llama

PROMPTS = ["Review the film.", "Review the film.", "Continue:"]
RESPONSES = ["An absolutely wonderful, joyful film!", "A boring, dreadful mess.", "It is a film"]


# --------------------------------------------------------------------------- built-ins
def test_sentiment_orders_positive_above_negative_and_stays_in_range():
    scores = sentiment(PROMPTS, RESPONSES)
    assert scores[0] > 0.5 > -0.5 > scores[1]
    assert all(-1 <= s <= 1 for s in scores)
    assert parse_reward("sentiment")(PROMPTS, RESPONSES) == scores


def test_length_counts_words_and_caps():
    assert length(["", "", ""], ["a b c d", "", " ".join(["w"] * 80)]) == [4 / 50, 0.0, 1.0]
    assert parse_reward("length:8")(["p"], ["a b c d"]) == [0.5]


# --------------------------------------------------------------------------- python:
def test_python_reward_from_module_and_from_file(tmp_path):
    assert parse_reward("python:trainer.rewards:length")(["p"], ["a b"]) == [2 / 50]
    file = tmp_path / "my_reward.py"
    file.write_text("def score(prompts, responses):\n    return [len(p) + len(r) for p, r in zip(prompts, responses)]\n")
    assert parse_reward(f"python:{file}:score")(["ab", "c"], ["d", ""]) == [3.0, 1.0]


@pytest.mark.parametrize("body, message", [
    ("def score(p, r):\n    return [1.0]\n", "returned 1 scores for 2"),
    ("def score(p, r):\n    return [float('nan')] * len(p)\n", "non-finite"),
    ("def score(p, r):\n    return None\n", "not a list of numbers"),
    ("def score(p, r):\n    return ['high'] * len(p)\n", "not a list of numbers"),
])
def test_rewards_that_break_the_contract_fail_clearly(tmp_path, body, message):
    file = tmp_path / "bad_reward.py"
    file.write_text(body)
    with pytest.raises(RewardError, match=message):
        parse_reward(f"python:{file}:score")(["a", "b"], ["c", "d"])


# --------------------------------------------------------------------------- specs and sums
def test_weighted_sum_matches_the_parts():
    combined = parse_reward("0.8*sentiment+0.2*length")(PROMPTS, RESPONSES)
    expected = [0.8 * s + 0.2 * n for s, n in zip(sentiment(PROMPTS, RESPONSES), length(PROMPTS, RESPONSES))]
    assert combined == pytest.approx(expected)
    assert parse_reward("sentiment + -1*length:4")(["p"], ["good good"]) == pytest.approx([sentiment([""], ["good good"])[0] - 0.5])
    assert parse_reward("2*length:4")(["p"], ["a"]) == [0.5]
    assert parse_reward(" 1e-1 * length:1 ")(["p"], ["a"]) == [pytest.approx(0.1)]


def test_plus_inside_an_url_does_not_split_the_spec():
    reward = parse_reward("http:http://127.0.0.1:9/score+v2")
    assert reward.fn.url == "http://127.0.0.1:9/score+v2"
    assert parse_reward("https://grader.example/score").fn.url == "https://grader.example/score"


@pytest.mark.parametrize("spec, message", [
    ("", "empty reward spec"),
    ("vibes", "unknown reward 'vibes'"),
    ("sentiment:3", "takes no argument"),
    ("length:x", "length:N"),
    ("hf", "needs path"),
    ("hf:/does/not/exist", "no config.json"),
    ("python:nomodule_xyz:fn", "cannot import"),
    ("python:trainer.rewards:nothing_here", "no callable"),
    ("python:justone", "MODULE:FUNCTION"),
    ("http:ftp://grader", "http:// or https://"),
    ("0.5*", "unknown reward"),
    ("sentiment+", "unknown reward"),
])
def test_bad_specs_are_refused_with_a_clear_error(spec, message):
    with pytest.raises(RewardError, match=message):
        parse_reward(spec)


# --------------------------------------------------------------------------- labelling
def test_label_records_uses_the_user_message_and_the_response():
    records = [
        {"id": "a:0", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "one two"}], "response": "a b c"},
        {"id": "b:0", "prompt": "raw prompt", "response": ""},
        {"id": "c:0", "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}], "response": "a"},
    ]
    assert [record_prompt(r) for r in records] == ["one two", "raw prompt", "parts"]
    seen = []

    def spy(prompts, responses):
        seen.append((prompts, responses))
        return [float(len(r)) for r in responses]

    out = label_records(records, Reward("spy", spy), batch_size=2)
    assert [r["reward"] for r in out] == [5.0, 0.0, 1.0]
    assert seen[0] == (["one two", "raw prompt"], ["a b c", ""]) and len(seen) == 2
    assert "reward" not in records[0] and out[0]["id"] == "a:0"


# --------------------------------------------------------------------------- http:
class _Grader(BaseHTTPRequestHandler):
    script: list = []  # statuses to answer with before succeeding
    calls: list = []
    delay = 0.0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        time.sleep(type(self).delay)
        status = type(self).script.pop(0) if type(self).script else 200
        payload = {"scores": [float(len(r)) for r in body["responses"]]} if status == 200 else {"error": "busy"}
        if status == 299:  # a malformed success
            status, payload = 200, {"nope": 1}
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def grader():
    _Grader.script, _Grader.calls, _Grader.delay = [], [], 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Grader)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_reward_posts_batches_and_reads_scores(grader):
    reward = HTTPReward(grader, batch_size=2)
    assert reward(["p1", "p2", "p3"], ["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]
    assert _Grader.calls == [{"prompts": ["p1", "p2"], "responses": ["a", "bb"]}, {"prompts": ["p3"], "responses": ["ccc"]}]
    assert parse_reward(f"http:{grader}")(["p"], ["abcd"]) == [4.0]
    reward.close()


def test_http_reward_retries_busy_servers_with_backoff(grader):
    _Grader.script = [503, 429]
    reward = HTTPReward(grader, retries=3, backoff=0.01)
    assert reward(["p"], ["abc"]) == [3.0]
    assert len(_Grader.calls) == 3
    reward.close()


@pytest.mark.parametrize("script, retries, message", [
    ([400], 3, "status 400"),
    ([503, 503], 1, "status 503 after 2 attempts"),
    ([299], 3, "expected JSON"),
])
def test_http_reward_failures_are_reward_errors(grader, script, retries, message):
    _Grader.script = list(script)
    reward = HTTPReward(grader, retries=retries, backoff=0.01)
    with pytest.raises(RewardError, match=message):
        reward(["p"], ["abc"])
    assert len(_Grader.calls) == (1 if script[0] in (400, 299) else retries + 1)
    reward.close()


def test_http_reward_times_out_and_unreachable_servers_fail(grader):
    _Grader.delay = 0.5
    reward = HTTPReward(grader, timeout=0.1, retries=1, backoff=0.01)
    with pytest.raises(RewardError, match="ReadTimeout after 2 attempts"):
        reward(["p"], ["abc"])
    reward.close()
    closed = HTTPReward("http://127.0.0.1:1/score", timeout=1, retries=0)
    with pytest.raises(RewardError, match="ConnectError"):
        closed(["p"], ["a"])
    closed.close()


# --------------------------------------------------------------------------- hf:
def _tiny_bert(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w.strip(".,!:").lower() for t in PROMPTS + RESPONSES for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_hf_reward_scores_the_positive_logit_in_batches(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _tiny_bert(tmp_path / "bert-rm")
    reward = parse_reward(f"hf:{path}")
    assert isinstance(reward.fn, HFRewardModel) and reward.fn.label == 1
    scores = reward(PROMPTS, RESPONSES)
    one_by_one = HFRewardModel(path, batch_size=1)(PROMPTS, RESPONSES)
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        expected = model(**tok(PROMPTS[0], RESPONSES[0], return_tensors="pt")).logits[0, 1].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_hf_reward_single_label_llama_with_a_chat_template(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = build_tiny_llama(tmp_path / "llama-rm", hidden=16)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}w5 {{ m['content'] }} </s> {% endfor %}"
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(path)
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(path)
    reward = HFRewardModel(path, batch_size=2)
    assert reward.label == 0
    scores = parse_reward(f"hf:{path}")(["w3 w4", "w9"], ["w10 w11 w12", "w13"])
    assert len(scores) == 2 and scores == pytest.approx(reward(["w3 w4", "w9"], ["w10 w11 w12", "w13"]), abs=1e-4)
    assert scores[0] != scores[1]
