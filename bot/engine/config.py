"""Every engine option and its default, in one place: what ``create_engine`` builds an engine from.

The field names are the environment variables (upper case) that ``bot.config.load_engine_config`` reads;
``ENGINE`` picks the backend. Options of one backend given to the other are an error naming them, never
silently ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from finetune.model import EMBEDDED_DEFAULT, Quantization

LOCAL_ONLY = ("base_model", "quantization", "dtype", "max_batch", "prefix_cache_mb", "cuda_graphs", "fused_kernels")
OPENAI_ONLY = ("openai_base_url", "openai_api_key", "request_extra", "request_retries", "request_backoff_s", "connect_timeout_s",
               "read_timeout_s")

DType = Literal["auto", "bfloat16", "float16", "float32"]


class EngineConfig(BaseModel):
    """How replies are generated: the embedded ``local`` engine, or an ``openai``-compatible server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["local", "openai"] = Field("local", description="which backend generates the replies")
    base_model: str | None = Field(
        None, description=f"local: the base to serve (default '{EMBEDDED_DEFAULT}', the embedded SmolLM2); "
        "openai: the server says which base it serves, and bundles are checked against that")
    max_context: int | None = Field(None, gt=0, description="prompt + reply tokens per request; default: the "
                                    "model's own limit (local) or the server's max_model_len (openai)")
    # local engine
    quantization: Quantization = Field("auto", description="auto: the 16-bit base when it fits, else NF4")
    dtype: DType = Field("auto", description="compute dtype of the base; auto: bf16 where supported")
    max_batch: int = Field(8, gt=0, description="requests decoded together; more wait for a slot")
    prefix_cache_mb: int = Field(1024, ge=0, description="finished replies' KV kept for reuse (0: off)")
    cuda_graphs: bool = Field(True, description="replay decode steps as CUDA graphs on a GPU")
    fused_kernels: bool | Literal["auto"] = Field(
        "auto", description="Liger's kernels; auto = on a GPU with liger-kernel installed")
    # openai engine
    openai_base_url: str | None = Field(None, description="the API root with /v1, e.g. http://127.0.0.1:8000/v1")
    openai_api_key: SecretStr | None = None
    request_extra: dict[str, Any] = Field(
        {}, description='fields added to every completion request as given, e.g. {"ignore_eos": true} for a '
        "benchmark (JSON in the environment)")
    request_retries: int = Field(4, ge=0, description="retries of a request that failed before any text")
    request_backoff_s: float = Field(0.5, ge=0, description="first retry delay, doubled each time")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0, description="longest silence allowed while streaming")

    @field_validator("dtype", mode="before")
    @classmethod
    def _torch_dtype(cls, value: Any) -> Any:
        """Code may pass a ``torch.dtype`` (``torch.float32`` -> "float32") without this module importing torch."""
        return str(value).removeprefix("torch.") if type(value).__name__ == "dtype" else value

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> EngineConfig:
        foreign = LOCAL_ONLY if self.engine == "openai" else OPENAI_ONLY
        given = [name.upper() for name in foreign if name in self.model_fields_set]
        if given:
            other = "local" if self.engine == "openai" else "openai"
            raise ValueError(f"{', '.join(given)}: only used by ENGINE={other}, but ENGINE={self.engine} "
                             "(remove it, or change ENGINE)")
        if self.engine == "openai" and not self.openai_base_url:
            raise ValueError("ENGINE=openai needs OPENAI_BASE_URL, the server's API root "
                             "(e.g. http://127.0.0.1:8000/v1)")
        return self
