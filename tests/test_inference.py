import pytest

from spacy_cllmfs.batching import common_prefix_length
from spacy_cllmfs.inference import WindowPrompts, common_prefix_groups, in_prompt_order, prefill_tokens, prompt_groups
from spacy_cllmfs.prompts import Prompt


def prompt(header, label_part, sentence, answer_start, label):
    ids = header + label_part + sentence + answer_start
    start = len(header) + len(label_part)
    return Prompt(ids=ids, label=label, shared_len=len(header), word_spans=[(start, start + len(sentence))],
                  label_positions=[], sentence_start=start)


def tasks(n_windows, label_len, sentence_len, labels=("a", "b")):
    result = []
    for w in range(n_windows):
        sentence = [100 + w] * sentence_len
        prompts = [prompt([1, 2], [10 + i] * label_len, sentence, [3], label) for i, label in enumerate(labels)]
        result.append(WindowPrompts(w, None, [], prompts))
    return result


def test_long_label_parts_are_shared_across_windows():
    batch = tasks(n_windows=6, label_len=20, sentence_len=5)
    groups, rows = prompt_groups(batch, max_rows=8)
    # per label, in groups of max_rows // 2 rows: the label's instruction is computed once per group
    assert [len(g.suffixes) for g in groups] == [4, 2, 4, 2]
    assert groups[0].prefix == [1, 2] + [10] * 20 and groups[2].prefix == [1, 2] + [11] * 20
    assert rows == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]  # all as long: in order
    flat = [p for t in batch for p in t.prompts]
    suffixes = [s for g in groups for s in g.suffixes]
    assert [g.prefix + s for g in groups for s in g.suffixes] == [flat[i].ids for i in rows]
    assert in_prompt_order(suffixes, rows) == [p.ids[22:] for p in flat]
    assert prefill_tokens(groups, 8) == 4 * 22 + 12 * 6


def test_sentence_first_prompts_are_shared_per_window():
    batch = []
    for w in range(3):
        sentence = [100 + w] * 30
        prompts = [
            Prompt(ids=[1, 2] + sentence + [10 + i, 3], label=label, shared_len=32, word_spans=[(2, 32)],
                   label_positions=[32], sentence_start=2)
            for i, label in enumerate("ab")
        ]
        batch.append(WindowPrompts(w, None, [], prompts))
    groups, rows = prompt_groups(batch, max_rows=8)
    assert [g.prefix for g in groups] == [[1, 2] + [100 + w] * 30 for w in range(3)]
    assert rows == list(range(6))


def test_prefill_tokens_count_a_prefix_per_max_rows():
    batch = tasks(n_windows=1, label_len=1, sentence_len=1, labels=tuple("abcde"))
    groups, _ = prompt_groups(batch, max_rows=2)
    assert prefill_tokens(groups, 2) == 3 * 2 + 5 * 3


def test_a_label_group_holds_prompts_of_similar_length():
    batch = []
    for w, n in enumerate([9, 1, 8, 2]):
        prompts = [prompt([1], [10] * 30, [100 + w] * n, [3], "a")]
        batch.append(WindowPrompts(w, None, [], prompts))
    groups, rows = prompt_groups(batch, max_rows=4)
    assert rows == [1, 3, 2, 0]
    assert [[len(s) for s in g.suffixes] for g in groups] == [[2, 3], [9, 10]]
    assert prefill_tokens(groups, 4) == 2 * 31 + 24 and prefill_tokens(groups, 4, padded=True) == 2 * 31 + 26


@pytest.mark.parametrize("n_windows", [0, 1])
def test_no_prompts_no_groups(n_windows):
    batch = [WindowPrompts(0, None, [], [])] * n_windows
    assert prompt_groups(batch, 4) == ([], [])


def test_common_prefix_groups_keep_a_token_in_every_suffix():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    (group,) = common_prefix_groups([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]])
    assert group.prefix == [1, 2] and group.suffixes == [[3, 4], [3, 5], [3]]
    (alone,) = common_prefix_groups([[7, 8, 9]])
    assert alone.prefix == [7, 8] and alone.suffixes == [[9]]
