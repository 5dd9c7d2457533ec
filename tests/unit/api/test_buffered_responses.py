"""The send wrapper the rewriting middlewares share: selected responses are held whole, the others pass through."""

from __future__ import annotations

import asyncio

from starlette.types import Message

from api.buffered_responses import rewriting, with_length


def run(messages: list[Message]) -> tuple[list[Message], list[tuple[int, bytes]]]:
    sent: list[Message] = []
    rewritten: list[tuple[int, bytes]] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def rewrite(start: Message, body: bytes) -> None:
        rewritten.append((start["status"], body))

    async def main() -> None:
        wrapped = rewriting(send, lambda status: status >= 400, rewrite)
        for message in messages:
            await wrapped(message)

    asyncio.run(main())
    return sent, rewritten


def test_a_selected_response_is_handed_over_whole_once_its_last_chunk_arrives() -> None:
    sent, rewritten = run([
        {"type": "http.response.start", "status": 404, "headers": []},
        {"type": "http.response.body", "body": b'{"a":', "more_body": True},
        {"type": "http.response.body", "body": b"1}"},
    ])
    assert sent == [] and rewritten == [(404, b'{"a":1}')]


def test_other_responses_pass_through_untouched() -> None:
    messages = [{"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": b"ok"}]
    sent, rewritten = run(messages)
    assert sent == messages and rewritten == []


def test_with_length_replaces_the_length_and_drops_what_is_asked() -> None:
    headers = [(b"Content-Length", b"3"), (b"content-type", b"text/plain"), (b"x-request-id", b"r")]
    assert with_length(headers, b"12345", b"content-type") == [(b"x-request-id", b"r"), (b"content-length", b"5")]
