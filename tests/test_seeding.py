import torch

from spacy_cllmfs.seeding import seeded_torch


def test_a_seeded_block_draws_the_same_whatever_came_before_and_leaves_the_stream_as_it_was():
    draws = []
    for history in (1, 2):
        torch.manual_seed(history)
        before = torch.get_rng_state()
        with seeded_torch(7):
            draws.append(torch.rand(4))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(draws[0], draws[1])
    with seeded_torch(8):
        assert not torch.equal(torch.rand(4), draws[0])
