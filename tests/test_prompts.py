import pytest
import spacy
from transformers import AutoTokenizer

from spacy_cllmfs.labels import LabelInfo, default_description, default_name, label_infos
from spacy_cllmfs.prompts import PromptBuilder, PromptTemplate, prompt_v1, prompt_v2, prompt_v3

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


def build_metaspace_tokenizer(prepend_scheme: str = "always"):
    """A tiny SentencePiece-style tokenizer: Metaspace pre-tokenizer with a dummy prefix."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spacy_cllmfs.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, TRAINING_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    alphabet = sorted(set("".join(TRAINING_TEXT) + "\n▁😀üZ"))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS + ["<unk>"], initial_alphabet=alphabet)
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
@pytest.mark.parametrize("make_template", [prompt_v1, prompt_v2])
def test_sentencepiece_prompts_read_as_one_text(nlp, prepend_scheme, make_template):
    tokenizer = build_metaspace_tokenizer(prepend_scheme)
    # the naive way is wrong for this tokenizer: a piece alone gets an extra space marker
    naive = [i for piece in ("Paris", ".") for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    assert naive != tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    template = make_template()
    builder = PromptBuilder(template, tokenizer)
    doc = nlp("Barack Obama visited Paris, (Zürich).")
    prompt = builder.build(builder.word_pieces(doc[:]), [PERSON])[0]
    user = template.instruction.format(label="person", description="names of people", sentence=doc.text)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": template.answer_prefix}]
    if template.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": template.system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    text = text[: text.index(template.answer_prefix) + len(template.answer_prefix)]
    assert prompt.ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    for token, (start, end) in zip(doc, prompt.word_spans):
        assert tokenizer.decode(prompt.ids[start:end]).strip() == token.text


def test_prompt_v2_shares_the_sentence_and_empties_the_system_message(builder, tokenizer, nlp):
    v2 = PromptBuilder(prompt_v2(), tokenizer)
    doc = nlp("Angela Merkel met Marie Curie.")
    person, location = v2.build(v2.word_pieces(doc[:]), [PERSON, LOCATION])
    assert person.prefix == location.prefix and person.suffix != location.suffix
    assert person.shared_len > person.word_spans[-1][1]  # the whole sentence is shared
    text = v2.decode(person.ids)
    assert "Input sentence: Angela Merkel met Marie Curie.\nPlease extract the entity of person" in text
    assert "<|im_start|>system\n<|im_end|>" in text  # the empty system message
    old = builder.build(builder.word_pieces(doc[:]), [PERSON])[0]
    assert len(person.suffix) < len(old.ids) - old.shared_len


def test_prompt_v3_shows_worked_examples_before_the_sentence(tokenizer, nlp):
    builder = PromptBuilder(prompt_v3(), tokenizer)
    template = builder.template
    examples = {"person": template.render_examples([("Obama spoke .", ["Obama"]), ("Nobody came .", [])])}
    assert examples["person"] == (
        "Example sentence: Obama spoke .\nI can extract entities for you, the extracted entities are <<< Obama >>>\n\n"
        "Example sentence: Nobody came .\nI can extract entities for you, the extracted entities are\n\n"
    )
    prompts = {}
    for text in ("Barack Obama visited Paris.", "Merkel met Curie."):
        doc = nlp(text)
        prompts[text] = builder.build(builder.word_pieces(doc[:]), [PERSON, LOCATION], examples)
    person, location = prompts["Barack Obama visited Paris."]
    text = builder.decode(person.ids)
    assert "refers to names of people.\nExample sentence: Obama spoke .\n" in text
    assert "extracted entities are\n\nInput sentence: Barack Obama visited Paris." in text
    assert "Example" not in builder.decode(location.ids)  # no examples for that label
    # what precedes the sentence depends on the label only
    other = prompts["Merkel met Curie."][0]
    assert person.ids[: person.sentence_start] == other.ids[: other.sentence_start]
    assert person.sentence_start == person.word_spans[0][0]
    assert builder.overhead(PERSON, examples) == len(person.ids) - len(person.sentence_ids())
    assert builder.overhead(PERSON, examples) > builder.overhead(PERSON)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"demonstrations": 2}, "no|0 {examples} slot"),
        ({"instruction": "Find {label}: {examples}{sentence}"}, "demonstrations"),
        ({"instruction": "Find {label}: {examples}{examples}{sentence}", "demonstrations": 1}, "at most once"),
        ({"instruction": "Find {label}: {examples}{sentence}", "demonstrations": -1}, ">= 0"),
        ({"instruction": "Find {label}: {examples}{sentence}", "demonstrations": 1, "example": "{sentence}"},
         "answer"),
    ],
)
def test_bad_example_settings_are_rejected(settings, match):
    with pytest.raises(ValueError, match=match):
        PromptTemplate(**settings)
