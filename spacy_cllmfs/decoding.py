"""Batched greedy decoding: shared prefixes, rows that leave, rows that join.

A request is a `PromptGroup`: a prefix shared by several prompts (for NER, the
chat header and the sentence, shared by all labels) and the per-prompt
suffixes. The prefix is computed once per group, its KV cache is repeated for
the group's rows, and only the suffixes are prefilled per row. Decoding then
runs one forward pass per step for all rows in flight, like `model.generate`,
with three differences that matter for NER prompts:
- a row leaves the batch (and the KV cache) as soon as its answer ends, so a
  "no entity" answer costs one step instead of the longest answer's length;
- with `refill`, waiting groups are prefilled and merged into the running
  batch as soon as it has room, so the device does not idle on a few long
  answers (continuous batching); the batch is bounded by a row count and a
  token budget, not by a number of prompts;
- an optional per-row constraint restricts the next token.
Groups are admitted longest first, so that batches carry little padding.

`generate` is the unshared path: every prompt its own group, fixed batches.
"""
import inspect
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence

import torch

from . import batching


class Constraint(Protocol):
    """What decoding needs from a constraint (see `constraints.CopyConstraint`)."""

    @property
    def done(self) -> bool: ...

    def allowed(self) -> List[int]: ...

    def bias(self) -> Optional[List[float]]: ...

    def advance(self, token: int) -> None: ...


@dataclass
class Generation:
    """The generated ids of one prompt (end token excluded), their log-probabilities,
    and whether the answer ended before the token budget ran out."""

    ids: List[int]
    logprobs: List[float]
    finished: bool


@dataclass
class PromptGroup:
    """Prompts that start with the same ids.

    prefix (List[int]): The shared ids (may be empty).
    suffixes (List[List[int]]): The rest of each prompt (each non-empty).
    """

    prefix: List[int]
    suffixes: List[List[int]]

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


@dataclass
class DecodingStats:
    """Counters for benchmarks: forward passes, rows x steps computed, tokens generated,
    prompt tokens computed in prefill (a shared prefix counts once), and prompt tokens
    as the model reads them (a shared prefix counts once per prompt)."""

    forward_passes: int = 0
    row_steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prompt_tokens_read: int = 0

    def add(self, other: "DecodingStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Running:
    """The rows in flight: their KV cache, attention mask, last positions and logits."""

    rows: List[int]
    cache: Any
    mask: torch.Tensor
    last_pos: torch.Tensor
    logits: torch.Tensor
    steps: List[int] = field(default_factory=list)


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
    """Greedy decoding of many prompts in fixed batches, without prefix sharing.

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
    groups = [PromptGroup([], [list(p)]) for p in prompts]
    return generate_groups(
        model,
        groups,
        end_id=end_id,
        pad_id=pad_id,
        max_new_tokens=max_new_tokens,
        max_rows=batch_size,
        max_tokens=None,
        refill=False,
        constraints=constraints,
        stats=stats,
    )


def generate_groups(
    model: Any,
    groups: Sequence[PromptGroup],
    *,
    end_id: int,
    pad_id: int,
    max_new_tokens: int = 128,
    max_rows: int = 64,
    max_tokens: Optional[int] = 8192,
    refill: bool = True,
    constraints: Optional[Sequence[Constraint]] = None,
    stats: Optional[DecodingStats] = None,
) -> List[Generation]:
    """Greedy decoding of prompt groups whose prefix is computed once per group.

    groups (Sequence[PromptGroup]): The prompts, as shared prefixes and suffixes.
    max_rows (int): The most prompts in flight at once.
    max_tokens (Optional[int]): The most prompt tokens prefilled in one forward pass
        (prefix tokens count once, padding included); None for no limit. A group
        larger than the budget is still prefilled, alone.
    refill (bool): Admit waiting groups while others decode (else: fixed batches). Only
        for caches of plain growing tensors (`batching.can_merge`); others get fixed batches.
    constraints (Optional[Sequence[Constraint]]): One per prompt, in the order of
        the groups' suffixes, or None for free decoding.
    RETURNS (List[Generation]): One per prompt, in the order of the groups' suffixes.
    Other arguments as for `generate`.
    """
    n_rows = sum(len(g.suffixes) for g in groups)
    if constraints is not None and len(constraints) != n_rows:
        raise ValueError(f"{len(constraints)} constraints for {n_rows} prompts.")
    if max_rows < 1 or max_new_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError("max_rows (batch_size), max_tokens and max_new_tokens must be >= 1.")
    groups, first_row = _chunks(groups, max_rows)
    decoder = _Decoder(model, end_id, pad_id, max_new_tokens, constraints, stats)
    order = sorted(range(len(groups)), key=lambda g: (-_width(groups[g]), g))
    pending: Deque[int] = deque(g for g in order if groups[g].suffixes)
    running: Optional[_Running] = None
    while pending or running is not None:
        room = max_rows - (len(running.rows) if running is not None else 0)
        if pending and (running is None or (refill and room >= max(1, max_rows // 2))):
            admitted = _admit(groups, pending, room, max_tokens, must_take=running is None)
            if admitted:
                fresh = decoder.prefill([groups[g] for g in admitted], [first_row[g] for g in admitted])
                running = fresh if running is None else decoder.merge(running, fresh)
                # sliding-window and other special caches cannot take rows in flight
                refill = refill and batching.can_merge(running.cache)
        if running is not None:
            running = decoder.step(running)
    return decoder.results(n_rows)


def first_logprobs(
    model: Any,
    groups: Sequence[PromptGroup],
    tokens: Sequence[int],
    *,
    pad_id: int,
    max_rows: int = 64,
    max_tokens: Optional[int] = 8192,
) -> torch.Tensor:
    """Log-probabilities of some tokens as the first generated token of each prompt:
    prefill only (shared prefixes computed once), no decoding.

    tokens (Sequence[int]): The token ids to score.
    RETURNS (torch.Tensor): (n_prompts, len(tokens)) float32 on the CPU, rows in the
        order of the groups' suffixes.
    """
    n_rows = sum(len(g.suffixes) for g in groups)
    chunks, first_row = _chunks(groups, max_rows)
    decoder = _Decoder(model, -1, pad_id, 1, None, None)
    pending: Deque[int] = deque(sorted(range(len(chunks)), key=lambda g: (-_width(chunks[g]), g)))
    index = torch.tensor(list(tokens), device=decoder.device)
    out = torch.zeros(n_rows, len(tokens))
    while pending:
        admitted = _admit(chunks, pending, max_rows, max_tokens, must_take=True)
        run = decoder.prefill([chunks[g] for g in admitted], [first_row[g] for g in admitted])
        scores = torch.log_softmax(run.logits.float(), dim=-1)[:, index].cpu()
        out[torch.tensor(run.rows)] = scores
    return out


def _chunks(groups: Sequence[PromptGroup], max_rows: int) -> "tuple[List[PromptGroup], List[int]]":
    """Cut groups to at most `max_rows` rows. RETURNS: the chunks and each one's first row."""
    chunks: List[PromptGroup] = []
    first_row: List[int] = []
    row = 0
    for group in groups:
        if any(len(s) == 0 for s in group.suffixes):
            raise ValueError("Every prompt needs at least one token after its shared prefix.")
        for start in range(0, len(group.suffixes), max_rows):
            chunks.append(PromptGroup(group.prefix, group.suffixes[start : start + max_rows]))
            first_row.append(row + start)
        row += len(group.suffixes)
    return chunks, first_row


def _width(group: PromptGroup) -> int:
    return len(group.prefix) + max((len(s) for s in group.suffixes), default=0)


def _admit(
    groups: Sequence[PromptGroup], pending: Deque[int], rows: int, max_tokens: Optional[int], must_take: bool
) -> List[int]:
    """Take groups off `pending` while their rows fit in `rows` and their padded prefill
    fits `max_tokens`. With `must_take` (nothing is running) the first group is taken
    even if it alone exceeds the token budget."""
    admitted: List[int] = []
    n_rows = prefix_w = suffix_w = 0
    while pending:
        group = groups[pending[0]]
        new_rows = n_rows + len(group.suffixes)
        new_prefix_w = max(prefix_w, len(group.prefix))
        new_suffix_w = max(suffix_w, max(len(s) for s in group.suffixes))
        tokens = (len(admitted) + 1) * new_prefix_w + new_rows * new_suffix_w
        over = new_rows > rows or (max_tokens is not None and tokens > max_tokens)
        if over and (admitted or not must_take):
            break
        admitted.append(pending.popleft())
        n_rows, prefix_w, suffix_w = new_rows, new_prefix_w, new_suffix_w
        if over:
            break
    return admitted


class _Decoder:
    """The forward passes and the per-row bookkeeping of `generate_groups`."""

    def __init__(
        self,
        model: Any,
        end_id: int,
        pad_id: int,
        max_new_tokens: int,
        constraints: Optional[Sequence[Constraint]],
        stats: Optional[DecodingStats],
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.end_id, self.pad_id, self.max_new_tokens = end_id, pad_id, max_new_tokens
        self.constraints = constraints
        self.stats = stats if stats is not None else DecodingStats()
        self.cache_key = cache_kwarg(model)
        self.generated: Dict[int, List[int]] = {}
        self.logprobs: Dict[int, List[float]] = {}
        self.finished: Dict[int, bool] = {}

    def forward(self, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache", None)
        if cache is not None:
            kwargs[self.cache_key] = cache
        self.stats.forward_passes += 1
        with torch.inference_mode():
            return self.model(use_cache=True, **kwargs)

    def prefill(self, groups: Sequence[PromptGroup], first_rows: Sequence[int]) -> _Running:
        """Compute the groups' prefixes once, repeat their cache for each suffix, and
        compute the suffixes: the rows are then ready for their first step."""
        rows = [first + j for group, first in zip(groups, first_rows) for j in range(len(group.suffixes))]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group.suffixes], device=self.device)
        prefix_ids, prefix_mask = batching.left_pad([g.prefix for g in groups], self.pad_id)
        prefix_ids, prefix_mask = prefix_ids.to(self.device), prefix_mask.to(self.device)
        cache = None
        if prefix_ids.shape[1]:
            out = self.forward(
                input_ids=prefix_ids,
                attention_mask=prefix_mask,
                position_ids=batching.positions(prefix_mask),
                logits_to_keep=1,
            )
            cache = cache_of(out)
            batching.select(cache, owner)
            self.stats.prompt_tokens += int(prefix_mask.sum())
        suffixes = [s for g in groups for s in g.suffixes]
        suffix_ids, suffix_mask = batching.left_pad(suffixes, self.pad_id)
        suffix_ids, suffix_mask = suffix_ids.to(self.device), suffix_mask.to(self.device)
        prefix_mask = prefix_mask[owner]
        start = prefix_mask.sum(-1)
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        out = self.forward(
            input_ids=suffix_ids,
            attention_mask=mask,
            position_ids=batching.positions(suffix_mask, start),
            logits_to_keep=1,
            cache=cache,
        )
        self.stats.prompt_tokens += int(suffix_mask.sum())
        self.stats.prompt_tokens_read += int(mask.sum())
        self.stats.row_steps += len(rows)
        for row in rows:
            self.generated[row], self.logprobs[row], self.finished[row] = [], [], False
        return _Running(
            rows=rows,
            cache=cache_of(out),
            mask=mask,
            last_pos=start + suffix_mask.sum(-1) - 1,
            logits=out.logits[:, -1, :],
            steps=[0] * len(rows),
        )

    def merge(self, running: _Running, fresh: _Running) -> _Running:
        """Append the rows of a fresh prefill to the running batch."""
        width = max(running.mask.shape[1], fresh.mask.shape[1])
        batching.merge(running.cache, fresh.cache)
        return _Running(
            rows=running.rows + fresh.rows,
            cache=running.cache,
            mask=torch.cat([batching.pad_mask_to(running.mask, width), batching.pad_mask_to(fresh.mask, width)]),
            last_pos=torch.cat([running.last_pos, fresh.last_pos]),
            logits=torch.cat([running.logits, fresh.logits]),
            steps=running.steps + fresh.steps,
        )

    def step(self, run: _Running) -> Optional[_Running]:
        """Choose each row's next token, let finished rows leave, and compute the next
        logits of the others. RETURNS (Optional[_Running]): The rows left, or None."""
        constraints = [self.constraints[r] for r in run.rows] if self.constraints is not None else None
        tokens, token_logprobs = _choose(run.logits, constraints)
        keep: List[int] = []
        for i, (row, token, logprob) in enumerate(zip(run.rows, tokens, token_logprobs)):
            run.steps[i] += 1
            if constraints is not None:
                constraints[i].advance(token)
            if token == self.end_id or (constraints is not None and constraints[i].done):
                self.finished[row] = True
                continue
            self.generated[row].append(token)
            self.logprobs[row].append(logprob)
            if run.steps[i] < self.max_new_tokens:
                keep.append(i)
        self.stats.generated_tokens += len(run.rows)
        if not keep:
            return None
        if len(keep) < len(run.rows):
            index = torch.tensor(keep, device=self.device)
            batching.select(run.cache, index)
            mask = run.mask[index]
            leading = int((mask.sum(0) == 0).long().cumprod(0).sum())
            if leading and batching.can_merge(run.cache):
                batching.trim(run.cache, leading)
                mask = mask[:, leading:]
            run = _Running(
                rows=[run.rows[i] for i in keep],
                cache=run.cache,
                mask=mask,
                last_pos=run.last_pos[index],
                logits=run.logits,
                steps=[run.steps[i] for i in keep],
            )
            tokens = [tokens[i] for i in keep]
        run.mask = torch.cat([run.mask, run.mask.new_ones((len(run.rows), 1))], dim=1)
        run.last_pos = run.last_pos + 1
        out = self.forward(
            input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
            attention_mask=run.mask,
            position_ids=run.last_pos.unsqueeze(1),
            cache=run.cache,
        )
        self.stats.row_steps += len(run.rows)
        run.cache = cache_of(out)
        run.logits = out.logits[:, -1, :]
        return run

    def results(self, n_rows: int) -> List[Generation]:
        return [Generation(self.generated[r], self.logprobs[r], self.finished[r]) for r in range(n_rows)]


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
        biases = [c.bias() for c in constraints]
        if any(b is not None for b in biases):
            offsets = [b + [0.0] * (width - len(b)) if b is not None else [0.0] * width for b in biases]
            scores = scores + torch.tensor(offsets, device=logits.device, dtype=scores.dtype)
        best = index.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    chosen = logp.gather(1, best.unsqueeze(1)).squeeze(1)
    return best.tolist(), chosen.tolist()


_CACHE_KWARGS: Dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The forward() argument for the KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (older releases)."""
    cls = type(model)
    if cls not in _CACHE_KWARGS:
        params = inspect.signature(model.forward).parameters
        _CACHE_KWARGS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARGS[cls]


def cache_of(outputs: Any) -> Any:
    """The KV cache of a forward pass's outputs (`cache` or `past_key_values`)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
