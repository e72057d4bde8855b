"""`iro chat` and `iro complete`: talk to a running server from the shell.

    iro chat "Write a haiku about tea." --value helpful --mode cbs --max-tokens 64
    iro complete "Once upon a time" --stream
    iro chat "Hi" --json          # the raw response (one JSON chunk per line with --stream)
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from clients.client import IroClient
from clients.errors import IroClientError
from common.protocol import GuidanceInfo, UsageInfo
from common.search_settings import SEARCH_MODES, SearchOverrides

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


Mode = Enum("Mode", {m: m for m in SEARCH_MODES}, type=str)
"""`--mode` choices: every mode of `common.search_settings.SearchMode`."""


URL = typer.Option(None, "--url", help="Server root (env IRO_BASE_URL; default http://127.0.0.1:8000).")
API_KEY = typer.Option(None, "--api-key", help="Bearer token (env IRO_API_KEY).")
MODEL = typer.Option(None, "--model", help="Model id (default: the server's base model; `<base>+<value>` also works).")
VALUE = typer.Option(None, "--value", help='Value function guiding decoding: "name" or "name@3".')
MODE = typer.Option(None, "--mode", help="Guided search: cbs (chunk-level beam search), bon (best-of-N), or another "
                    "mode of the server's (default: the value's).")
MAX_TOKENS = typer.Option(256, "--max-tokens", min=1, help="Most tokens to generate.")
TEMPERATURE = typer.Option(None, "--temperature", min=0.0, max=2.0, help="Sampling temperature (server default 1.0).")
STREAM = typer.Option(False, "--stream", help="Print the answer as it is generated.")
JSON = typer.Option(False, "--json", help="Print the raw response (one JSON chunk per line with --stream).")


def footer(model: str, finish: str | None, usage: UsageInfo | None, guidance: GuidanceInfo | None) -> str:
    """One line of metadata under an answer.

    >>> footer("m", "stop", UsageInfo(prompt_tokens=3, completion_tokens=5, total_tokens=8), None)
    'm · stop · 3 prompt + 5 completion tokens'
    """
    parts = [model] + ([finish] if finish else [])
    if usage is not None:
        parts.append(f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")
    if guidance is not None:
        g = guidance
        score = f", score {g.score:.3f}" if g.score is not None else ""
        parts.append(f"guided by {g.value} v{','.join(map(str, g.versions))} ({g.mode} w={g.w} k={g.k} l={g.l}, "
                     f"{g.chunks} chunks, {g.candidates_scored} candidates scored{score})")
    return " · ".join(parts)


def _guidance(value: str | None, mode: Mode | None) -> dict[str, Any] | None:
    search = SearchOverrides(mode=mode.value if mode else None)
    guidance = ({"value": value} if value is not None else {}) | search.given()
    return guidance or None


def _run(kind: str, text: str, *, system: str | None = None, model: str | None, value: str | None,
         mode: Mode | None, max_tokens: int, temperature: float | None, stream: bool, as_json: bool,
         url: str | None, api_key: str | None) -> None:
    sampling: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        sampling["temperature"] = temperature
    if stream:
        sampling["stream_options"] = {"include_usage": True}
    if kind == "chat":
        prompt: Any = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    else:
        prompt = text
    try:
        with IroClient(url, api_key=api_key) as client:
            call = client.chat if kind == "chat" else client.complete
            result = call(prompt, model=model, guidance=_guidance(value, mode), stream=stream, **sampling)
            if stream:
                _print_stream(result, as_json)
            else:
                _print_answer(result, as_json)
    except (IroClientError, ValueError) as exc:  # ValueError: pydantic's validation of the request
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


def _print_answer(result, as_json: bool) -> None:
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    choice = result.choices[0]
    text = choice.message.content if hasattr(choice, "message") else choice.text
    console.print(text or "", markup=False, soft_wrap=True)
    console.print(footer(result.model, choice.finish_reason, result.usage, result.guidance), style="dim",
                  markup=False, soft_wrap=True)


def _print_stream(stream, as_json: bool) -> None:
    model, finish, usage, guidance = "", None, None, None
    with stream:
        for chunk in stream:
            if as_json:
                typer.echo(chunk.model_dump_json())
                continue
            model, usage, guidance = chunk.model, chunk.usage or usage, chunk.guidance or guidance
            for choice in chunk.choices:
                if choice.index == 0:  # with n > 1, show the first answer
                    delta = choice.delta.content if hasattr(choice, "delta") else choice.text
                    console.print(delta or "", end="", markup=False, soft_wrap=True)
                    finish = choice.finish_reason or finish
    if not as_json:
        console.print()
        console.print(footer(model, finish, usage, guidance), style="dim", markup=False, soft_wrap=True)


def chat(
    message: str = typer.Argument(..., help="The user message."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message sent first."),
    value: Optional[str] = VALUE, mode: Optional[Mode] = MODE, max_tokens: int = MAX_TOKENS,
    temperature: Optional[float] = TEMPERATURE, model: Optional[str] = MODEL, stream: bool = STREAM,
    as_json: bool = JSON, url: Optional[str] = URL, api_key: Optional[str] = API_KEY,
):
    """Send one chat message and print the answer (value-guided with --value/--mode)."""
    _run("chat", message, system=system, model=model, value=value, mode=mode, max_tokens=max_tokens,
         temperature=temperature, stream=stream, as_json=as_json, url=url, api_key=api_key)


def complete(
    prompt: str = typer.Argument(..., help="The text to continue."),
    value: Optional[str] = VALUE, mode: Optional[Mode] = MODE, max_tokens: int = MAX_TOKENS,
    temperature: Optional[float] = TEMPERATURE, model: Optional[str] = MODEL, stream: bool = STREAM,
    as_json: bool = JSON, url: Optional[str] = URL, api_key: Optional[str] = API_KEY,
):
    """Continue a raw prompt (no chat template) and print the completion."""
    _run("complete", prompt, model=model, value=value, mode=mode, max_tokens=max_tokens,
         temperature=temperature, stream=stream, as_json=as_json, url=url, api_key=api_key)


def register(app: typer.Typer) -> None:
    """Add `chat` and `complete` to the `iro` command line."""
    app.command("chat")(chat)
    app.command("complete")(complete)
