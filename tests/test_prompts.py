import pytest
import spacy
from transformers import AutoTokenizer

from spacy_cllmfs.labels import LabelInfo, default_description, default_name, label_infos
from spacy_cllmfs.prompts import PromptBuilder, PromptTemplate, prompt_v1

PERSON = LabelInfo("person", "person", "names of people")
LOCATION = LabelInfo("LOC", "location", "names of places")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return PromptBuilder(prompt_v1(), tokenizer)


@pytest.fixture(scope="module")
def nlp():
    return spacy.blank("en")


def test_prompt_text_follows_cllmfs(builder, nlp):
    doc = nlp("Barack Obama visited Paris.")
    prompt = builder.build(builder.word_pieces(doc[:]), [PERSON])[0]
    text = builder.decode(prompt.ids)
    assert "Please extract the entity of person in the input sentence given below, the entity of " \
        "person refers to names of people.\nInput sentence: Barack Obama visited Paris." in text
    assert text.endswith("I can extract entities for you, the extracted entities are")
    assert text.startswith("<|im_start|>user\n")


def test_word_spans_map_tokens_to_prompt_ids(builder, nlp):
    doc = nlp("Barack Obama's visit  to Zürich 😀!")
    pieces = builder.word_pieces(doc[:])
    prompt = builder.build(pieces, [PERSON])[0]
    assert len(prompt.word_spans) == len(doc)
    for token, piece, (start, end) in zip(doc, pieces, prompt.word_spans):
        assert builder.decode(prompt.ids[start:end]) == piece
        if token.is_space:
            assert start == end and piece == ""
        else:
            assert piece.strip() == token.text
    assert pieces[1] == " Obama" and pieces[2] == "'s"


def test_label_positions_and_shared_prefix(builder, nlp):
    doc = nlp("Angela Merkel met Marie Curie.")
    person, location = builder.build(builder.word_pieces(doc[:]), [PERSON, LOCATION])
    assert builder.decode([person.ids[i] for i in person.label_positions]) == " person"
    assert builder.decode([location.ids[i] for i in location.label_positions]) == " location"
    # instruction first: only the preamble is shared by the labels of a sentence
    assert person.ids[: person.shared_len] == location.ids[: location.shared_len]
    assert person.ids[person.shared_len] != location.ids[location.shared_len]
    assert person.shared_len < person.word_spans[0][0]


def test_sentence_first_template_shares_the_sentence(tokenizer, nlp):
    template = prompt_v1(
        instruction="Input sentence: {sentence}\nPlease extract the entity of {label} in the "
        "input sentence given above, the entity of {label} refers to {description}."
    )
    builder = PromptBuilder(template, tokenizer)
    doc = nlp("Angela Merkel met Marie Curie.")
    person, location = builder.build(builder.word_pieces(doc[:]), [PERSON, LOCATION])
    assert person.shared_len == location.shared_len
    assert person.shared_len >= person.word_spans[-1][1]
    assert person.ids[: person.shared_len] == location.ids[: location.shared_len]


def test_answer_ids_round_trip(builder, nlp):
    doc = nlp("Barack Obama visited Paris and Obama left.")
    prompt = builder.build(builder.word_pieces(doc[:]), [PERSON])[0]
    answer = builder.answer_ids(prompt, [(3, 4), (0, 2)])
    assert answer[-1] == builder.format.end_id
    text = builder.decode(answer[:-1])
    assert text == " <<< Barack Obama >>> <<< Paris >>>"
    spans = builder.format.parse_ids(answer[:-1], [0.0] * (len(answer) - 1), builder.decode)
    assert [s.text for s in spans] == ["Barack Obama", "Paris"]
    assert all(s.score == pytest.approx(1.0) for s in spans)
    assert builder.answer_ids(prompt, []) == [builder.format.end_id]


def test_parse_text_for_free_answers(builder):
    spans = builder.format.parse_text(" <<< Paris >>> junk <<<London>>> <<<  >>>", score=0.5)
    assert [(s.text, s.score) for s in spans] == [("Paris", 0.5), ("London", 0.5)]


def test_plain_template_without_chat(tokenizer, nlp):
    builder = PromptBuilder(prompt_v1(use_chat_template=False), tokenizer)
    doc = nlp("Paris is nice.")
    text = builder.decode(builder.build(builder.word_pieces(doc[:]), [LOCATION])[0].ids)
    assert "### Instruction:\nPlease extract the entity of location" in text
    assert text.endswith("### Response:\nI can extract entities for you, the extracted entities are")
    assert builder.format.end_id == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "instruction",
    [
        "Find {label} entities.",  # no sentence
        "{sentence} {sentence} {label}",  # sentence twice
        "Find them: {sentence}",  # no label
        "Find {label} in {sentence} {oops}",  # unknown placeholder
    ],
)
def test_bad_templates_are_rejected(instruction):
    with pytest.raises(ValueError, match="placeholder|sentence"):
        PromptTemplate(instruction=instruction)


def test_overhead_counts_everything_but_the_sentence(builder, nlp):
    doc = nlp("Barack Obama visited Paris.")
    prompt = builder.build(builder.word_pieces(doc[:]), [PERSON])[0]
    assert builder.overhead(PERSON) + builder.count_tokens(doc[:]) == len(prompt.ids)


def test_label_names_and_descriptions():
    assert default_name("politicalparty") == "political party"
    assert default_name("WORK_OF_ART") == "work of art"
    assert default_name("musicalArtist") == "musical artist"
    assert "people" in default_description("PER")
    assert default_description("Drug Name") == "named entities of the type drug name"
    infos = label_infos(["person", "Political Party"], {"person": "humans"}, {"person": "human"})
    assert infos[0] == LabelInfo("person", "human", "humans")
    assert infos[1].name == "political party"
    with pytest.raises(ValueError, match="not among the labels"):
        label_infos(["person"], {"persn": "typo"})
    with pytest.raises(ValueError, match="listed twice"):
        label_infos(["person", "person"])
    with pytest.raises(ValueError, match="non-empty"):
        label_infos(["person", " "])
