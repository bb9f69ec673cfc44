"""Bot configuration: process settings from the environment / ``.env``, personas from a YAML or TOML file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from finetune.validation import describe

from .engine.config import EngineConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """Bad or missing configuration; the message names the file, persona or environment variable at fault."""


def _id_list(value: object) -> object:
    """Accept ``1,2,3`` from the environment as well as real lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_ENV = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)


class Settings(BaseSettings):
    """Process-wide settings; every field is an environment variable of the same name in upper case. The
    engine's own options are ``EngineConfig``'s (``load_engine_config``)."""

    model_config = _ENV

    personas_file: Path = Path("personas.yaml")
    discord_token: SecretStr | None = None
    adapters_dir: Path = Path("adapters")
    owner_ids: Annotated[list[int], NoDecode] = []
    command_guilds: Annotated[list[int], NoDecode] = []
    edit_interval: float = Field(1.2, gt=0, description="seconds between writes to one channel")
    edits_per_second: float = Field(20.0, gt=0, description="writes per second across the whole process")
    placeholder_after: float = Field(0.8, ge=0, description="post '…' if no text has arrived by then")
    generation_timeout: float = Field(120.0, gt=0, description="end a reply whose engine sends nothing this long")
    delivery_deadline: float = Field(
        120.0, gt=0, description="seconds a reply keeps retrying Discord's 429s and 5xx before it is logged lost")
    history_messages: int = Field(20, gt=0)
    history_chars: int = Field(6000, gt=0)
    converse_turns: int = Field(6, gt=0)
    converse_max_turns: int = Field(20, gt=0)
    converse_cooldown: float = Field(3.0, ge=0)
    converse_per_user: int = Field(1, gt=0, description="conversations one user may run at once")
    queue_limit: int = Field(5, gt=0, description="replies waiting per channel; more messages are skipped")
    user_queue_limit: int = Field(3, gt=0, description="replies one person may have waiting; more are skipped")
    reply_buttons: bool = Field(True, description="regenerate/continue buttons on each channel's latest reply")
    # state and memory (bot.state, bot.memory)
    state_db: Path = Field(Path("personabot.db"), description="the SQLite file resets, swaps, settings and memory "
                                                             "live in; created on first run")
    memory: bool = Field(True, description="keep past messages searchable; a guild admin can turn it off there")
    memory_chars: int = Field(1200, ge=0, description="characters of recalled memory in a prompt")
    memory_max_messages: int = Field(20_000, gt=0, description="messages kept per channel")
    memory_max_days: float = Field(180.0, gt=0, description="days a message is kept")
    memory_notes_after: int = Field(0, ge=0, description="write a note about a person every N of their "
                                                         "messages; 0: no notes")
    # group chat (bot.group)
    group_cap: int = Field(4, ge=0, description="bot-to-bot replies without a human message")
    group_decay: float = Field(0.6, gt=0, le=1, description="each bot-to-bot reply's chance is the last one's "
                                                            "times this")
    group_cooldown: float = Field(5.0, ge=0, description="seconds between two bot-to-bot replies in a channel")

    _ids = field_validator("owner_ids", "command_guilds", mode="before")(_id_list)


class _EngineEnv(BaseSettings, EngineConfig):
    """``EngineConfig`` read from the environment and ``.env``, like ``Settings``."""

    model_config = SettingsConfigDict(**_ENV, frozen=True)


def load_settings() -> Settings:
    """Settings from the environment and ``.env``; a bad value is an error naming its variable."""
    return _from_env(Settings)


def load_engine_config() -> EngineConfig:
    """The engine's options from the environment and ``.env``; a bad value is an error naming its variable."""
    return _from_env(_EngineEnv)


def _from_env(kind: type[BaseSettings]) -> Any:
    try:
        return kind()
    except ValidationError as exc:
        shown = describe(exc, label=lambda name, error: f"{name.upper()}={error.get('input')!r}")
        raise ConfigError(shown) from exc


class Rules(BaseModel):
    """Discord ids a persona's allow or block list matches."""

    model_config = ConfigDict(extra="forbid")

    users: list[int] = []
    roles: list[int] = []
    channels: list[int] = []


class PersonaSpec(BaseModel):
    """One persona: the adapter it serves and how it appears in Discord."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=80)
    adapter: Path = Field(description="adapter bundle folder, relative to the personas file")
    token_env: str | None = Field(None, description="env var holding this persona's bot token; unset: webhook mode")
    avatar: str | None = Field(None, description="avatar URL for webhook mode")
    channels: list[int] = Field([], description="channels where the persona answers every message")
    allow: Rules = Rules()
    block: Rules = Rules()

    @property
    def webhook(self) -> bool:
        return self.token_env is None

    def permits(self, user_id: int, role_ids: set[int], channel_ids: set[int]) -> bool:
        """Block lists win; a non-empty allow list of users/roles or of channels must then match."""
        if user_id in self.block.users or role_ids & set(self.block.roles) or channel_ids & set(self.block.channels):
            return False
        if (self.allow.users or self.allow.roles) and not (
            user_id in self.allow.users or role_ids & set(self.allow.roles)
        ):
            return False
        return not self.allow.channels or bool(channel_ids & set(self.allow.channels))


class _PersonasFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    personas: list[PersonaSpec] = Field(min_length=1)


def load_personas(path: str | Path) -> list[PersonaSpec]:
    """Read a YAML or TOML personas file; adapter paths become absolute, names must be unique."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: personas file not found (set PERSONAS_FILE)")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    try:
        personas = _PersonasFile.model_validate(data or {}).personas
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc)}") from exc
    seen: set[str] = set()
    for persona in personas:
        if persona.name.lower() in seen:
            raise ConfigError(f"{path}: persona '{persona.name}' is defined twice")
        seen.add(persona.name.lower())
        persona.adapter = (path.parent / persona.adapter).resolve()
    return personas


def select(personas: list[PersonaSpec], names: list[str] | None) -> list[PersonaSpec]:
    """The personas named on the command line (all when none are), or an error naming the unknown one."""
    if not names:
        return personas
    by_name = {p.name.lower(): p for p in personas}
    for name in names:
        if name.lower() not in by_name:
            known = ", ".join(p.name for p in personas)
            raise ConfigError(f"unknown persona '{name}' (the personas file defines: {known})")
    return [by_name[name.lower()] for name in names]


def persona_token(persona: PersonaSpec, settings: Settings) -> str:
    """The bot token a persona logs in with: its own variable, or DISCORD_TOKEN in webhook mode."""
    if persona.token_env is None:
        token = settings.discord_token.get_secret_value() if settings.discord_token else ""
        if not token.strip():
            raise ConfigError(f"persona '{persona.name}' uses webhook mode (no token_env), "
                              "but DISCORD_TOKEN is not set")
        return token.strip()
    env_file = settings.model_config.get("env_file")
    token = os.environ.get(persona.token_env) or (
        dotenv_values(env_file).get(persona.token_env) if env_file and Path(str(env_file)).is_file() else None
    )
    if not token or not token.strip():
        raise ConfigError(f"persona '{persona.name}': environment variable {persona.token_env} "
                          "(its bot token) is not set")
    return token.strip()
