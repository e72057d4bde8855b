"""`iro data`: stored completions on a server, listed, exported as rollout records, turned into
the next iteration's prompts, deleted.

    iro data ls --metadata task=support
    iro data export -o traffic.jsonl --metadata task=support --since 2026-12-01
    iro data prompts -o prompts.jsonl --heldout heldout.jsonl --heldout-fraction 0.1
    iro data rm --metadata task=support
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Stored completions (store: true) on a server: list, export, prompts, delete.",
                  no_args_is_help=True)
SERVER = typer.Option(None, "--server", help="Server root (env IRO_BASE_URL; default http://127.0.0.1:8000).")
API_KEY = typer.Option(None, "--api-key", help="Bearer token for /v1 (env IRO_API_KEY).")
METADATA = typer.Option([], "--metadata", "-m", help="Only completions with this metadata pair (key=value; "
                        "repeatable: all must match).")
MODEL = typer.Option(None, "--model", help="Only completions of this model id (e.g. base+value).")
SINCE = typer.Option(None, "--since", help="Only completions created at or after this date (ISO 8601) or Unix time.")


def _client(server: Optional[str], api_key: Optional[str]):
    try:
        import openai
    except ImportError:
        raise typer.BadParameter("iro data needs the openai package (pip install openai)") from None

    root = server or os.environ.get("IRO_BASE_URL") or "http://127.0.0.1:8000"
    return openai.OpenAI(base_url=root.rstrip("/") + "/v1", api_key=api_key or os.environ.get("IRO_API_KEY") or "none",
                         max_retries=2)


def _since(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO 8601 date or a Unix time, got {value!r}", param_hint="--since")
    return int((moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp())


def _query(server, api_key, metadata, model, since, limit=None):
    from trainer.stored_data import list_stored, parse_pairs

    try:
        pairs = parse_pairs(metadata)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--metadata")
    return list_stored(_client(server, api_key), metadata=pairs, model=model, since=_since(since), limit=limit)


@app.command("ls")
def ls(server: Optional[str] = SERVER, api_key: Optional[str] = API_KEY, metadata: list[str] = METADATA,
       model: Optional[str] = MODEL, since: Optional[str] = SINCE,
       limit: int = typer.Option(50, min=1, help="Most rows to show.")):
    """One line per stored completion: id, created (UTC), model, metadata, start of the answer."""
    from trainer.stored_data import metadata_of

    for c in _query(server, api_key, metadata, model, since, limit):
        when = dt.datetime.fromtimestamp(c.created, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        answer = (c.choices[0].message.content or "").replace("\n", " ")[:50] if c.choices else ""
        pairs = ",".join(f"{k}={v}" for k, v in metadata_of(c).items())
        typer.echo(f"{c.id}\t{when}\t{c.model}\t{pairs or '-'}\t{answer}")


@app.command("export")
def export(out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (rollout records)."),
           server: Optional[str] = SERVER, api_key: Optional[str] = API_KEY, metadata: list[str] = METADATA,
           model: Optional[str] = MODEL, since: Optional[str] = SINCE):
    """Stored completions as rollout records (one per choice; `reward` null, for `iro reward`)."""
    from trainer.stored_data import to_records, write_jsonl

    n = write_jsonl(out, (r for c in _query(server, api_key, metadata, model, since) for r in to_records(c)))
    typer.echo(f"{n} records -> {out}")


@app.command("prompts")
def prompts(out: Path = typer.Option(..., "--out", "-o", help="Training prompts (JSONL, `iro rollout` input)."),
            heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out prompts (JSONL); a prompt's "
                                                   "side is fixed by a hash of its messages."),
            heldout_fraction: float = typer.Option(0.1, min=0.0, max=1.0),
            server: Optional[str] = SERVER, api_key: Optional[str] = API_KEY, metadata: list[str] = METADATA,
            model: Optional[str] = MODEL, since: Optional[str] = SINCE):
    """Deduplicated prompts of stored completions for the next iteration, with a held-out split."""
    from trainer.stored_data import split_prompts, write_jsonl

    train, held = split_prompts(_query(server, api_key, metadata, model, since), heldout_fraction=heldout_fraction)
    write_jsonl(out, train)
    if heldout is not None:
        write_jsonl(heldout, held)
    typer.echo(f"{len(train)} training prompts -> {out}; {len(held)} held out"
               + (f" -> {heldout}" if heldout else " (not written: no --heldout)"))


@app.command("rm")
def rm(ids: list[str] = typer.Argument(None, help="Stored completion ids to delete."),
       server: Optional[str] = SERVER, api_key: Optional[str] = API_KEY, metadata: list[str] = METADATA,
       model: Optional[str] = MODEL):
    """Delete stored completions by id, or every one matching --metadata / --model."""
    from trainer.stored_data import parse_pairs

    client = _client(server, api_key)
    if ids:
        for completion_id in ids:
            client.chat.completions.delete(completion_id)
        typer.echo(f"deleted {len(ids)}")
        return
    pairs = parse_pairs(metadata)
    if not pairs and not model:
        raise typer.BadParameter("give ids, or --metadata / --model to delete in bulk")
    params = {f"metadata[{k}]": v for k, v in pairs.items()} | ({"model": model} if model else {})
    answer = client.delete("/chat/completions", cast_to=object, options={"params": params})
    typer.echo(f"deleted {answer['deleted']}")
