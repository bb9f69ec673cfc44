"""EngineConfig: the one place engine options live, read from the environment like the bot's settings."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.config import ConfigError, load_engine_config
from bot.engine import EngineConfig


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment and working folder (no .env) for each test."""
    monkeypatch.chdir(tmp_path)
    for name in EngineConfig.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("ENGINE", raising=False)
    return monkeypatch


def test_defaults_and_environment(env, tmp_path):
    assert load_engine_config().model_dump() == EngineConfig().model_dump()
    (tmp_path / ".env").write_text("ENGINE=openai\nOPENAI_BASE_URL=http://127.0.0.1:8000/v1\nMAX_CONTEXT=\n")
    env.setenv("READ_TIMEOUT_S", "5")
    config = load_engine_config()
    assert (config.engine, config.openai_base_url, config.max_context, config.read_timeout_s) == (
        "openai", "http://127.0.0.1:8000/v1", None, 5.0)


@pytest.mark.parametrize("variables, problem", [
    ({"ENGINE": "openai", "OPENAI_BASE_URL": "http://h/v1", "QUANTIZATION": "nf4", "MAX_BATCH": "4"},
     "QUANTIZATION, MAX_BATCH: only used by ENGINE=local, but ENGINE=openai"),
    ({"OPENAI_BASE_URL": "http://h/v1"}, "OPENAI_BASE_URL: only used by ENGINE=openai, but ENGINE=local"),
    ({"ENGINE": "openai"}, "ENGINE=openai needs OPENAI_BASE_URL"),
    ({"MAX_BATCH": "0"}, "MAX_BATCH='0': Input should be greater than 0"),
    ({"ENGINE": "vllm"}, "ENGINE='vllm': Input should be 'local' or 'openai'"),
])
def test_bad_or_foreign_options_are_errors_naming_the_variable(env, variables, problem):
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_engine_config()
    assert problem in str(info.value)


def test_code_builds_it_directly():
    import torch

    assert EngineConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValidationError, match="PREFIX_CACHE_MB: only used by ENGINE=local"):
        EngineConfig(engine="openai", openai_base_url="http://h/v1", prefix_cache_mb=0)


def test_openai_takes_extra_request_fields_as_json_and_its_base_from_the_server(env):
    env.setenv("ENGINE", "openai")
    env.setenv("OPENAI_BASE_URL", "http://h/v1")
    env.setenv("REQUEST_EXTRA", '{"ignore_eos": true, "min_tokens": 64}')
    assert load_engine_config().request_extra == {"ignore_eos": True, "min_tokens": 64}
    env.setenv("BASE_MODEL", "smollm2")
    with pytest.raises(ConfigError, match="BASE_MODEL: only used by ENGINE=local, but ENGINE=openai"):
        load_engine_config()
