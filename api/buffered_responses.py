"""ASGI send wrappers: one that holds back a whole response to rewrite it (the error schema, the completed OpenAPI
document), one that tells whether a response has started (an error can be answered only before)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Message, Send

Rewrite = Callable[[Message, bytes], Awaitable[None]]
"""Sends the response anew from its start message and its whole body."""


def rewriting(send: Send, selects: Callable[[int], bool], rewrite: Rewrite) -> Send:
    """A `send` that passes responses through, except those whose status `selects`: these are buffered and handed,
    start message and whole body, to `rewrite` once their last chunk arrives."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def send_or_hold(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and selects(message["status"]):
            start = message
            return
        if start is None:
            await send(message)
            return
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await rewrite(start, b"".join(chunks))

    return send_or_hold


def with_length(headers: list[tuple[bytes, bytes]], body: bytes, *dropped: bytes) -> list[tuple[bytes, bytes]]:
    """`headers` without content-length (and `dropped`), then the length of `body`."""
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", *dropped)]
    return [*kept, (b"content-length", str(len(body)).encode())]


class ObservedSend:
    """A `send` that remembers whether the response has started: until then an error can still be answered."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)
