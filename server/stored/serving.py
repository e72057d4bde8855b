"""Stored chat completions: saved by `OpenAIServing` when a request says `store: true` (or the
server stores everything), listed with OpenAI's filters (`metadata[key]=value`, `model`) and
cursor pagination (`after`, `limit`, `order`), updated, deleted by id or by metadata filter.

A stored completion belongs to the API key whose request made it (a batch line's: the batch's):
another key gets 404 for it, does not see it listed and does not delete it with a filter."""

from __future__ import annotations

import logging

import sqlalchemy as sa

from server.errors import InvalidRequestError, NotFoundError
from server.store.db import Database, completion_metadata, completions
from server.stored.protocol import (
    StoredCompletion, StoredCompletionDeleted, StoredCompletionList, StoredCompletionsDeleted, StoredMessage,
    StoredMessageList, StoredRecord,
)

log = logging.getLogger(__name__)
MAX_LIMIT = 100


def policy_of(base: str, value: str | None, adapter, guidance) -> dict:
    """The policy that produced an answer: the base model, the value chain (name, versions, betas,
    search settings) and the policy adapter (LoRA `name@version`)."""
    info = guidance.model_dump(include={"value", "versions", "betas", "mode", "w", "k", "l"}) if guidance else {}
    return {"base": base, "value": info.pop("value", value), **info,
            "adapter": getattr(adapter, "lora_name", None)}


def _filters(model: str | None, metadata: dict[str, str], api_key_name: str | None = None):
    conds = [] if api_key_name is None else [completions.c.api_key_name == api_key_name]
    if model:
        conds.append(completions.c.model == model)
    for key, value in metadata.items():
        conds.append(completions.c.id.in_(sa.select(completion_metadata.c.completion_id).where(
            completion_metadata.c.key == key, completion_metadata.c.value == value)))
    return conds


def _completion(row) -> StoredCompletion:
    response = row.response
    choices = [{**c, "token_ids": ids} for c, ids in zip(response.get("choices", []), row.completion_token_ids)]
    return StoredCompletion.model_validate({**response, "choices": choices, "prompt_token_ids": row.prompt_token_ids,
                                           "metadata": row.metadata or {}, "request": row.request, "prompt_text": row.prompt_text,
                                           "policy": row.policy})


class StoredCompletions:
    def __init__(self, db: Database, *, metrics=None):
        self.db = db
        self.failures = None
        if metrics is not None:
            from prometheus_client import Counter

            self.failures = Counter("iro_store_failures_total", "Completions asked to be stored that were not "
                                    "(database errors); the answer was still returned", registry=metrics.registry)

    async def save(self, record: StoredRecord, *, api_key_name: str) -> None:
        """Store one completion as `api_key_name`'s; a database failure is logged and counted, never
        raised (the answer has been generated and is returned)."""
        def insert(conn):
            conn.execute(completions.insert().values(**record.model_dump(include=set(completions.c.keys())),
                                                     api_key_name=api_key_name))
            if record.metadata:
                conn.execute(completion_metadata.insert(), [{"completion_id": record.id, "key": k, "value": v}
                                                            for k, v in record.metadata.items()])

        try:
            await self.db.write(insert)
        except Exception:
            log.exception("could not store completion %s", record.id)
            if self.failures is not None:
                self.failures.inc()

    # ------------------------------------------------------------------ reads
    def _row(self, conn, completion_id: str, api_key_name: str):
        """The completion's row; 404 when it is another API key's."""
        row = conn.execute(sa.select(completions).where(completions.c.id == completion_id,
                                                        completions.c.api_key_name == api_key_name)).first()
        if row is None:
            raise NotFoundError(f"No stored chat completion {completion_id}", param="completion_id",
                                code="completion_not_found")
        return row

    def list_sync(self, *, api_key_name: str, after: str | None = None, limit: int = 20, order: str = "asc",
                  model: str | None = None, metadata: dict[str, str] | None = None) -> StoredCompletionList:
        rows = self.records_sync(after=after, limit=limit, order=order, model=model, metadata=metadata, extra=1,
                                 api_key_name=api_key_name)
        data = [_completion(r) for r in rows[:limit]]
        return StoredCompletionList(data=data, has_more=len(rows) > limit, first_id=data[0].id if data else None,
                                    last_id=data[-1].id if data else None)

    def records_sync(self, *, after: str | None = None, limit: int | None = 20, order: str = "asc",
                     model: str | None = None, metadata: dict[str, str] | None = None, since: int | None = None,
                     extra: int = 0, api_key_name: str | None = None) -> list:
        """Rows (all columns) matching the filters, in `seq` order; `api_key_name` None: every key's."""
        def query(conn):
            q = sa.select(completions).where(*_filters(model, metadata or {}, api_key_name))
            if since is not None:
                q = q.where(completions.c.created >= since)
            if after:
                seq = conn.execute(sa.select(completions.c.seq).where(
                    completions.c.id == after, *_filters(None, {}, api_key_name))).scalar()
                if seq is None:
                    raise NotFoundError(f"No stored chat completion {after}", param="after", code="completion_not_found")
                q = q.where(completions.c.seq < seq if order == "desc" else completions.c.seq > seq)
            q = q.order_by(completions.c.seq.desc() if order == "desc" else completions.c.seq.asc())
            if limit is not None:
                q = q.limit(limit + extra)
            return conn.execute(q).all()

        return self.db.read_sync(query)

    def get_sync(self, completion_id: str, *, api_key_name: str) -> StoredCompletion:
        return _completion(self.db.read_sync(lambda c: self._row(c, completion_id, api_key_name)))

    def messages_sync(self, completion_id: str, *, api_key_name: str, after: str | None = None, limit: int = 20,
                      order: str = "asc") -> StoredMessageList:
        row = self.db.read_sync(lambda c: self._row(c, completion_id, api_key_name))
        messages = []
        for i, m in enumerate(row.request.get("messages", [])):
            content, parts = m.get("content"), None
            if isinstance(content, list):
                parts, content = content, "".join(p.get("text", "") for p in content)
            messages.append(StoredMessage(id=f"{completion_id}-{i}", role=m["role"], content=content,
                                          name=m.get("name"), content_parts=parts))
        if order == "desc":
            messages.reverse()
        if after:
            ids = [m.id for m in messages]
            if after not in ids:
                raise NotFoundError(f"No message {after} in {completion_id}", param="after", code="message_not_found")
            messages = messages[ids.index(after) + 1:]
        data = messages[:limit]
        return StoredMessageList(data=data, has_more=len(messages) > limit, first_id=data[0].id if data else None,
                                 last_id=data[-1].id if data else None)

    # ------------------------------------------------------------------ writes
    def update_sync(self, completion_id: str, metadata: dict[str, str] | None, *,
                    api_key_name: str) -> StoredCompletion:
        def update(conn):
            self._row(conn, completion_id, api_key_name)
            conn.execute(completions.update().where(completions.c.id == completion_id).values(metadata=metadata or {}))
            conn.execute(completion_metadata.delete().where(completion_metadata.c.completion_id == completion_id))
            if metadata:
                conn.execute(completion_metadata.insert(), [{"completion_id": completion_id, "key": k, "value": v}
                                                            for k, v in metadata.items()])
            return self._row(conn, completion_id, api_key_name)

        return _completion(self.db.write_sync(update))

    def delete_sync(self, completion_id: str, *, api_key_name: str) -> StoredCompletionDeleted:
        def delete(conn):
            self._row(conn, completion_id, api_key_name)
            conn.execute(completion_metadata.delete().where(completion_metadata.c.completion_id == completion_id))
            conn.execute(completions.delete().where(completions.c.id == completion_id))

        self.db.write_sync(delete)
        return StoredCompletionDeleted(id=completion_id)

    def delete_matching_sync(self, *, model: str | None, metadata: dict[str, str],
                             api_key_name: str) -> StoredCompletionsDeleted:
        if not metadata and not model:
            raise InvalidRequestError("give a filter (metadata[key]=value or model) to delete stored completions in "
                                      "bulk; DELETE /v1/chat/completions/{id} deletes one", param="metadata",
                                      code="filter_required")

        def delete(conn):
            ids = conn.execute(sa.select(completions.c.id).where(*_filters(model, metadata, api_key_name))
                               ).scalars().all()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                conn.execute(completion_metadata.delete().where(completion_metadata.c.completion_id.in_(chunk)))
                conn.execute(completions.delete().where(completions.c.id.in_(chunk)))
            return len(ids)

        return StoredCompletionsDeleted(deleted=self.db.write_sync(delete))
