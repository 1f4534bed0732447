"""Every serving flag in one place: `bon serve --flag` or the environment variable `BON_FLAG`.

Precedence: command line, then environment, then the defaults below.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.log.sources import shown as shown_location
from server.members import member_name, parse_weights


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BON_", extra="forbid")

    policy: Path = Field(description="HF causal-LM directory that samples the candidates.")
    # Repeatable; BON_REWARD_MODEL takes several, comma-separated.
    reward_model: Annotated[list[str], NoDecode] = Field(
        description="HF sequence-classification directory with one label, as NAME=DIR or DIR (named "
        "after the directory); give it again for each further reward model.",
    )
    reward_weights: str | None = Field(
        None, description="NAME=W,... weights of the reward members in mean and uwo (default 1 each)."
    )
    reward_combine: Literal["mean", "min", "uwo"] = Field(
        "mean",
        description="How several reward members make one reward: their (weighted) mean, their minimum, "
        "or uwo, the weighted mean minus --reward-uncertainty-penalty x their variance.",
    )
    reward_uncertainty_penalty: float = Field(
        1.0, ge=0, description="uwo's lambda: how much the members' disagreement costs."
    )
    reward_function: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A rule reward member NAME=module:callable, called as (prompt, completion, "
        "reference) -> float; JSON keyword arguments may follow the callable.",
    )
    reward_function_timeout_seconds: float = Field(
        5.0, gt=0, description="Time a reward function has for one prompt's candidates."
    )
    step_delimiter: str = Field(
        "\n\n",
        min_length=1,
        description="What ends a step of a completion, for process reward models and beam search.",
    )
    step_aggregate: Literal["last", "min", "prod", "mean"] = Field(
        "min",
        description="How a process reward model's step scores make one reward (a request may name another).",
    )
    served_model_name: str | None = Field(
        None, description="The `model` clients send; defaults to the policy directory's name."
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What samples the candidates: transformers, or vllm (bon[vllm])."
    )
    reward_engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What scores them: transformers, or vllm's pooling runner."
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N (transformers engine; vLLM picks its own).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto keeps the checkpoint's."
    )
    torch_threads: int = Field(
        0, ge=0, description="Intra-op CPU threads for torch; 0 means half the cores (server/threads.py)."
    )
    host: str = Field("127.0.0.1", description="Bind address; loopback unless asked otherwise.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    # Several keys allowed (rotation); BON_API_KEY takes them comma-separated.
    api_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer key(s) for /v1/* and /metrics; without one anyone who reaches the port may "
        "use the models (BON_API_KEY takes several, comma-separated).",
    )
    admin_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer key(s) for /admin/*; without one the admin API is off."
    )
    public_metrics: bool = Field(
        False, description="Serve /metrics without a key (for a scraper on a trusted network)."
    )
    open_reward_routes: bool = Field(
        False,
        description="Serve /get_reward, /classify and /pooling without a key (OpenRLHF's and verl's "
        "clients send none): only on a network where every caller may score.",
    )
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body; larger ones get 413 before being read."
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="Time a connection has to send a request's headers (64 KiB at most)."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Time a request has to send its body once its headers are in (408 past it)."
    )
    max_connections: int = Field(
        512, ge=1, description="Open connections at once; past it a new connection is closed at once."
    )
    watch: Path | None = Field(
        None, description="Serve the newest policy checkpoint published under this directory."
    )
    watch_interval_seconds: float = Field(
        5.0, gt=0, description="How often --watch looks for a new checkpoint."
    )
    max_best_of: int = Field(16, ge=1, description="Largest best_of a request may ask for.")
    max_batch_tokens: int = Field(
        16384, ge=1, description="Token budget of one batch: prompt once + best_of x max_tokens per prompt."
    )
    max_queued_prompts: int = Field(
        256,
        ge=1,
        description="Prompts waiting for the sampler (vLLM: in flight) beyond which requests get 429; "
        "a request with more prompts than this gets 400.",
    )
    batch_gather_ms: float = Field(
        20.0, ge=0, le=1000, description="How long an idle sampler waits for concurrent requests to batch."
    )
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none.")
    max_score_inputs: int = Field(
        256, ge=1, description="Most responses (or pairs) one /v1/score request may hold."
    )
    max_score_tokens: int = Field(
        262_144,
        ge=1,
        description="Most reward-model tokens one /v1/score request may hold, all inputs together.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.4,
        gt=0,
        le=1,
        description="GPU memory fraction of the vLLM policy engine. A reload starts the new engine "
        "beside the serving one, so keep it at most (1 - the reward engine's) / 2.",
    )
    vllm_reward_gpu_memory_utilization: float = Field(
        0.1, gt=0, le=1, description="GPU memory fraction of the vLLM reward engine (the same reload rule)."
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache of each vLLM engine in GiB, instead of the GPU fractions; on a CPU "
        "it defaults to 1 (vLLM's own default takes most of the machine's memory).",
    )
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs the vLLM policy engine shards each layer over (tensor parallelism)."
    )
    vllm_data_parallel_size: int = Field(
        1, ge=1, description="Copies of the vLLM policy engine it spreads requests over (data parallelism)."
    )
    vllm_reward_tensor_parallel_size: int = Field(
        1, ge=1, description="Tensor parallelism of each vLLM reward engine."
    )
    vllm_reward_data_parallel_size: int = Field(
        1, ge=1, description="Data parallelism of each vLLM reward engine."
    )
    vllm_engine_args: str = Field(
        "{}",
        description="Any other vLLM engine argument, as a JSON object of AsyncEngineArgs fields "
        '(e.g. \'{"max_num_seqs": 64, "quantization": "fp8"}\'), for the policy engine.',
    )
    vllm_reward_engine_args: str = Field("{}", description="The same, for each vLLM reward engine.")
    vllm_enforce_eager: bool = Field(
        False, description="vLLM without torch.compile or CUDA graphs: starts faster, steps slower."
    )
    sample_log: str = Field(
        "bon-samples.db",
        description="Where every candidate is logged: a SQLite file, or a PostgreSQL URL "
        "(postgresql://USER:PASSWORD@HOST/DB) that many replicas share.",
    )
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=128,
        description="This server's name in the candidate log, when many write one (default: host-pid).",
    )
    no_sample_log: bool = Field(False, description="Keep no candidate log.")
    sample_log_flush_seconds: float = Field(
        0.5, gt=0, le=1.0, description="Longest time a candidate waits to be committed."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Server log level.")

    @field_validator("reward_model", "reward_function", mode="before")
    @classmethod
    def _listed(cls, value):
        """One per flag on the command line; comma-separated in the environment."""
        if isinstance(value, str | Path):
            return [part.strip() for part in str(value).split(",") if part.strip()]
        return [str(v) for v in value]

    @field_validator("vllm_engine_args", "vllm_reward_engine_args")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error})") from None
        if not isinstance(parsed, dict):
            raise ValueError('a JSON object of vLLM engine arguments, e.g. {"max_num_seqs": 64}')
        if "model" in parsed:
            raise ValueError("model is bon's to set (--policy, --reward-model): leave it out")
        return value

    @model_validator(mode="after")
    def _members(self):
        """Member names are unique, and weights name members."""
        names = [name for name, _ in self.reward_models()] + [name for name, _ in self.reward_functions()]
        if duplicated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"reward member names must be unique; {', '.join(duplicated)} given twice")
        if unknown := sorted(set(self.weights()) - set(names)):
            raise ValueError(f"--reward-weights names {', '.join(unknown)}, not a reward member")
        if self.reward_engine == "vllm" and self.vllm_kv_cache_gib is None:
            # Each reward model is its own engine; memory is given out as explicit GPU shares.
            policy = self.vllm_gpu_memory_utilization if self.engine == "vllm" else 0.0
            total = policy + len(self.reward_model) * self.vllm_reward_gpu_memory_utilization
            if total > 1:
                raise ValueError(
                    f"the vLLM engines would take {total:.2f} of the GPU: the policy's "
                    f"--vllm-gpu-memory-utilization plus {len(self.reward_model)} reward models x "
                    "--vllm-reward-gpu-memory-utilization must stay at most 1"
                )
        return self

    def reward_models(self) -> list[tuple[str, Path]]:
        """(name, directory) of each --reward-model: NAME=DIR, or DIR named after itself."""
        return [member_name(value) for value in self.reward_model]

    def reward_functions(self) -> list[tuple[str, str]]:
        """(name, module:callable ...) of each --reward-function."""
        out = []
        for value in self.reward_function:
            name, equals, spec = value.partition("=")
            if not equals or not name.strip() or not spec.strip():
                raise ValueError(f"--reward-function {value!r}: expected NAME=module:callable")
            out.append((name.strip(), spec.strip()))
        return out

    def weights(self) -> dict[str, float]:
        """--reward-weights as {name: weight}."""
        return parse_weights(self.reward_weights)

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _split_keys(cls, value):
        """Comma-separated in the environment; one per flag on the command line. An empty key is
        refused: BON_API_KEY="" must not quietly mean "no authentication"."""
        keys = value.split(",") if isinstance(value, str) else list(value)
        keys = [key.strip() if isinstance(key, str) else key for key in keys]
        if any(key == "" for key in keys):
            raise ValueError("an empty key was given; leave the setting out to serve without keys")
        return keys

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.policy.resolve().name

    def redacted(self) -> dict:
        """The resolved configuration for the start-up log: keys shown as stars, never in clear."""
        shown = self.model_dump(mode="json")
        shown["api_key"] = ["***"] * len(self.api_key)
        shown["admin_key"] = ["***"] * len(self.admin_key)
        shown["sample_log"] = shown_location(self.sample_log)
        return shown
