"""The whole path with the real local engine: a persona trained in seconds answers in character on Discord."""
from __future__ import annotations

from fake_discord_harness import async_test, running

from bot.engine import EngineConfig, create_engine
from finetune.config import load_config
from finetune.train import train


@async_test
async def test_trained_persona_answers_in_character_through_discord(tiny_model_dir, tiny_persona, tmp_path):
    bundle = train(load_config(None, [
        f"persona={tiny_persona}", f"base_model={tiny_model_dir}",
        f"output_dir={tmp_path / 'bundle'}", "quantization=none", "data.max_seq_len=128", "train.batch_size=8",
        "train.learning_rate=5e-3", "train.epochs=4", "train.gradient_checkpointing=false",
    ]))
    engine = create_engine(EngineConfig(base_model=str(tiny_model_dir), quantization="none", max_batch=4))
    async with running(tmp_path, ("Brine",), engine=engine, bundles={"Brine": bundle}) as h:
        asks = [h.fake.post(h.alice, channel, f"{h.bots['Brine'].mention} tell me about the {topic}")
                for channel, topic in ((h.general, "storm"), (h.fake.add_channel("harbour"), "boat"))]
        await h.fake.wait_for(lambda: all(h.replies(ask) for ask in asks), timeout=60)
        await h.settled(timeout=60)
        replies = [h.replies(ask)[0]["content"] for ask in asks]
        assert all(reply.startswith("Arr,") for reply in replies), replies
        for topic, reply in zip(("storm", "boat"), replies):  # exactly what the engine says (greedy), no piece lost
            said = [{"role": "user", "content": f"Alice: @Brine tell me about the {topic}"}]
            assert reply == (await engine.complete("Brine", said)).strip()
