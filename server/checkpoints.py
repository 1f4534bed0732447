"""What the policy and the reward model have in common: identity, dtype, context length, weights.

Everything here reads a checkpoint's small files (config, tokenizer, safetensors headers), never
its weights, so the service can know a model without loading it twice beside an engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from server.failures import CheckpointError

log = logging.getLogger(__name__)

# What every freshly loaded model is test-run on (engine load probes, the server's warm-up).
PROBE_PROMPT, PROBE_COMPLETION = "Hello", " world"

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# What a RAFT run writes beside its checkpoint: version, parent, window, counts, evaluation.
MANIFEST = "raft_manifest.json"


def raft_manifest(path: Path) -> dict:
    """A checkpoint's RAFT manifest; {} when it has none (an SFT policy, a model from elsewhere)."""
    manifest = path / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def model_version(path: Path) -> str:
    """A short, stable identity of a checkpoint's files (names, sizes, modification times).

    A RAFT manifest's own version wins when present. Hashing the weights themselves would be exact
    but reads gigabytes at every start; a new checkpoint is a new directory anyway.
    """
    if version := raft_manifest(path).get("version"):
        return str(version)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def published_at(path: Path) -> float:
    """When a checkpoint was made: its RAFT manifest's time, else its directory's."""
    created = raft_manifest(path).get("created")
    return float(created) if isinstance(created, int | float) else path.stat().st_mtime


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint published under `directory` (what `--watch` serves and
    `bon retrain` trains from). Publishers write a hidden (dot) directory and rename it into
    place, so any visible subdirectory with a config.json is complete."""
    if not directory.is_dir():
        return None
    candidates = [
        p.resolve()
        for p in directory.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def context_length(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest sequence the model takes: its position limit, or the tokenizer's if smaller."""
    text_config = config.get_text_config()
    limits = [
        getattr(text_config, name, None) for name in ("max_position_embeddings", "n_positions", "seq_length")
    ]
    # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**7:
        limits.append(tokenizer.model_max_length)
    known = [int(n) for n in limits if n]
    if not known:
        raise CheckpointError(
            f"cannot tell the context length of {config.name_or_path}: set max_position_embeddings"
        )
    return min(known)


def max_text_chars(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> int:
    """Characters beyond which a text cannot fit in `max_tokens` tokens, so it can be refused
    without tokenizing it: no token covers more characters than its vocabulary entry has (byte-level
    entries have one character per byte)."""
    longest = max(len(entry) for entry in tokenizer.get_vocab())
    return max_tokens * longest


def checkpoint_dir(path: str | Path, role: str, flag: str, generates: bool = False) -> Path:
    """Resolve a local HF directory, naming the flag when it is not one (no hub is consulted).
    `generates`: the directory must be a model that generates text (what every policy flag takes),
    not a reward model or classifier: the one kind check every command shares."""
    resolved = Path(path).expanduser().resolve()
    if not (resolved / "config.json").is_file():
        raise CheckpointError(
            f"{role} {path!r} is not a Hugging Face model directory (no config.json); set {flag}"
        )
    if generates:
        try:
            architectures = json.loads((resolved / "config.json").read_text()).get("architectures") or []
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{role} {resolved}: config.json is not a JSON object ({error})") from None
        heads = [
            a for a in architectures if a.endswith(("ForSequenceClassification", "ForTokenClassification"))
        ]
        if heads:
            raise CheckpointError(
                f"{role} {resolved} is a {heads[0]} (a reward model or classifier), not a causal LM; "
                f"{flag} takes the model that generates, --reward-model the one that scores"
            )
    return resolved


def checkpoint_dtype(config: PretrainedConfig) -> str:
    """The dtype the checkpoint was saved in ("float32"...), which is what `--dtype auto` keeps."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return str(dtype).removeprefix("torch.")


def weight_names(directory: Path) -> set[str]:
    """The tensor names of a checkpoint, read from safetensors headers or indexes (not the weights).

    Raises CheckpointError when there are no weights or a weights file cannot be read.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
    if (directory / "model.safetensors").is_file():
        with safe_open(directory / "model.safetensors", framework="pt") as weights:
            return set(weights.keys())
    if (directory / "pytorch_model.bin").is_file():
        # mmap: the tensors are not read, only the pickle's index of them.
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
        return set(state)
    raise CheckpointError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")


def torch_dtype(name: str):
    if name not in DTYPES:
        raise CheckpointError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextmanager
def loading(role: str, path: Path) -> Iterator[None]:
    """Turn whatever a broken checkpoint raises (safetensors, JSON, shape errors...) into a
    CheckpointError naming the directory, so start-up and reload report it instead of crashing."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"could not load {role} {path}: {type(error).__name__}: {error}") from error


def pad_with_eos(tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    """A tokenizer without a pad token pads with eos: padding is masked out, so any id will do,
    and eos is the customary one. Set on the tokenizer, so every batch (server or trainer) agrees."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        log.warning("%s tokenizer has no pad token; padding with eos (%s)", role, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
