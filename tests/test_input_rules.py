"""The trainers build their inputs by the server's rules: a policy is fine-tuned on the prompt
tokens it is served, a reward model trained on the inputs it scores."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from server.admission import Admission, Limits, score_input
from server.policy import read_policy
from server.prompts import reward_input
from server.reward import read_reward_model
from trainers.data import SFTExample
from trainers.losses import IGNORE
from trainers.reward import encode_response
from trainers.sft import encode

PROMPTS = [
    "Q: what is 2 + 3?\nA:",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
]


def served_prompt(policy, prompt):
    """What the server's admission makes of a request's prompt (the completions or chat route)."""
    admission = Admission(Limits(8, 4096, 4, 8, 4096))
    try:
        if isinstance(prompt, str):
            [made] = asyncio.run(admission.text_prompts(policy, [prompt]))
        else:
            made = asyncio.run(admission.chat_prompt(policy, prompt))
    finally:
        admission.close()
    return made


@pytest.mark.parametrize("name", ["gpt2_policy", "llama_policy"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "chat"])
def test_sft_prompt_tokens_are_the_servers(models, name, prompt):
    policy = read_policy(models[name])
    trained = encode(AutoTokenizer.from_pretrained(models[name]), SFTExample(prompt, " 5"), max_length=256)
    prompt_part = [
        t for t, label in zip(trained["input_ids"], trained["labels"], strict=True) if label == IGNORE
    ]
    assert prompt_part == served_prompt(policy, prompt).token_ids
    assert len(prompt_part) < len(trained["input_ids"])  # and the answer follows it


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "chat"])
def test_reward_model_inputs_are_the_servers(models, prompt):
    """The RM trainer's base is the SFT policy, so policy and RM share a tokenizer, as here."""
    policy, rm = read_policy(models["llama_policy"]), read_reward_model(models["llama_rm"])
    assert policy.tokenizer.get_vocab() == rm.tokenizer.get_vocab()
    trained = encode_response(AutoTokenizer.from_pretrained(models["llama_rm"]), prompt, " 5", rm.max_length)
    # What the pipeline scores for a candidate " 5" of this request, and what /v1/score scores.
    served = reward_input(rm, served_prompt(policy, prompt), " 5")
    assert not served.truncated and trained == served.token_ids
    assert trained == score_input(rm, prompt, " 5", policy.tokenizer, "response", "response")
    # Over-long inputs keep their tail on both sides.
    long = " 5" * 400
    assert (
        encode_response(rm.tokenizer, prompt, long, rm.max_length)
        == reward_input(rm, served_prompt(policy, prompt), long).token_ids
    )
