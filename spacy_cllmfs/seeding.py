"""Seeded torch randomness for a training stage.

LoRA's initialisation and its dropout draw from torch's global generators, so a
stage that does not seed them trains differently depending on what ran before it
in the process: the science shot stage from a saved general adapter scored dev
ents_f 53.7 at step 26 when the general stage had run in the same process and
57.0 in a fresh one (Qwen2.5-Coder-1.5B, bf16, CPU, same data and settings; the
generator's state is the difference known between the two).
`seeded_torch` makes a stage depend on its seed alone and leaves the caller's
random streams as they were.
"""
import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator and those of the visible CUDA devices
    forked and seeded with `seed`; restore them when the block ends.

    seed (int): The seed.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


__all__ = ("seeded_torch",)
