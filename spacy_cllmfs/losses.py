"""Training losses: answer-only LM loss, boundary contrastive losses, FGM perturbation.

The contrastive losses work on the hidden states of one layer. For each prompt,
the anchor is the mean hidden state of the label's name in the instruction;
positives are the first and last token of each gold entity of that label in
the sentence; negatives are the tokens just outside those boundaries plus
other tokens outside the label's entities. Pulling boundary tokens towards
the label and pushing their neighbours away is what sharpens the boundaries.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CONTRASTIVE_LOSSES = ("infonce", "pairwise")
CONTRASTIVE_NEGATIVES = ("boundary", "other_types")


@dataclass
class ContrastiveTargets:
    """Positions (in one row of the batch) for the contrastive loss."""

    anchor: List[int]
    positives: List[int]
    negatives: List[int]

    def moved(self, place: Callable[[int], int]) -> "ContrastiveTargets":
        """RETURNS (ContrastiveTargets): The same targets at positions `place(p)`."""
        return ContrastiveTargets(
            anchor=[place(p) for p in self.anchor],
            positives=[place(p) for p in self.positives],
            negatives=[place(p) for p in self.negatives],
        )

    @property
    def usable(self) -> bool:
        """Whether the targets have an anchor, positives and negatives."""
        return bool(self.anchor and self.positives and self.negatives)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: Optional[float] = None) -> torch.Tensor:
    """Next-token cross-entropy where `labels` is not IGNORE_INDEX.

    logits (torch.Tensor): (batch, length, vocab) predictions for positions 0..length-1.
    labels (torch.Tensor): (batch, length) the token each position should predict
        (already shifted: labels[:, t] is the token at t + 1), or IGNORE_INDEX.
    normalizer (Optional[float]): Divide the summed loss by this (e.g. the number of
        answer tokens of a whole batch that is processed in micro-batches); None
        averages over the labelled positions given.
    RETURNS (torch.Tensor): A scalar (0 if nothing is to be predicted).
    """
    mask = labels != IGNORE_INDEX
    if not bool(mask.any()):
        return logits.sum() * 0.0
    total = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
    return total / (normalizer if normalizer is not None else int(mask.sum()))


def contrastive_loss(
    hidden: torch.Tensor,
    targets: Sequence[Sequence[ContrastiveTargets]],
    *,
    temperature: float = 0.1,
    kind: str = "infonce",
    normalizer: Optional[float] = None,
    center: bool = False,
) -> torch.Tensor:
    """Boundary contrastive loss over a batch.

    hidden (torch.Tensor): (batch, length, dim) hidden states of the chosen layer.
    targets (Sequence[Sequence[ContrastiveTargets]]): Per row, its groups of targets (one
        per label asked about in the row; none to skip the row).
    temperature (float): Softmax temperature of InfoNCE.
    kind (str): "infonce": each positive against all negatives of its row,
        -log(exp(s+/t) / (exp(s+/t) + sum exp(s-/t))) with cosine similarities s;
        "pairwise": BANER's -log sigmoid(sum s+ - sum s-).
    normalizer (Optional[float]): Divide the summed terms by this instead of their number.
    center (bool): Subtract the mean of the row's anchor, positive and negative states
        before the cosines (removes the direction all of them share).
    RETURNS (torch.Tensor): The mean loss over positives ("infonce") or groups
        ("pairwise"); 0 if no group has positives and negatives.
    """
    if kind not in CONTRASTIVE_LOSSES:
        raise ValueError(f"Unknown contrastive loss '{kind}'. Use one of {CONTRASTIVE_LOSSES}.")
    terms: List[torch.Tensor] = []
    for row, target in ((row, t) for row, groups in enumerate(targets) for t in groups if t.usable):
        states = hidden[row].float()
        anchor = states[target.anchor].mean(dim=0)
        chosen = [states[target.positives], states[target.negatives]]
        if center:
            mean = torch.cat([anchor.unsqueeze(0), *chosen]).mean(dim=0)
            anchor, chosen = anchor - mean, [vectors - mean for vectors in chosen]
        anchor = F.normalize(anchor, dim=-1)
        positives, negatives = (F.normalize(vectors, dim=-1) @ anchor for vectors in chosen)
        if kind == "infonce":
            logits = torch.cat(
                [positives.unsqueeze(1), negatives.unsqueeze(0).expand(len(positives), -1)], dim=1
            )
            zeros = torch.zeros(len(positives), dtype=torch.long, device=logits.device)
            terms.append(F.cross_entropy(logits / temperature, zeros, reduction="none"))
        else:
            terms.append(-F.logsigmoid(positives.sum() - negatives.sum()).unsqueeze(0))
    if not terms:
        return hidden.sum() * 0.0
    stacked = torch.cat(terms)
    return stacked.sum() / (normalizer if normalizer is not None else len(stacked))


def contrastive_terms(targets: Sequence[Sequence[ContrastiveTargets]], kind: str = "infonce") -> int:
    """RETURNS (int): How many terms `contrastive_loss` averages over for these targets."""
    usable = [t for groups in targets for t in groups if t.usable]
    return sum(len(t.positives) for t in usable) if kind == "infonce" else len(usable)


def fgm_delta(grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """FGM perturbation of input embeddings: epsilon * g / ||g||, per sequence.

    grad (torch.Tensor): (batch, length, dim) gradient of the loss w.r.t. the embeddings.
    RETURNS (torch.Tensor): The perturbation, detached.
    """
    flat = grad.detach().float().flatten(1)
    norms = flat.norm(dim=1).clamp_min(1e-12)
    return (epsilon * flat / norms.unsqueeze(1)).view_as(grad).to(grad.dtype)
