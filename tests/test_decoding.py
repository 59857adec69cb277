import pytest
import spacy
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spacy_cllmfs.alignment import locate
from spacy_cllmfs.constraints import CopyConstraint
from spacy_cllmfs.decoding import DecodingStats, generate
from spacy_cllmfs.labels import LabelInfo
from spacy_cllmfs.prompts import PromptBuilder, prompt_v1

LABELS = [LabelInfo("person", "person", "names of people"), LabelInfo("location", "location", "places")]
TEXTS = [
    "Barack Obama visited Paris.",
    "Angela Merkel met Marie Curie in Geneva and New York with Obama.",
    "Hi.",
    "The Labour Party won the 1997 general election in the United Kingdom.",
]


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    builder = PromptBuilder(prompt_v1(), tokenizer)
    nlp = spacy.blank("en")
    pieces = [builder.word_pieces(nlp(t)[:]) for t in TEXTS]
    prompts = [p for ps in pieces for p in builder.build(ps, LABELS)]
    owners = [ps for ps in pieces for _ in LABELS]
    return model, tokenizer, builder, prompts, owners


def run(setup, constrained, **kwargs):
    model, tokenizer, builder, prompts, _ = setup
    fmt = builder.format
    constraints = [CopyConstraint(p, fmt) for p in prompts] if constrained else None
    return generate(model, [p.ids for p in prompts], end_id=fmt.end_id, pad_id=tokenizer.pad_token_id,
                    constraints=constraints, **kwargs)


def test_free_decoding_matches_transformers_generate(setup):
    model, tokenizer, builder, prompts, _ = setup
    ours = run(setup, False, max_new_tokens=12, batch_size=3)
    for prompt, generation in zip(prompts, ours):
        reference = model.generate(
            torch.tensor([prompt.ids]), max_new_tokens=12, do_sample=False,
            eos_token_id=builder.format.end_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt.ids):].tolist()
        if builder.format.end_id in reference:
            reference = reference[: reference.index(builder.format.end_id)]
        assert generation.ids == reference


def test_batched_equals_one_by_one(setup):
    for constrained in (False, True):
        batched = run(setup, constrained, max_new_tokens=16, batch_size=8)
        single = run(setup, constrained, max_new_tokens=16, batch_size=1)
        assert [g.ids for g in batched] == [g.ids for g in single]
        for a, b in zip(batched, single):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_constrained_answers_always_parse_to_input_spans(setup):
    _, _, builder, prompts, owners = setup
    free = run(setup, False, max_new_tokens=16)
    # the random model's free output is junk: not a single well-formed span
    assert not any(builder.format.parse_text(builder.decode(g.ids)) for g in free)
    constrained = run(setup, True, max_new_tokens=64)
    n_spans = 0
    for generation, pieces in zip(constrained, owners):
        assert generation.finished
        text = builder.decode(generation.ids)
        spans = builder.format.parse_ids(generation.ids, generation.logprobs, builder.decode)
        assert text.count(builder.format.span_open.strip()) == len(spans)
        for span in spans:
            assert 0.0 < span.score <= 1.0
            located = locate(pieces, span.text)
            assert located.ranges and not located.expanded
        n_spans += len(spans)
    assert n_spans > 0


def test_finished_rows_leave_the_batch(setup):
    _, _, builder, prompts, _ = setup
    stats = DecodingStats()
    generations = run(setup, True, max_new_tokens=64, batch_size=len(prompts), stats=stats)
    lengths = [len(g.ids) + 1 for g in generations]  # + the end token
    # every row is computed for exactly as many steps as its answer is long
    assert stats.row_steps == sum(lengths)
    assert stats.forward_passes == max(lengths)
    assert stats.row_steps < len(prompts) * max(lengths)


def test_budget_cuts_answers_and_flags_them(setup):
    generations = run(setup, False, max_new_tokens=3)
    assert all(len(g.ids) <= 3 for g in generations)
    assert any(not g.finished for g in generations)


def test_argument_errors(setup):
    model, tokenizer, builder, prompts, _ = setup
    with pytest.raises(ValueError, match="constraints"):
        generate(model, [prompts[0].ids], end_id=1, pad_id=0, constraints=[])
    with pytest.raises(ValueError, match=">= 1"):
        generate(model, [prompts[0].ids], end_id=1, pad_id=0, batch_size=0)


def groups_of(prompts, n_labels):
    """Split each sentence's prompts at their shared prefix."""
    from spacy_cllmfs.decoding import PromptGroup

    groups = []
    for i in range(0, len(prompts), n_labels):
        chunk = prompts[i : i + n_labels]
        shared = chunk[0].shared_len
        assert all(p.ids[:shared] == chunk[0].ids[:shared] for p in chunk)
        groups.append(PromptGroup(chunk[0].ids[:shared], [p.ids[shared:] for p in chunk]))
    return groups


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("max_rows,max_tokens,refill", [(64, None, False), (3, None, True), (5, 60, True), (2, 1, False)])
def test_shared_prefix_equals_unshared(setup, constrained, max_rows, max_tokens, refill):
    from spacy_cllmfs.decoding import generate_groups

    model, tokenizer, builder, prompts, _ = setup
    fmt = builder.format
    unshared = run(setup, constrained, max_new_tokens=16, batch_size=4)
    stats = DecodingStats()
    shared = generate_groups(
        model, groups_of(prompts, len(LABELS)), end_id=fmt.end_id, pad_id=tokenizer.pad_token_id,
        max_new_tokens=16, max_rows=max_rows, max_tokens=max_tokens, refill=refill, stats=stats,
        constraints=[CopyConstraint(p, fmt) for p in prompts] if constrained else None,
    )
    assert [g.ids for g in shared] == [g.ids for g in unshared]
    assert [g.finished for g in shared] == [g.finished for g in unshared]
    for a, b in zip(shared, unshared):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # the prefix is computed once per sentence, not once per label
    assert stats.prompt_tokens == sum(len(p.ids) for p in prompts) - sum(
        p.shared_len for p in prompts[1::2]
    )
    assert stats.prompt_tokens_read == sum(len(p.ids) for p in prompts)


class EndsAfter:
    """A constraint that makes a row's answer exactly `n` tokens long (then the end token)."""

    def __init__(self, n, token, end_id):
        self.n, self.token, self.end_id, self.steps, self.done = n, token, end_id, 0, False

    def allowed(self):
        return [self.end_id] if self.steps >= self.n else [self.token]

    def bias(self):
        return None

    def advance(self, token):
        self.steps += 1
        self.done = token == self.end_id


def test_batches_respect_rows_and_token_budget_and_refill(setup):
    """No forward pass holds more rows than max_rows; a prefill of several groups stays
    within max_tokens; with refill, waiting groups join as rows finish, so fewer steps
    decode the same tokens."""
    from spacy_cllmfs.decoding import generate_groups

    model, tokenizer, builder, prompts, _ = setup
    fmt = builder.format
    prompts = prompts * 3
    groups = groups_of(prompts, len(LABELS))
    lengths = [1 + (7 * i) % 11 for i in range(len(prompts))]
    shapes, results = [], {}
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        for refill in (False, True):
            shapes.clear()
            generations = generate_groups(
                model, groups, end_id=fmt.end_id, pad_id=tokenizer.pad_token_id, max_new_tokens=16,
                max_rows=6, max_tokens=500, refill=refill,
                constraints=[EndsAfter(n, 50, fmt.end_id) for n in lengths])
            assert [len(g.ids) for g in generations] == lengths and all(g.finished for g in generations)
            assert max(rows for rows, _ in shapes) <= 6
            prefills = [(rows, width) for rows, width in shapes if width > 1]
            # prefix passes (one row per group), suffix passes (one row per label): within the
            # budget unless a single group is over it alone
            assert all(rows * width <= 500 or rows <= len(LABELS) for rows, width in prefills)
            assert any(rows > len(LABELS) for rows, width in prefills)
            results[refill] = [rows for rows, width in shapes if width == 1]
    finally:
        handle.remove()
    assert sum(results[True]) == sum(results[False])  # the same rows x steps are decoded
    assert len(results[True]) < len(results[False])  # in fewer, fuller steps
