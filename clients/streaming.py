"""Streamed completions: `Stream` (sync) and `AsyncStream` mirror each other line for line.

Both read `data: {...}` events until `data: [DONE]`, yield one chunk model per event, raise the
mapped error for an error event and close the HTTP response when done, on error or on `close()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import httpx
from pydantic import BaseModel

from clients.base import Call, SSEDecoder

if TYPE_CHECKING:
    from clients.base import BaseIroClient

T = TypeVar("T", bound=BaseModel)


class Stream(Generic[T]):
    """Iterator of chunks (`ChatCompletionStreamResponse` or `CompletionStreamResponse`).

        with client.chat("Hi", stream=True) as stream:
            for chunk in stream:
                print(chunk.choices[0].delta.content or "", end="")
    """

    def __init__(self, client: BaseIroClient, call: Call, response: httpx.Response) -> None:
        self.response = response
        self._client = client
        self._call = call
        self._chunks = self._iter_chunks()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._chunks)

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and release the connection."""
        self._chunks.close()
        self.response.close()

    def _iter_chunks(self) -> Iterator[T]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                chunk = self._client._decode_event(self._call, data, self.response)
                if chunk is None:
                    return
                yield chunk
            data = decoder.flush()
            chunk = self._client._decode_event(self._call, data, self.response) if data else None
            if chunk is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise self._client._transport_error(exc, self.response.request) from exc
        finally:
            self.response.close()


class AsyncStream(Generic[T]):
    """Async iterator of chunks (`ChatCompletionStreamResponse` or `CompletionStreamResponse`).

        async with await client.chat("Hi", stream=True) as stream:
            async for chunk in stream:
                print(chunk.choices[0].delta.content or "", end="")
    """

    def __init__(self, client: BaseIroClient, call: Call, response: httpx.Response) -> None:
        self.response = response
        self._client = client
        self._call = call
        self._chunks = self._iter_chunks()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._chunks.__anext__()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        await self._chunks.aclose()
        await self.response.aclose()

    async def _iter_chunks(self) -> AsyncIterator[T]:
        decoder = SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                chunk = self._client._decode_event(self._call, data, self.response)
                if chunk is None:
                    return
                yield chunk
            data = decoder.flush()
            chunk = self._client._decode_event(self._call, data, self.response) if data else None
            if chunk is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise self._client._transport_error(exc, self.response.request) from exc
        finally:
            await self.response.aclose()
