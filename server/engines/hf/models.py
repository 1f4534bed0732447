"""Policy and reward-model weights as transformers modules: loading, and the reward read-out.

The trainers use these too (they may import the server's inference core), so a model is trained
with exactly the read-out it is served with.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from server.checkpoints import loading, torch_dtype
from server.engines.hf.prefix import hidden_with_shared_prefix, prefix_groups
from server.failures import CheckpointError
from server.policy import PolicyInfo, read_policy
from server.reward import Reward, RewardModelInfo, read_reward_model

log = logging.getLogger(__name__)

# from_pretrained switches module-global initialisation flags: two loads on two threads at once
# (the policy and the reward model at start-up) left a tied lm_head on the meta device.
FROM_PRETRAINED = threading.Lock()


def pad_right(inputs: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as (B, T) input_ids and attention mask, right-padded."""
    width = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(inputs), width), pad_id or 0, dtype=torch.long)  # pads are masked out
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, ids in enumerate(inputs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask


def hidden_rows(base_model: torch.nn.Module, inputs: list[list[int]]) -> list[torch.Tensor]:
    """Each input's last hidden states, (len(input), H): neighbours that share a long prefix (a
    prompt's candidates) run it once; the rest run as one right-padded batch."""
    rows: list[torch.Tensor | None] = [None] * len(inputs)
    alone: list[int] = []
    for group in prefix_groups(inputs):
        if not group.shared:
            alone += range(group.start, group.end)
            continue
        shared = hidden_with_shared_prefix(base_model, inputs[group.start : group.end], group.shared)
        rows[group.start : group.end] = shared
    if alone:
        device = next(base_model.parameters()).device
        input_ids, mask = pad_right([inputs[i] for i in alone], None)  # pads are masked out
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = base_model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
        ).last_hidden_state  # (B, T, H)
        for j, i in enumerate(alone):
            rows[i] = hidden[j, : len(inputs[i])]
    return [row for row in rows if row is not None]


def score_head(model: PreTrainedModel) -> torch.nn.Module | None:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class LastTokenReward(torch.nn.Module):
    """A sequence-classification model read at the last real token, whatever the padding side.

    A module of its own (not a function reaching into the model) so that a distributed wrapper
    (DDP/FSDP via accelerate) wraps the whole computation and gradients synchronise.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        head = score_head(model)
        if head is None:
            raise CheckpointError(f"{type(model).__name__} has no score/classifier head")
        self.model, self.head = model, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Args: input_ids (B, T); attention_mask (B, T), 1 on real tokens. Returns (B,) float32."""
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state  # (B, T, H)
        # The last real token is the rightmost 1 in the mask; the pad id plays no part, so a pad
        # token that also occurs in the text (pad == eos) cannot move the read-out.
        index = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        last = (attention_mask * index).argmax(-1)  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(picked).squeeze(-1).float()  # (B,)


@dataclass
class HFPolicy:
    """A policy's weights in transformers, with what decoding needs to know of it."""

    info: PolicyInfo
    model: PreTrainedModel

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.info.eos_ids


@dataclass
class HFRewardModel:
    """A reward model's weights in transformers, read at the last real token."""

    info: RewardModelInfo
    model: PreTrainedModel

    def __post_init__(self):
        self.read_out = LastTokenReward(self.model)

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @torch.inference_mode()
    def score(self, inputs: list[list[int]]) -> list[float]:
        """Raw logits for a batch of token-id lists, read at each one's last token."""
        rows = hidden_rows(self.model.base_model, inputs)
        last = torch.stack([row[-1] for row in rows])  # (B, H)
        return self.read_out.head(last).squeeze(-1).float().tolist()

    def rewards(self, inputs: list[list[int]]) -> list[Reward]:
        return [Reward(value) for value in self.score(inputs)]


def load_policy_weights(info: PolicyInfo, device: str, dtype: str) -> HFPolicy:
    with loading("policy", info.path), FROM_PRETRAINED:
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch_dtype(dtype))
    # transformers types `.to` through a decorator that hides its signature.
    return HFPolicy(info, model.to(device).eval())  # type: ignore[arg-type]


def load_reward_weights(info: RewardModelInfo, device: str, dtype: str) -> HFRewardModel:
    with loading("reward model", info.path), FROM_PRETRAINED:
        model = AutoModelForSequenceClassification.from_pretrained(info.path, dtype=torch_dtype(dtype))
    if model.config.pad_token_id is None and info.tokenizer.pad_token_id is not None:
        # Without it HF's own pooling reads the score at the wrong token (accuracy ~0.5 is the
        # symptom); our read-out does not use it, but saved and exported copies must be right.
        log.warning("reward model config has no pad_token_id; setting it to %s", info.tokenizer.pad_token_id)
        model.config.pad_token_id = info.tokenizer.pad_token_id
    return HFRewardModel(info, model.to(device).eval())


def load_policy(path: str | Path, device: str, dtype: str) -> HFPolicy:
    """Read and load a policy checkpoint in one step (what the trainers use)."""
    return load_policy_weights(read_policy(path), device, dtype)


def load_reward_model(path: str | Path, device: str, dtype: str):
    """Read, check and load a reward model in one step (what the trainers use): a process reward
    model's `score` is its steps' default aggregate (server/process_reward.py)."""
    from server.engines.hf.process import load_any_reward_weights  # it builds on this module

    return load_any_reward_weights(read_reward_model(path), device, dtype)
