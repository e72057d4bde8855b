"""Reward plug-ins: one contract, chosen by a spec string.

Every reward is a plain callable (TRL's reward functions, minus the keyword extras)

    score(prompts: list[str], responses: list[str]) -> list[float]

returning one finite float per (prompt, response) pair, higher is better. `prompts[i]` is the
request as plain text (for chat records, the last user message) and `responses[i]` the generated
text, without the chat template.

Specs (`REWARDS` is the registry, `parse_reward(spec)` builds the checked callable):

    sentiment                  VADER compound score of the response, in [-1, 1]
    length[:N]                 min(words in the response, N) / N, in [0, 1]; N defaults to 50
    hf:PATH                    a local HF sequence-classification reward model (see HFRewardModel)
    python:MODULE:FUNCTION     any callable with the contract; MODULE may be a path to a .py file
    http:URL                   POST {"prompts", "responses"} -> {"scores"} (see HTTPReward)
    0.8*sentiment+0.2*length   a weighted sum of any of the above (weights may be negative)

    >>> reward = parse_reward("0.5*sentiment+0.5*length:4")
    >>> [round(x, 3) for x in reward(["Review it."], ["what a great film"])]
    [0.812]
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardError(ValueError):
    """A bad reward spec, or a reward plug-in that failed or broke the contract."""

    def __init__(self, message: str, *, spec: str | None = None):
        super().__init__(message)
        self.spec = spec


# --------------------------------------------------------------------------- built-in rewards
@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1]; the prompt is ignored.

    >>> [round(s, 2) for s in sentiment(["", ""], ["A wonderful, moving film.", "Dull and painfully bad."])]
    [0.57, -0.86]
    """
    analyzer = _vader()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


def length(prompts: list[str], responses: list[str], *, max_words: int = 50) -> list[float]:
    """Words in each response (split on whitespace), normalised: min(words, max_words) / max_words.

    >>> length(["", "", ""], ["one two three", "one", ""], max_words=3)
    [1.0, 0.3333333333333333, 0.0]
    """
    return [min(len(r.split()), max_words) / max_words for r in responses]


def _label_index(id2label: dict[int, str], num_labels: int) -> int:
    """Which logit of a classifier is the reward: the only one, the one named positive, or the last.

    >>> _label_index({0: "NEGATIVE", 1: "POSITIVE"}, 2), _label_index({0: "LABEL_0"}, 1), _label_index({}, 3)
    (1, 0, 2)
    """
    if num_labels == 1:
        return 0
    for i, label in (id2label or {}).items():
        if str(label).strip().lower() in ("positive", "pos"):
            return int(i)
    return num_labels - 1


class HFRewardModel:
    """A local Hugging Face sequence-classification reward model, scored in batches.

    Input: with a chat template, the conversation [user: prompt, assistant: response] rendered by
    the template; without one, the text pair (prompt, response). Score: the logit of the only label
    (num_labels == 1), else of the label named "positive"/"pos", else of the last label. Runs on
    CUDA when available, else CPU; nothing is downloaded (PATH must be a local folder).
    """

    def __init__(self, path: str | Path, *, batch_size: int = 16, max_length: int = 1024, device: str | None = None):
        path = Path(str(path)).expanduser()
        if not (path / "config.json").is_file():
            raise RewardError(f"hf:{path}: not a local Hugging Face model folder (no config.json)", spec=f"hf:{path}")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = _label_index(self.model.config.id2label, self.model.config.num_labels)

    def _encode(self, prompts: list[str], responses: list[str]):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False) for p, r in zip(prompts, responses)]
            return tok(texts, add_special_tokens=False, padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        return tok(prompts, responses, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                batch = self._encode(prompts[i: i + self.batch_size], responses[i: i + self.batch_size]).to(self.device)
                logits = self.model(**batch).logits  # (B, num_labels)
                scores.extend(logits[:, self.label].float().cpu().tolist())
        return scores


def import_reward(target: str) -> RewardFn:
    """`module:function` (importable) or `path/to/file.py:function`: the callable it names.

    >>> import_reward("trainer.rewards:length")(["p"], ["five words are right here"])
    [0.1]
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"python:{target}: expected python:MODULE:FUNCTION", spec=f"python:{target}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            spec = importlib.util.spec_from_file_location(f"_iro_reward_{file.stem}", file)
            if spec is None or not file.is_file():
                raise FileNotFoundError(file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise RewardError(f"python:{target}: cannot import {module_name!r}: {exc}", spec=f"python:{target}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"python:{target}: {module_name!r} has no callable {attr!r}", spec=f"python:{target}")
    return fn


class HTTPReward:
    """A remote grader: POST {"prompts": [...], "responses": [...]} -> {"scores": [...]}.

    Requests are sent in batches of `batch_size`. Connection errors, timeouts, 429 and 5xx are
    retried `retries` times with exponential backoff (`backoff` * 2**attempt seconds, or the
    server's Retry-After, at most 30 s); any other status or a malformed body fails at once. If
    IRO_REWARD_API_KEY is set it is sent as a bearer token.

    >>> import httpx
    >>> grader = httpx.MockTransport(lambda request: httpx.Response(200, json={"scores": [0.5]}))
    >>> HTTPReward("http://grader/score", transport=grader)(["p"], ["r"])
    [0.5]
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 256, transport=None):
        import httpx

        if not re.match(r"^https?://[^/\s]+", url):
            raise RewardError(f"http:{url}: expected an http:// or https:// URL (e.g. http:http://127.0.0.1:9000/score)",
                              spec=f"http:{url}")
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.batch_size = batch_size
        headers = {"Authorization": f"Bearer {os.environ['IRO_REWARD_API_KEY']}"} if os.environ.get("IRO_REWARD_API_KEY") else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers,
                                    transport=transport)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            scores.extend(self._post(prompts[i: i + self.batch_size], responses[i: i + self.batch_size]))
        return scores

    def _post(self, prompts: list[str], responses: list[str]) -> list[float]:
        import httpx

        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._client.post(self.url, json={"prompts": prompts, "responses": responses})
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                if last:
                    raise RewardError(f"http:{self.url}: {type(exc).__name__} after {attempt + 1} attempts: {exc}",
                                      spec=f"http:{self.url}") from exc
                delay = self.backoff * 2**attempt
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    if last:
                        raise RewardError(f"http:{self.url}: status {response.status_code} after {attempt + 1} attempts",
                                          spec=f"http:{self.url}")
                    delay = _retry_after(response) or self.backoff * 2**attempt
                elif response.status_code != 200:
                    raise RewardError(f"http:{self.url}: status {response.status_code}: {response.text[:200]}",
                                      spec=f"http:{self.url}")
                else:
                    try:
                        scores = response.json()["scores"]
                    except (ValueError, KeyError, TypeError) as exc:
                        raise RewardError(f"http:{self.url}: expected JSON {{\"scores\": [...]}}, got {response.text[:200]!r}",
                                          spec=f"http:{self.url}") from exc
                    if not isinstance(scores, list) or len(scores) != len(prompts):
                        raise RewardError(f"http:{self.url}: expected {len(prompts)} scores, got {str(scores)[:200]}",
                                          spec=f"http:{self.url}")
                    return scores
            log.warning("reward server %s: retrying in %.2f s (attempt %d/%d)", self.url, delay, attempt + 1, self.retries)
            time.sleep(min(delay, 30.0))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()


def _retry_after(response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


# --------------------------------------------------------------------------- registry and specs
def _no_arg(name: str, fn: RewardFn) -> Callable[[str], RewardFn]:
    def factory(arg: str) -> RewardFn:
        if arg:
            raise RewardError(f"{name}:{arg}: {name} takes no argument", spec=f"{name}:{arg}")
        return fn

    return factory


def _length_factory(arg: str) -> RewardFn:
    if not arg:
        return length
    if not arg.isdigit() or int(arg) < 1:
        raise RewardError(f"length:{arg}: expected length:N with N >= 1 words", spec=f"length:{arg}")
    return functools.partial(length, max_words=int(arg))


def _required(name: str, factory: Callable[[str], RewardFn], what: str) -> Callable[[str], RewardFn]:
    def build(arg: str) -> RewardFn:
        if not arg:
            raise RewardError(f"{name}: needs {what} ({name}:{what.upper()})", spec=name)
        return factory(arg)

    return build


REWARDS: dict[str, Callable[[str], RewardFn]] = {
    "sentiment": _no_arg("sentiment", sentiment),
    "length": _length_factory,
    "hf": _required("hf", HFRewardModel, "path"),
    "python": _required("python", import_reward, "module:function"),
    "http": _required("http", HTTPReward, "url"),
}
"""Spec name -> factory(argument after the first ':', or "") -> reward callable."""

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"^\s*(?:(?P<weight>{_NUM})\s*\*\s*)?(?P<spec>\S.*?)\s*$", re.S)
# Split a sum at '+' only where a known reward (optionally weighted) starts, so URLs and paths
# that contain '+' stay whole.
_SPLIT = re.compile(rf"\+(?=\s*(?:{_NUM}\s*\*\s*)?(?:{'|'.join(REWARDS)})(?::|\s*\+|\s*$))")


@dataclass(frozen=True)
class WeightedSum:
    """sum_i w_i * reward_i(prompts, responses)."""

    terms: tuple[tuple[float, RewardFn], ...]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        total = [0.0] * len(prompts)
        for weight, fn in self.terms:
            for i, s in enumerate(fn(prompts, responses)):
                total[i] += weight * float(s)
        return total


@dataclass(frozen=True)
class Reward:
    """A parsed spec: calls the plug-in and checks the contract (one finite float per pair)."""

    spec: str
    fn: RewardFn

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise RewardError(f"reward {self.spec!r}: {len(prompts)} prompts but {len(responses)} responses", spec=self.spec)
        if not prompts:
            return []
        out = self.fn(list(prompts), list(responses))
        try:
            scores = [float(s) for s in out]
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {self.spec!r} returned {type(out).__name__}, not a list of numbers",
                              spec=self.spec) from exc
        if len(scores) != len(prompts):
            raise RewardError(f"reward {self.spec!r} returned {len(scores)} scores for {len(prompts)} responses",
                              spec=self.spec)
        bad = next((s for s in scores if not math.isfinite(s)), None)
        if bad is not None:
            raise RewardError(f"reward {self.spec!r} returned a non-finite score ({bad})", spec=self.spec)
        return scores


def _build_one(spec: str) -> RewardFn:
    if re.match(r"^https?://", spec):  # a bare URL is an http grader
        return HTTPReward(spec)
    name, _, arg = spec.partition(":")
    factory = REWARDS.get(name.strip())
    if factory is None:
        raise RewardError(f"unknown reward {name.strip()!r} in {spec!r}; known: {', '.join(REWARDS)} "
                          f"(or a weighted sum like 0.8*sentiment+0.2*length)", spec=spec)
    return factory(arg.strip())


def parse_reward(spec: str) -> Reward:
    """Build the reward a spec names (see the module docstring); raises RewardError if it is bad.

    >>> parse_reward("sentiment").spec
    'sentiment'
    >>> parse_reward("0.8*sentiment+0.2*length").fn.terms[1][0]
    0.2
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError("empty reward spec; e.g. --reward sentiment", spec=spec)
    spec = spec.strip()
    parts = _SPLIT.split(spec)
    terms: list[tuple[float, RewardFn]] = []
    weighted = False
    for part in parts:
        m = _TERM.match(part)
        if m is None:
            raise RewardError(f"empty term in reward spec {spec!r}", spec=spec)
        weighted |= m.group("weight") is not None
        weight = float(m.group("weight")) if m.group("weight") is not None else 1.0
        terms.append((weight, _build_one(m.group("spec"))))
    if len(terms) == 1 and not weighted:
        return Reward(spec, terms[0][1])
    return Reward(spec, WeightedSum(tuple(terms)))


def resolve_reward(spec: str, *, base_dir: str | Path | None = None) -> str:
    """Check a spec without running it and return it with relative file paths (`python:FILE.py:fn`,
    `hf:DIR`) made absolute against `base_dir` (a task file's folder). `python:` plug-ins are
    imported, `hf:` folders must hold a config.json (the model is not loaded), URLs must be http(s);
    a bad term raises RewardError.

    >>> resolve_reward("0.5*sentiment + 0.5*length:20")
    '0.5*sentiment+0.5*length:20'
    >>> try:
    ...     resolve_reward("sentimnt")
    ... except RewardError as exc:
    ...     print(exc)
    unknown reward 'sentimnt' in 'sentimnt'; known: sentiment, length, hf, python, http (or a weighted sum like 0.8*sentiment+0.2*length)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError("empty reward spec; e.g. --reward sentiment", spec=spec)
    base = Path(base_dir) if base_dir is not None else None
    terms = []
    for part in _SPLIT.split(spec.strip()):
        m = _TERM.match(part)
        if m is None:
            raise RewardError(f"empty term in reward spec {spec!r}", spec=spec)
        term = m.group("spec")
        name, _, arg = term.partition(":")
        name, arg = name.strip(), arg.strip()
        if name == "python" and base is not None:
            module, sep, fn = arg.rpartition(":")
            if sep and module.endswith(".py") and not Path(module).expanduser().is_absolute():
                term = f"python:{(base / module).resolve()}:{fn}"
        elif name == "hf" and arg and base is not None and not Path(arg).expanduser().is_absolute():
            term = f"hf:{(base / arg).resolve()}"
        name, _, arg = term.partition(":")
        if name == "hf":
            if not arg:
                raise RewardError("hf: needs path (hf:PATH)", spec=term)
            if not (Path(arg).expanduser() / "config.json").is_file():
                raise RewardError(f"hf:{arg}: not a local Hugging Face model folder (no config.json)", spec=term)
        elif name == "http" or re.match(r"^https?://", term):
            url = arg if name == "http" else term
            if not re.match(r"^https?://[^/\s]+", url):
                raise RewardError(f"{term}: expected an http:// or https:// URL", spec=term)
        else:
            _build_one(term)  # cheap: sentiment, length, python (imports the plug-in)
        weight = m.group("weight")
        terms.append(f"{weight}*{term}" if weight is not None else term)
    return "+".join(terms)


# --------------------------------------------------------------------------- labelling rollouts
def record_prompt(record: dict) -> str:
    """The prompt a reward sees for a rollout record: `prompt` when it is a string, else the last
    user message of `messages`, else the rendered `prompt_text`.

    >>> record_prompt({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]})
    'Hi'
    """
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content or "")
    return str(record.get("prompt_text") or "")


def label_records(records: Sequence[dict], reward: Callable[[list[str], list[str]], list[float]], *,
                  batch_size: int = 64, progress: bool = False) -> list[dict]:
    """Copies of rollout `records` with "reward" set by `reward`, called `batch_size` at a time.

    >>> label_records([{"prompt": "p", "response": "a b"}], parse_reward("length:4"))[0]["reward"]
    0.5
    """
    from tqdm.auto import tqdm

    out: list[dict] = []
    with tqdm(total=len(records), desc="reward", unit="resp", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(records), batch_size):
            chunk = records[i: i + batch_size]
            scores = reward([record_prompt(r) for r in chunk], [str(r.get("response") or "") for r in chunk])
            out += [{**r, "reward": s} for r, s in zip(chunk, scores)]
            bar.update(len(chunk))
    return out


__all__ = ["REWARDS", "HFRewardModel", "HTTPReward", "Reward", "RewardError", "WeightedSum", "import_reward",
           "label_records", "length", "parse_reward", "record_prompt", "resolve_reward", "sentiment"]
