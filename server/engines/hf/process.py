"""Process reward models in transformers: each layout of server/process_reward.py as a body and a
step head, read at the step tokens.

The Qwen2.5-Math-PRM layout is implemented here (as vLLM does), so its checkpoint's own modeling
code never runs. The trainers use these modules too: a PRM is trained with the read-out it is
served with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    PreTrainedModel,
    Qwen2Config,
    Qwen2Model,
    Qwen2PreTrainedModel,
)

from server.checkpoints import loading, torch_dtype
from server.engines.hf.models import (
    FROM_PRETRAINED,
    HFRewardModel,
    hidden_rows,
    load_reward_weights,
    score_head,
)
from server.failures import CheckpointError
from server.process_reward import DEFAULT_AGGREGATE, StepLayout, aggregate, step_probability
from server.reward import Reward, RewardModelInfo


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2.5-Math-PRM's architecture: a Qwen2 body, and a head Linear(h, h) -> ReLU -> Linear(h, 2)
    applied at every position (the step tokens are picked afterwards)."""

    base_model_prefix = "model"

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, config.num_labels or 2)
        )
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Returns (B, T, num_labels) logits."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.score(hidden)


class ShepherdHead(torch.nn.Module):
    """A causal LM's output layer read at two tokens: (..., H) -> (..., 2) logits of [bad, good].

    It keeps the LM head's weights (training moves them); only the two rows are computed."""

    def __init__(self, lm_head: torch.nn.Linear, bad_id: int, good_id: int):
        super().__init__()
        self.lm_head, self.rows = lm_head, [bad_id, good_id]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.lm_head.bias[self.rows] if self.lm_head.bias is not None else None
        return torch.nn.functional.linear(hidden, self.lm_head.weight[self.rows], bias)


def step_head(model: PreTrainedModel, layout: StepLayout) -> torch.nn.Module:
    """What turns a hidden state into the layout's step logits, whose last column is "good"."""
    if layout.layout == "shepherd":
        lm_head = model.get_output_embeddings()
        if not isinstance(lm_head, torch.nn.Linear) or layout.good_id is None or layout.bad_id is None:
            raise CheckpointError(f"{type(model).__name__} has no linear output layer to read + and - from")
        return ShepherdHead(lm_head, layout.bad_id, layout.good_id)
    head = score_head(model)
    if head is None:
        raise CheckpointError(f"{type(model).__name__} has no score/classifier head")
    return head


class StepLogits(torch.nn.Module):
    """A PRM's step logits at every position: the trainer's module (one module, so a distributed
    wrapper synchronises the body and the head)."""

    def __init__(self, model: PreTrainedModel, layout: StepLayout):
        super().__init__()
        self.model, self.head = model, step_head(model, layout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Args: input_ids, attention_mask (B, T), right-padded. Returns (B, T, labels) float32."""
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state  # (B, T, H)
        return self.head(hidden).float()


@dataclass
class HFProcessRewardModel:
    """A PRM's weights in transformers, read at each input's step tokens."""

    info: RewardModelInfo
    model: PreTrainedModel

    def __post_init__(self):
        assert self.info.steps is not None
        self.layout = self.info.steps
        self.read_out = StepLogits(self.model, self.layout)

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @torch.inference_mode()
    def score_steps(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's step scores, in order: one per step token it holds."""
        rows = hidden_rows(self.model.base_model, inputs)
        scores = []
        for ids, row in zip(inputs, rows, strict=True):
            at = [t for t, token in enumerate(ids) if token == self.layout.step_id]
            logits = self.read_out.head(row[at]).float().tolist()  # (steps, labels)
            scores.append([step_probability(step) for step in logits])
        return scores

    def score(self, inputs: list[list[int]]) -> list[float]:
        """One reward per input, the default aggregate of its steps (what the trainers rank by)."""
        return [aggregate(steps, DEFAULT_AGGREGATE) for steps in self.score_steps(inputs)]

    def rewards(self, inputs: list[list[int]]) -> list[Reward]:
        """The engine's reading: each input's step scores; its value is the last step's until the
        service aggregates them by the request's rule."""
        read = self.score_steps(inputs)
        return [Reward(steps[-1] if steps else float("nan"), steps=steps) for steps in read]


def load_process_weights(info: RewardModelInfo, device: str, dtype: str) -> HFProcessRewardModel:
    assert info.steps is not None
    layout, weights_dtype = info.steps.layout, torch_dtype(dtype)
    model: PreTrainedModel
    with loading("process reward model", info.path), FROM_PRETRAINED:
        if layout == "qwen":
            model = Qwen2ForProcessRewardModel.from_pretrained(info.path, dtype=weights_dtype)
        elif layout == "shepherd":
            model = AutoModelForCausalLM.from_pretrained(info.path, dtype=weights_dtype)
        else:
            model = AutoModelForTokenClassification.from_pretrained(info.path, dtype=weights_dtype)
    # transformers types `.to` through a decorator that hides its signature.
    return HFProcessRewardModel(info, model.to(device).eval())  # type: ignore[arg-type]


def load_any_reward_weights(
    info: RewardModelInfo, device: str, dtype: str
) -> HFRewardModel | HFProcessRewardModel:
    """A reward model's weights, whichever kind its directory holds (outcome or process)."""
    if info.steps is not None:
        return load_process_weights(info, device, dtype)
    return load_reward_weights(info, device, dtype)
