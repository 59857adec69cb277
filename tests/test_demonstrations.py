import pytest
import spacy
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_cllmfs.demonstrations import Demonstration, Demonstrations
from spacy_cllmfs.labels import set_annotated_labels
from spacy_cllmfs.prompts import prompt_v3

GOLD = [
    ("Angela Merkel met Marie Curie in Geneva and in New York .",
     [(0, 2, "person"), (3, 5, "person"), (6, 7, "location"), (9, 11, "location")]),
    ("Obama visited Paris .", [(0, 1, "person"), (2, 3, "location")]),
    ("The weather was nice .", []),
    ("Merkel spoke .", [(0, 1, "person")]),
    ("Obama visited Paris .", [(0, 1, "person"), (2, 3, "location")]),  # a repeat
]


def examples(nlp, gold=GOLD):
    result = []
    for text, spans in gold:
        doc = Doc(nlp.vocab, words=text.split())
        doc.set_ents([Span(doc, s, e, label=label) for s, e, label in spans], default="outside")
        result.append(Example(nlp.make_doc(doc.text), doc))
    return result


def whole(doc):
    return [doc[:]]


def test_shortest_windows_with_the_label_first_each_text_once():
    nlp = spacy.blank("en")
    demos = Demonstrations.from_examples(examples(nlp), whole, ["person", "location", "event"], n=1)
    assert demos.by_label["person"] == [
        Demonstration("Merkel spoke .", ("Merkel",)),
        Demonstration("Obama visited Paris .", ("Obama",)),
    ]  # n plus one spare, the repeat left out
    assert [d.spans for d in demos.by_label["location"]] == [("Paris",), ("Geneva", "New York")]
    assert demos.by_label["event"] == [] and demos


def test_a_sentence_is_never_its_own_example():
    nlp = spacy.blank("en")
    demos = Demonstrations.from_examples(examples(nlp), whole, ["person"], n=1)
    template = prompt_v3(demonstrations=1)
    shown = demos.texts(template)["person"]
    assert shown == (
        "Example sentence: Merkel spoke .\nI can extract entities for you, the extracted entities are "
        "<<< Merkel >>>\n\n"
    )
    instead = demos.texts(template, " Merkel spoke . ")["person"]
    assert "Merkel spoke" not in instead and "<<< Obama >>>" in instead


def test_labels_a_doc_is_not_annotated_for_give_no_examples():
    nlp = spacy.blank("en")
    exs = examples(nlp, GOLD[:2])
    set_annotated_labels(exs[1].reference, ["location"])
    demos = Demonstrations.from_examples(exs, whole, ["person", "location"], n=2)
    assert [d.text for d in demos.by_label["person"]] == [exs[0].reference.text.strip()]
    assert len(demos.by_label["location"]) == 2


def test_round_trip_and_bad_data():
    demos = Demonstrations({"person": [Demonstration("Obama spoke .", ("Obama",))], "event": []})
    assert Demonstrations.from_dict(demos.to_dict()).by_label == demos.by_label
    assert not Demonstrations({"event": []})
    with pytest.raises(ValueError, match="re-save the pipeline"):
        Demonstrations.from_dict({"person": [{"text": "Obama spoke .", "spans": "Obama"}]})
