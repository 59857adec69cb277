import math

import pytest
import torch
import torch.nn.functional as F

from spacy_cllmfs.losses import IGNORE_INDEX, ContrastiveTargets, contrastive_loss, fgm_delta, lm_loss


def hidden_with(vectors):
    """One row of hidden states whose positions hold the given vectors."""
    return torch.tensor([vectors], dtype=torch.float32)


E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def test_lm_loss_only_counts_labelled_positions():
    logits = torch.randn(2, 4, 7)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 2], labels[1, 3] = 5, 1
    expected = F.cross_entropy(torch.stack([logits[0, 2], logits[1, 3]]), torch.tensor([5, 1]))
    assert lm_loss(logits, labels).item() == pytest.approx(expected.item())
    assert lm_loss(logits, torch.full((2, 4), IGNORE_INDEX)).item() == 0.0


def test_infonce_is_small_when_boundaries_match_the_anchor():
    # position 0 = anchor, 1-2 = positives (same direction), 3-4 = negatives (orthogonal)
    hidden = hidden_with([E1, E1, [2.0, 0.0, 0.0], E2, E3])
    targets = [[ContrastiveTargets(anchor=[0], positives=[1, 2], negatives=[3, 4])]]
    good = contrastive_loss(hidden, targets, temperature=0.1).item()
    assert good == pytest.approx(math.log(1 + 2 * math.exp(-10)), rel=1e-3)
    swapped = [[ContrastiveTargets(anchor=[0], positives=[3, 4], negatives=[1, 2])]]
    bad = contrastive_loss(hidden, swapped, temperature=0.1).item()
    assert bad == pytest.approx(-math.log(math.exp(0) / (math.exp(0) + 2 * math.exp(10))), rel=1e-4)


def test_infonce_matches_the_formula_with_a_mean_anchor():
    hidden = hidden_with([E1, E2, [1.0, 1.0, 0.0], E3, [1.0, 0.0, 1.0]])
    targets = [[ContrastiveTargets(anchor=[0, 1], positives=[2], negatives=[3, 4])]]
    anchor = F.normalize(torch.tensor([0.5, 0.5, 0.0]), dim=0)
    sim = lambda v: float(F.normalize(torch.tensor(v), dim=0) @ anchor)  # noqa: E731
    t = 0.5
    pos, negs = sim([1.0, 1.0, 0.0]), [sim(E3), sim([1.0, 0.0, 1.0])]
    expected = -math.log(math.exp(pos / t) / (math.exp(pos / t) + sum(math.exp(n / t) for n in negs)))
    assert contrastive_loss(hidden, targets, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_centering_removes_a_shared_direction():
    """States that share a big common component look alike to the cosine; centering
    on their mean makes the loss see the directions that tell them apart."""
    common = torch.tensor([10.0, 0.0, 0.0, 0.0])
    vectors = [[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    hidden = (torch.tensor(vectors) + common).unsqueeze(0)
    targets = [[ContrastiveTargets(anchor=[0], positives=[1], negatives=[2, 3])]]
    plain = contrastive_loss(hidden, targets, temperature=0.1).item()
    centered = contrastive_loss(hidden, targets, temperature=0.1, center=True).item()
    assert plain == pytest.approx(math.log(3), abs=0.1)  # all cosines ~1: no signal
    mean = torch.cat([hidden[0, :1], hidden[0, 1:2], hidden[0, 2:4]]).mean(0)
    states = F.normalize(hidden[0] - mean, dim=-1)
    sims = states[1:] @ states[0]
    expected = -torch.log_softmax(sims / 0.1, dim=0)[0].item()
    assert centered == pytest.approx(expected, rel=1e-5) and centered < 0.1
    # the mean of a shifted copy is shifted too: centering ignores any shared offset
    shifted = contrastive_loss(hidden + 5.0, targets, temperature=0.1, center=True).item()
    assert shifted == pytest.approx(centered, rel=1e-4)


def test_pairwise_loss_as_in_baner():
    hidden = hidden_with([E1, E1, E1, E2, E2])
    targets = [[ContrastiveTargets(anchor=[0], positives=[1, 2], negatives=[3, 4])]]
    value = contrastive_loss(hidden, targets, kind="pairwise").item()
    assert value == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))), rel=1e-5)
    with pytest.raises(ValueError, match="Unknown contrastive loss"):
        contrastive_loss(hidden, targets, kind="triplet")


def test_rows_without_targets_are_skipped_and_gradients_flow():
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    targets = [[], [ContrastiveTargets(anchor=[0], positives=[1], negatives=[2, 3])], []]
    loss = contrastive_loss(hidden, targets)
    loss.backward()
    assert hidden.grad[0].abs().sum() == 0 and hidden.grad[2].abs().sum() == 0
    assert hidden.grad[1, :4].abs().sum() > 0 and hidden.grad[1, 4].abs().sum() == 0
    assert contrastive_loss(hidden, [[], [], []]).item() == 0.0


def test_fgm_delta_has_norm_epsilon_per_sequence():
    grad = torch.randn(2, 3, 4)
    delta = fgm_delta(grad, 0.5)
    assert delta.flatten(1).norm(dim=1).tolist() == pytest.approx([0.5, 0.5], rel=1e-5)
    assert torch.allclose(F.normalize(delta.flatten(1), dim=1), F.normalize(grad.flatten(1), dim=1), atol=1e-6)
