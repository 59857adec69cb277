"""Padded batches and KV-cache surgery, shared by decoding and training.

Rows are left-padded, so that every row's last token sits in the last column:
the next-token logits of a batch are one slice, and new tokens are appended
as one column. Position ids count the real tokens of each row, so a padded
row computes exactly what it computes alone.

A shared prefix is computed once per group of rows and its KV cache is then
repeated across the group (`expand`); rows that finish leave the cache
(`select`); rows of a newly prefilled batch join a running one (`merge`, which
left-pads the narrower cache); columns that only hold padding are dropped
(`trim`). Merging and trimming are only possible for caches whose layers are
plain growing tensors (`DynamicLayer`): sliding-window and quantized caches
keep extra state, and `can_merge` says so.
"""
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into a (n, width) id tensor and its attention mask.

    rows (Sequence[Sequence[int]]): The token ids of each row.
    pad_id (int): The id written into padding (it is masked out).
    width (int): The least width (the longest row decides if it is longer).
    RETURNS (Tuple[torch.Tensor, torch.Tensor]): ids and mask, both long, on the CPU.
    """
    width = max([width] + [len(r) for r in rows])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        if len(row):
            ids[r, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[r, width - len(row) :] = 1
    return ids, mask


def common_prefix_length(first: Sequence[int], other: Sequence[int]) -> int:
    """RETURNS (int): How many leading token ids `first` and `other` share."""
    n, limit = 0, min(len(first), len(other))
    while n < limit and first[n] == other[n]:
        n += 1
    return n


def positions(mask: torch.Tensor, start: Any = 0) -> torch.Tensor:
    """Position ids for a left-padded mask: real tokens count up from `start`
    (a number or a per-row tensor); padding gets the first position (unused)."""
    counted = (mask.cumsum(-1) - 1).clamp(min=0)
    if isinstance(start, torch.Tensor):
        start = start.to(counted.device).unsqueeze(-1)
    return counted + start


def _layers(cache: Any) -> List[Any]:
    return list(getattr(cache, "layers", []) or [])


def can_merge(cache: Any) -> bool:
    """RETURNS (bool): Whether the cache's layers are plain growing key/value tensors,
    so that rows can be merged into it and padding columns trimmed from it."""
    layers = _layers(cache)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def select(cache: Any, index: torch.Tensor) -> None:
    """Keep (or repeat) the rows `index` of the cache, in that order."""
    cache.batch_select_indices(index)


def merge(first: Any, second: Any) -> Any:
    """Append the rows of `second` to `first` (both `can_merge`), left-padding the
    narrower one with zeros so that their last columns line up.

    RETURNS: `first`, holding both.
    """
    for a, b in zip(_layers(first), _layers(second)):
        if b.keys is None or b.keys.numel() == 0:
            continue
        if a.keys is None or a.keys.numel() == 0:
            a.keys, a.values = b.keys, b.values
            continue
        width = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = torch.cat([_pad_to(a.keys, width), _pad_to(b.keys, width)], dim=0)
        a.values = torch.cat([_pad_to(a.values, width), _pad_to(b.values, width)], dim=0)
    return first


def trim(cache: Any, columns: int) -> None:
    """Drop the first `columns` positions of every row (they must be padding)."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        if layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys[..., columns:, :]
            layer.values = layer.values[..., columns:, :]


def _pad_to(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing > 0 else states


def pad_mask_to(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a (rows, columns) attention mask with zeros to `width` columns."""
    missing = width - mask.shape[1]
    return F.pad(mask, (missing, 0)) if missing > 0 else mask
