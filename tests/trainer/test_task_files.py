"""Task files: the loader, the built-in tasks, `iro tasks`, and bad files refused with exit code 2
before any server or registry use (no engine here)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.search_settings import SearchSettings
from trainer.rewards import parse_reward
from trainer.tasks import TaskError, builtin_tasks, load_task
from trainer.tasks.json_extract import expected_answer, find_object, score
from trainer.tasks.review_sentiment import N_TRAIN_TITLES, TITLES

REWARD_PY = "def score(prompts, responses):\n    return [float(len(r) < 20) for r in responses]\n"


def write_task(tmp_path: Path, body: str, *, train: list[dict] | None = None, eval_: list[dict] | None = None) -> Path:
    """A task folder: task.yaml (body), train.jsonl, eval.jsonl and reward.py."""
    for name, lines in (("train.jsonl", train), ("eval.jsonl", eval_)):
        lines = [{"prompt": f"{name} prompt {i}"} for i in range(3)] if lines is None else lines
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "reward.py").write_text(REWARD_PY)
    (tmp_path / "task.yaml").write_text(textwrap.dedent(body))
    return tmp_path / "task.yaml"


GOOD = """\
name: tiny
prompts:
  train: train.jsonl
  eval: eval.jsonl
reward: python:reward.py:score
max_tokens: 16
stop: ["\\n\\n"]
"""


def test_a_hand_written_task_resolves_paths_formats_and_stop_strings(tmp_path):
    path = write_task(tmp_path, GOOD)
    task = load_task(path)
    assert (task.name, task.max_tokens, task.temperature, task.format) == ("tiny", 16, 0.7, "chat")
    assert task.reward == f"python:{tmp_path.resolve() / 'reward.py'}:score"
    assert parse_reward(task.reward)(["p", "p"], ["short", "x" * 30]) == [1.0, 0.0]
    item = task.items("train")[0]  # a prompt string becomes a user turn; the task's stop strings are set
    assert item.messages == [{"role": "user", "content": "train.jsonl prompt 0"}] and item.sampling == {"stop": ["\n\n"]}
    assert [p.id for p in task.items("eval", 2)] == ["1", "2"]
    assert load_task(tmp_path) == task  # a folder means its task.yaml
    assert task.search == SearchSettings()  # the reference: cbs, w=4, k=4, l=8
    mine = load_task(write_task(tmp_path, GOOD + "search: {mode: bon, k: 8}\n")).search
    assert isinstance(mine, SearchSettings) and (mine.mode, mine.w, mine.k) == ("bon", 4, 8)


def test_completion_format_keeps_raw_prompts_and_refuses_chat_lines(tmp_path):
    task = load_task(write_task(tmp_path, GOOD + "format: completion\n"))
    assert task.items("train")[0].prompt == "train.jsonl prompt 0" and task.items("train")[0].messages is None
    write_task(tmp_path, GOOD + "format: completion\n", eval_=[{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TaskError, match=r"eval.jsonl:1: prompts.eval: format is completion"):
        load_task(tmp_path)


def test_name_defaults_to_the_folder(tmp_path):
    folder = tmp_path / "my-task"
    folder.mkdir()
    assert load_task(write_task(folder, GOOD.replace("name: tiny\n", ""))).name == "my-task"


BAD = [
    # (what is wrong, the task.yaml text or a change to GOOD, files, expected line, expected words)
    ("missing prompts file", GOOD.replace("train: train.jsonl", "train: nope.jsonl"), {}, 3,
     "prompts.train: prompts file '.*nope.jsonl' does not exist"),
    ("unknown reward", GOOD.replace("python:reward.py:score", "sentimnt"), {}, 5,
     "reward: unknown reward 'sentimnt'"),
    ("missing reward function", GOOD.replace("reward.py:score", "reward.py:nothing"), {}, 5,
     "reward: python:.*has no callable 'nothing'"),
    ("empty prompt list", GOOD, {"train": []}, 3, "prompts.train: no prompts"),
    ("wrong type: max_tokens", GOOD.replace("max_tokens: 16", "max_tokens: lots"), {}, 6,
     "max_tokens: Input should be a valid integer \\(got 'lots'\\)"),
    ("wrong type: quoted number", GOOD.replace("max_tokens: 16", "max_tokens: '16'"), {}, 6,
     "max_tokens: Input should be a valid integer"),
    ("wrong type: stop", GOOD.replace('stop: ["\\n\\n"]', "stop: 5"), {}, 7, "stop: Input should be a valid list"),
    ("wrong type: prompts", GOOD.replace("train: train.jsonl", "train: [a, b]"), {}, 3,
     "prompts.train: expected a JSONL file path or {generator"),
    ("out of range", GOOD + "temperature: 9\n", {}, 8, "temperature: Input should be less than or equal to 2"),
    ("unknown field", GOOD + "max_token: 3\n", {}, 8, "max_token: unknown field \\(known: name, description"),
    ("missing field", GOOD.replace("reward: python:reward.py:score\n", ""), {}, 1, "reward: required field missing"),
    ("bad choice", GOOD + "format: raw\n", {}, 8, "format: Input should be 'chat' or 'completion'"),
    ("bad search", GOOD + "search: {w: 0}\n", {}, 8, "search.w: Input should be greater than or equal to 1"),
    ("search as text", GOOD + 'search: {w: "4"}\n', {}, 8, "search.w: Input should be a valid integer"),
    ("bad search mode", GOOD + "search: {mode: beam}\n", {}, 8, "search.mode: Input should be 'cbs', 'bon'"),
    ("bad value name", GOOD.replace("name: tiny", "name: ../up"), {}, 1, "name: invalid value name"),
]


@pytest.mark.parametrize("what, body, files, line, words", BAD, ids=[b[0] for b in BAD])
def test_bad_task_files_name_the_line_and_the_field(tmp_path, what, body, files, line, words):
    path = write_task(tmp_path, body, train=files.get("train"))
    with pytest.raises(TaskError, match=words) as info:
        load_task(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)


def test_bad_prompt_lines_name_their_own_file_and_line(tmp_path):
    write_task(tmp_path, GOOD, train=[{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(TaskError, match=r"train.jsonl:2: prompts.train: give exactly one of `messages`"):
        load_task(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(TaskError, match=r"train.jsonl:2: prompts.train: not JSON"):
        load_task(tmp_path)
    write_task(tmp_path, GOOD, train=[{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(TaskError, match=r"train.jsonl:2: prompts.train: duplicate id 'a'"):
        load_task(tmp_path)


def test_yaml_syntax_errors_and_unknown_tasks(tmp_path):
    path = write_task(tmp_path, GOOD + "search: {w: 4\n")
    with pytest.raises(TaskError, match=rf"{path}:\d+: not valid YAML"):
        load_task(path)
    with pytest.raises(TaskError, match="unknown task 'json-extrct': not a built-in task \\(json-extract, "
                                        "review-sentiment\\)"):
        load_task("json-extrct")


# --------------------------------------------------------------------------- the command line
@pytest.fixture
def cli(monkeypatch, tmp_path):
    """`iro` with the server and the registry made unreachable: a test fails if either is touched."""
    import httpx

    import valuefn.registry
    from iro.cli import app

    def no_network(*args, **kwargs):
        raise AssertionError("a bad task file reached the network")

    def no_registry(*args, **kwargs):
        raise AssertionError("a bad task file reached the registry")

    monkeypatch.setattr(httpx.Client, "send", no_network)
    monkeypatch.setattr(httpx.AsyncClient, "send", no_network)
    monkeypatch.setattr(valuefn.registry.Registry, "__init__", no_registry)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("what, body, files, line, words", BAD[:5] + BAD[6:8], ids=[b[0] for b in BAD[:5] + BAD[6:8]])
@pytest.mark.parametrize("command", ["loop", "eval"])
def test_loop_and_eval_refuse_bad_task_files_with_exit_2_before_any_server_or_registry_use(
        cli, tmp_path, command, what, body, files, line, words):
    import re

    path = write_task(tmp_path, body, train=files.get("train"))
    values = tmp_path / "values"
    extra = ["--values-dir", values, "--run-dir", tmp_path / "run"] if command == "loop" else ["--out", tmp_path / "o",
                                                                                            "--value", "v"]
    result = cli(command, "--task", path, "--server", "http://127.0.0.1:9", *extra)
    assert result.exit_code == 2, result.output
    assert re.search(words, result.output) and f"{path}:{line}:" in result.output, result.output
    assert not values.exists() and not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_tasks_ls_show_and_init(cli, tmp_path):
    listed = cli("tasks", "ls")
    assert listed.exit_code == 0 and "json-extract" in listed.output and "review-sentiment" in listed.output
    assert builtin_tasks() == ["json-extract", "review-sentiment"]
    shown = cli("tasks", "show", "json-extract")
    assert shown.exit_code == 0 and "reward: python:trainer.tasks.json_extract:reward" in shown.output

    made = cli("tasks", "init", tmp_path / "ex")
    assert made.exit_code == 0, made.output
    task = load_task(tmp_path / "ex")  # runs as it is: it loads, and its reward grades answers
    assert task.name == "short-questions" and len(task.train) >= 8 and len(task.eval) >= 4
    assert parse_reward(task.reward)(["q", "q"], ["Water them weekly. Which plants do you have?", "No."]) == [1.0, 0.3]
    assert "short-questions" in cli("tasks", "show", tmp_path / "ex").output
    again = cli("tasks", "init", tmp_path / "ex")
    assert again.exit_code == 2 and "already has task.yaml" in again.output

    (tmp_path / "ex" / "eval.jsonl").write_text("")
    bad = cli("tasks", "show", tmp_path / "ex")
    assert bad.exit_code == 2 and "prompts.eval: no prompts" in bad.output


def test_reward_command_takes_a_task_file(cli, tmp_path):
    path = write_task(tmp_path, GOOD)
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text(json.dumps({"id": "a:0", "prompt": "p", "response": "short"}) + "\n")
    result = cli("reward", rollouts, "--task", path, "-o", tmp_path / "labelled.jsonl")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "labelled.jsonl").read_text())["reward"] == 1.0


# --------------------------------------------------------------------------- the built-in tasks
def test_review_sentiment_prompts_are_many_distinct_deterministic_and_held_out_by_title():
    task = load_task("review-sentiment")
    train, held_out = task.train_prompts(), task.eval_prompts()
    assert len(train) >= 300 and len(held_out) >= 100
    assert train == load_task("review-sentiment").train_prompts()
    texts = [p["messages"][0]["content"] for p in train + held_out]
    assert len(set(texts)) == len(texts)
    assert len({p["id"] for p in train + held_out}) == len(texts)
    eval_titles = TITLES[N_TRAIN_TITLES:]
    assert not any(t in p["messages"][0]["content"] for p in train for t in eval_titles)
    assert all(any(t in p["messages"][0]["content"] for t in eval_titles) for p in held_out)
    assert task.max_tokens == 32 and parse_reward(task.reward)(["p"], ["great"])[0] > 0


def test_json_extract_prompts_are_distinct_held_out_and_all_have_answers():
    task = load_task("json-extract")
    train, held_out = task.train_prompts(), task.eval_prompts()
    texts = [p["messages"][0]["content"] for p in train + held_out]
    assert len(train) == 400 and len(held_out) == 100 and len(set(texts)) == len(texts)
    answers = [expected_answer(t) for t in texts]
    assert all(a is not None and 2 <= len(a) <= 4 for a in answers)
    train_entities = {a.get("name") or a.get("product") or a.get("title") for a in answers[:400]} - {None}
    eval_entities = {a.get("name") or a.get("product") or a.get("title") for a in answers[400:]} - {None}
    assert not train_entities & eval_entities


@pytest.mark.parametrize("response, expected", [
    ('{"name": "Ada Sharma", "age": 53, "job": "nurse"}', 1.0),
    (' {"job": "Nurse", "name": "ada  sharma", "age": 53.0}\n', 1.0),  # key order, case and spaces do not matter
    ('```json\n{"name": "Ada Sharma", "age": 53, "job": "nurse"}\n```', 0.8),  # not the object alone
    ('{"name": "Ada Sharma", "age": "53", "job": "nurse"}', 0.6 + 0.4 * 2 / 3),  # a number as a string
    ('{"name": "Ada Sharma", "age": 53, "job": "nurse", "city": "Melbourne"}', 0.8),  # a key too many
    ('{"name": "Ada Sharma", "age": 53', 0.0),  # cut off: no object
    ("Ada Sharma is 53.", 0.0),
])
def test_json_checker_grades_validity_form_and_content(response, expected):
    prompt = load_task("json-extract").eval_prompts()[0]["messages"][0]["content"]
    assert expected_answer(prompt) == {"name": "Ada Sharma", "age": 53, "job": "nurse"}
    assert score(prompt, response) == pytest.approx(expected, abs=1e-6)


def test_find_object_skips_braces_that_are_not_an_object():
    assert find_object("Here {it} is: {\"a\": [1, {\"b\": 2}]} done") == ({"a": [1, {"b": 2}]}, False)


def test_the_readme_worked_example_writes_a_task_that_loads(tmp_path):
    """The files of README's "Your own task" example, written by its own shell lines, load as a task."""
    import subprocess

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Your own task"):]
    block = section[section.index("```bash\n") + len("```bash\n"): section.index("\ncd ..\n")]
    subprocess.run(["bash", "-ec", block], cwd=tmp_path, check=True, timeout=30)
    task = load_task(tmp_path / "tagger")
    assert (task.name, len(task.train), len(task.eval), task.stop) == ("tagger", 6, 2, ("\n\n",))
    assert parse_reward(task.reward)(["p"] * 3, ['{"tags": ["bikes", "repair"]}', '{"x": 1}', "tags"]) == \
        pytest.approx([0.9 + 0.1 * 3 / 20, 0.9 * 0.5 + 0.1 * 2 / 20, 0.1 / 20])  # length: words / 20
