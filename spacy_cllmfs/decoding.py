"""Batched greedy decoding in which finished rows leave the batch.

`generate()` runs one padded forward pass per batch of prompts and one per
decoding step, like `model.generate`, with two differences that matter for
NER prompts: a row leaves the batch (and the KV cache) as soon as its answer
ends, so a "no entity" answer costs one step instead of the longest answer's
length; and an optional per-row constraint restricts the next token.
Prompts are sorted by length so that batches carry little padding.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch


class Constraint(Protocol):
    """What decoding needs from a constraint (see `constraints.CopyConstraint`)."""

    @property
    def done(self) -> bool: ...

    def allowed(self) -> List[int]: ...

    def advance(self, token: int) -> None: ...


@dataclass
class Generation:
    """The generated ids of one prompt (end token excluded), their log-probabilities,
    and whether the answer ended before the token budget ran out."""

    ids: List[int]
    logprobs: List[float]
    finished: bool


@dataclass
class DecodingStats:
    """Counters for benchmarks: forward passes, rows x steps computed, tokens generated."""

    forward_passes: int = 0
    row_steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0

    def add(self, other: "DecodingStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    end_id: int,
    pad_id: int,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    constraints: Optional[Sequence[Constraint]] = None,
    stats: Optional[DecodingStats] = None,
) -> List[Generation]:
    """Greedy decoding of many prompts, in batches.

    model: A Hugging Face causal LM.
    prompts (Sequence[Sequence[int]]): Token ids of each prompt.
    end_id (int): The token that ends an answer.
    pad_id (int): The id used for left padding (masked out).
    max_new_tokens (int): The most tokens an answer may have.
    batch_size (int): The most prompts in one forward pass.
    constraints (Optional[Sequence[Constraint]]): One per prompt, or None for free decoding.
    stats (Optional[DecodingStats]): Counters to add to.
    RETURNS (List[Generation]): One per prompt, in the order of `prompts`.
    """
    if constraints is not None and len(constraints) != len(prompts):
        raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1.")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: List[Optional[Generation]] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        batch_constraints = [constraints[i] for i in rows] if constraints is not None else None
        generations = _generate_batch(
            model,
            [prompts[i] for i in rows],
            batch_constraints,
            end_id=end_id,
            pad_id=pad_id,
            max_new_tokens=max_new_tokens,
            stats=stats,
        )
        for i, generation in zip(rows, generations):
            results[i] = generation
    return [r for r in results if r is not None]


@torch.inference_mode()
def _generate_batch(
    model: Any,
    prompts: List[Sequence[int]],
    constraints: Optional[List[Constraint]],
    *,
    end_id: int,
    pad_id: int,
    max_new_tokens: int,
    stats: Optional[DecodingStats],
) -> List[Generation]:
    device = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        if len(ids):
            input_ids[r, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[r, width - len(ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_key = _cache_kwarg(model)
    outputs = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    if stats is not None:
        stats.forward_passes += 1
        stats.prompt_tokens += int(mask.sum())
        stats.row_steps += n
    cache = _get_cache(outputs)
    logits = outputs.logits[:, -1, :]
    last_pos = positions[:, -1]
    active = list(range(n))  # batch row -> prompt index
    generated: List[List[int]] = [[] for _ in range(n)]
    logprobs: List[List[float]] = [[] for _ in range(n)]
    finished = [False] * n
    for step in range(max_new_tokens):
        tokens, token_logprobs = _choose(logits, [constraints[i] for i in active] if constraints else None)
        keep: List[int] = []
        for row, (i, token, logprob) in enumerate(zip(active, tokens, token_logprobs)):
            if constraints is not None:
                constraints[i].advance(token)
            if token == end_id or (constraints is not None and constraints[i].done):
                finished[i] = True
                continue
            generated[i].append(token)
            logprobs[i].append(logprob)
            keep.append(row)
        if stats is not None:
            stats.generated_tokens += len(active)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            active = [active[row] for row in keep]
            tokens = [tokens[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        last_pos = last_pos + 1
        outputs = model(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            attention_mask=mask,
            position_ids=last_pos.unsqueeze(1),
            use_cache=True,
            **{cache_key: cache},
        )
        if stats is not None:
            stats.forward_passes += 1
            stats.row_steps += len(active)
        cache = _get_cache(outputs)
        logits = outputs.logits[:, -1, :]
    return [Generation(generated[r], logprobs[r], finished[r]) for r in range(n)]


def _choose(logits: torch.Tensor, constraints: Optional[List[Constraint]]) -> "tuple[List[int], List[float]]":
    """Pick the most likely (allowed) next token of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if constraints is None:
        best = logp.argmax(dim=-1)
    else:
        allowed = [c.allowed() for c in constraints]
        width = max(len(a) for a in allowed)
        index = torch.tensor([a + [a[0]] * (width - len(a)) for a in allowed], device=logits.device)
        valid = torch.tensor([[True] * len(a) + [False] * (width - len(a)) for a in allowed], device=logits.device)
        scores = logp.gather(1, index).masked_fill(~valid, float("-inf"))
        best = index.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    chosen = logp.gather(1, best.unsqueeze(1)).squeeze(1)
    return best.tolist(), chosen.tolist()


_CACHE_KWARGS: Dict[type, str] = {}


def _cache_kwarg(model: Any) -> str:
    """The forward() argument for the KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (older releases)."""
    cls = type(model)
    if cls not in _CACHE_KWARGS:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARGS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARGS[cls]


def _get_cache(outputs: Any) -> Any:
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
