"""The OpenAI-compatible backend against a local streaming server on 127.0.0.1 (no network needed)."""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from bot.engine import EngineConfig, EngineError, create_engine
from bot.engine.openai import OpenAIEngine
from engine_fixtures import make_bundle, run
from finetune.bundle import Sampling

PIECES = ["Arr", ", the ", "tide ", "be ", "turnin'", " 🌊"]
HELLO = [{"role": "user", "content": "hello"}]


class FakeServer:
    """Speaks streaming ``/v1/chat/completions`` (SSE); can fail, stall or hang up on demand."""

    def __init__(self) -> None:
        self.models = {"brine"}
        self.fail: list[tuple[int, dict[str, str]]] = []
        self.stall_s = 0.0
        self.piece_delay_s = 0.01
        self.hang_up_after: int | None = None
        self.requests: list[tuple[dict, dict[str, str]]] = []
        self.disconnected = asyncio.Event()
        self.url = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((body, dict(request.headers)))
        if self.fail:
            status, headers = self.fail.pop(0)
            return web.json_response({"error": {"message": f"simulated {status}"}}, status=status, headers=headers)
        if body["model"] not in self.models:
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist."}},
                                     status=404)
        await asyncio.sleep(self.stall_s)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b": keep-alive\n\n")
            for i, piece in enumerate(PIECES):
                if i == self.hang_up_after:
                    request.transport.close()
                    return resp
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.piece_delay_s)
            await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


async def _serve(server: FakeServer) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    return runner


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory) -> Path:
    sampling = Sampling(temperature=0.7, top_p=0.95, top_k=40, repetition_penalty=1.1, max_new_tokens=64,
                        stop=["\nUser:"])
    return make_bundle(tiny_model_dir, tmp_path_factory.mktemp("openai") / "brine", seed=1, name="Brine",
                       sampling=sampling, system_prompt="You are Brine.")


def openai(url: str, **options) -> EngineConfig:
    return EngineConfig(engine="openai", openai_base_url=url, **options)


def _with_server(test, bundle: Path, **engine_kwargs):
    """Run ``test(engine, server)`` with a fresh server and an engine that has 'brine' loaded."""
    async def main():
        server = FakeServer()
        runner = await _serve(server)
        engine = OpenAIEngine(openai(server.url, **{"openai_api_key": "sk-test", "request_backoff_s": 0.01,
                                                   **engine_kwargs}))
        try:
            await engine.load_adapter("brine", bundle)
            return await test(engine, server)
        finally:
            await engine.close()
            await runner.cleanup()

    return run(main())


def test_streams_pieces_with_the_manifest_prompt_and_sampling(bundle):
    async def test(engine, server):
        pieces = [p async for p in engine.stream("brine", HELLO)]
        return pieces, server.requests, engine.active_requests

    pieces, requests, active = _with_server(test, bundle)
    assert pieces == PIECES and active == 0
    (body, headers), = requests
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "brine" and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "You are Brine."}, *HELLO]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop")} == {
        "max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1,
        "stop": ["\nUser:"]}


def test_retries_500_and_429_before_the_first_token(bundle):
    async def test(engine, server):
        server.fail = [(500, {}), (429, {"Retry-After": "0"}), (503, {})]
        return await engine.complete("brine", HELLO), len(server.requests)

    text, attempts = _with_server(test, bundle)
    assert text == "".join(PIECES) and attempts == 4


def test_gives_up_with_the_url_model_and_status(bundle):
    async def test(engine, server):
        server.fail = [(503, {})] * 10
        with pytest.raises(EngineError) as info:
            await engine.complete("brine", HELLO)
        return str(info.value), len(server.requests), server.url

    error, attempts, url = _with_server(test, bundle, request_retries=2)
    assert attempts == 3
    assert error == (f"{url}/chat/completions (model 'brine'): HTTP 503: simulated 503 "
                     "(gave up after 3 attempts)")


def test_client_errors_are_not_retried_and_quote_the_server(bundle):
    async def test(engine, server):
        server.models = set()
        with pytest.raises(EngineError, match=r"\(model 'brine'\): HTTP 404: The model `brine` does not exist"):
            await engine.complete("brine", HELLO)
        return len(server.requests)

    assert _with_server(test, bundle) == 1


def test_silence_past_the_read_timeout_is_an_error(bundle):
    async def test(engine, server):
        server.stall_s = 1.0
        with pytest.raises(EngineError, match=r"\(model 'brine'\): no data for 0.2 s"):
            await engine.complete("brine", HELLO)

    _with_server(test, bundle, read_timeout_s=0.2)


def test_connection_lost_mid_reply_is_not_retried(bundle):
    async def test(engine, server):
        server.hang_up_after = 2
        pieces = []
        with pytest.raises(EngineError, match="connection lost mid-reply"):
            async for piece in engine.stream("brine", HELLO):
                pieces.append(piece)
        return pieces, len(server.requests)

    pieces, attempts = _with_server(test, bundle)
    assert pieces == PIECES[:2] and attempts == 1


def test_errors_never_quote_credentials_in_the_base_url(bundle):
    async def main():
        engine = create_engine(openai("http://bob:hunter2@127.0.0.1:9/v1", request_retries=0))
        await engine.load_adapter("brine", bundle)
        try:
            with pytest.raises(EngineError) as info:
                await engine.complete("brine", HELLO)
        finally:
            await engine.close()
        return str(info.value)

    error = run(main())
    assert error.startswith("http://***@127.0.0.1:9/v1/chat/completions (model 'brine')") and "hunter2" not in error


def test_unreachable_server_is_retried_then_named(bundle):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        engine = create_engine(openai(f"http://127.0.0.1:{port}/v1", request_backoff_s=0.01))
        await engine.load_adapter("brine", bundle)
        try:
            with pytest.raises(EngineError) as info:
                await engine.complete("brine", HELLO)
        finally:
            await engine.close()
        return str(info.value)

    error = run(main())
    assert error.startswith(f"http://127.0.0.1:{port}/v1/chat/completions (model 'brine'): Cannot connect")
    assert error.endswith("(gave up after 5 attempts)")


def test_cancelling_the_consumer_closes_the_stream(bundle):
    async def test(engine, server):
        server.piece_delay_s = 0.2

        async def consume():
            async for _ in engine.stream("brine", HELLO):
                await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.disconnected.wait(), 2)
        return engine.active_requests

    assert _with_server(test, bundle) == 0


def test_bundles_for_another_base_are_refused_and_history_is_trimmed(bundle, tiny_model_dir):
    async def main():
        other = OpenAIEngine(openai("http://127.0.0.1:9/v1", base_model="meta-llama/Llama-3.1-8B-Instruct"))
        with pytest.raises(EngineError, match=r"trained on base model 'model', but http://127.0.0.1:9/v1 serves"):
            await other.load_adapter("brine", bundle)
        await other.close()

        async def test(engine, server):
            history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"the storm {i}"}
                       for i in range(41)]
            await engine.complete("brine", history)
            return history, server.requests[0][0]["messages"]

        return await asyncio.to_thread(_with_server, test, bundle, max_context=256,
                                       base_model=str(tiny_model_dir))

    history, sent = run(main())
    assert sent[0] == {"role": "system", "content": "You are Brine."}
    assert 1 < len(sent) - 1 < len(history) and sent[1:] == history[len(history) - len(sent) + 1:]
