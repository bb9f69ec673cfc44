"""`finetune data synth`: user simulator, filters, teachers, and the resumable, reproducible run."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from finetune.persona import load_persona
from finetune.synth.filters import ReplyFilter
from finetune.synth.run import add_source, synthesize
from finetune.synth.teacher import Generation, LocalTeacher, OpenAITeacher
from finetune.synth.users import KINDS, UserSimulator

VELL = Path(__file__).resolve().parents[1] / "persona_data" / "tinker_vell"


class ScriptedTeacher:
    """Replies built from the last user message; the first sample for some prompts is bad, as teachers are."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (prompts, seed)

    def complete(self, prompts, seed):
        self.calls.append((len(prompts), seed))
        out = []
        for p in prompts:
            last = p[-1]["content"] if p[-1]["role"] == "user" else p[-2]["content"]
            if "ai" in last.lower() and seed % 2 == 0:
                out.append("As an AI language model, I cannot pretend.")
            elif last.lower().startswith("why"):
                out.append("Because.")  # fails the style checks every time
            else:
                out.append(f"Tick-tock! About '{last}', sprocket: {seed % 97} gears. ⚙")
        return out


def persona_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "vell"
    shutil.copytree(VELL, folder)
    return folder


def test_user_simulator_covers_every_kind_reproducibly() -> None:
    lore = load_persona(VELL).card.lorebook
    users = UserSimulator("Vell", seed=1, lorebook=lore)
    openers = [users.opener(n) for n in range(len(KINDS))]
    assert [o.kind for o in openers] == list(KINDS)
    assert any(t in openers[0].text.lower() for t in ("moonclock", "moon clock", "guild", "pim", "spindle", "broken"))
    again = UserSimulator("Vell", seed=1, lorebook=lore)
    assert [again.opener(n) for n in range(5)] == openers
    assert [users.follow_up(3, t) for t in (1, 2)] == [again.follow_up(3, t) for t in (1, 2)]
    assert len({UserSimulator("Vell", seed=s).opener(1).text for s in range(20)}) > 3  # the seed matters


def test_filters_name_why_a_reply_is_rejected() -> None:
    f = ReplyFilter([r"\ATick-tock!", r"⚙\s*\Z"], ["User"])
    assert f.reject("Tick-tock! Fine, sprocket. ⚙") is None
    assert f.reject("Sure thing.") == "style checks"
    assert f.reject("Tick-tock! As an AI I must say no. ⚙") == "out of character"
    assert f.reject("Tick-tock! Yes. ⚙\nUser: and then?") == "wrote the user's lines"
    assert f.reject("") == "length"
    f.keep("Tick-tock! The moon clock stopped in the winter storm, sprocket. ⚙")
    assert f.reject("Tick-tock! The moon clock stopped in the winter storm, sprocket! ⚙") == "near-duplicate"


def test_synth_writes_filtered_dialogue_with_provenance(tmp_path: Path) -> None:
    folder = persona_copy(tmp_path)
    persona = load_persona(folder)
    out = folder / "synth.jsonl"
    report = synthesize(persona, ScriptedTeacher(), out, conversations=10, turns=3, seed=4, batch_size=4)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.written == len(records) == 10 - report.dropped and report.already == 0
    assert report.rejected["style checks"] > 0  # "why?" never gets a styled answer
    assert report.rejected["out of character"] > 0
    assert sum(report.openers.values()) == len(records)
    for record in records:
        assert record["synth"]["teacher"] == "scripted" and record["synth"]["seed"] == 4
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert replies and all(r.startswith("Tick-tock!") and r.endswith("⚙") for r in replies)
        assert record["messages"][-1]["role"] == "assistant"  # a rejected last reply takes its question along
    assert add_source(folder, out, "scripted", 4) and not add_source(folder, out, "scripted", 4)
    again = load_persona(folder)
    assert len(again.conversations) == len(persona.conversations) + len(records)


def test_synth_is_reproducible_and_resumes(tmp_path: Path) -> None:
    persona = load_persona(VELL)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    synthesize(persona, ScriptedTeacher(), full, conversations=8, turns=2, seed=9, batch_size=4)
    synthesize(persona, ScriptedTeacher(), part, conversations=4, turns=2, seed=9, batch_size=4)
    part.write_text(part.read_text() + '{"messages": [{"role": "us', encoding="utf-8")  # killed mid-write
    teacher = ScriptedTeacher()
    report = synthesize(persona, teacher, part, conversations=8, turns=2, seed=9, batch_size=4)
    assert report.already == 4 and report.written == 4
    assert part.read_text() == full.read_text()
    assert all(n <= 4 for n, _ in teacher.calls)  # batched: up to batch_size prompts per teacher call


def test_openai_teacher_speaks_the_chat_completions_api() -> None:
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": " Tick-tock! ⚙ "}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = OpenAITeacher(f"http://127.0.0.1:{server.server_port}/v1/", "big-model", Generation(50, 0.5))
        prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
        assert teacher.complete(prompts, seed=7) == ["Tick-tock! ⚙", "Tick-tock! ⚙"]
    finally:
        server.shutdown()
    assert {s["path"] for s in seen} == {"/v1/chat/completions"}
    assert sorted(s["seed"] for s in seen) == [7, 8] and {s["model"] for s in seen} == {"big-model"}
    assert {s["max_tokens"] for s in seen} == {50} and teacher.name.startswith("openai:big-model@")


def test_local_teacher_generates_a_batch(tiny_model_dir) -> None:
    teacher = LocalTeacher(str(tiny_model_dir), Generation(max_new_tokens=5, temperature=0.0), quantization="none")
    prompts = [[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
               [{"role": "user", "content": "a much longer message than the other one"}]]
    first = teacher.complete(prompts, seed=1)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert teacher.complete(prompts, seed=1) == first  # greedy: the same
