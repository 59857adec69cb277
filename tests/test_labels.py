import pytest

from spacy_cllmfs.labels import default_description, label_definitions

MUSIC = ["person", "musicalartist", "band", "organisation", "location", "country", "misc", "album"]


def test_plain_definitions_are_the_default_descriptions():
    assert label_definitions(MUSIC) == {label: default_description(label) for label in MUSIC}


def test_contrasted_definitions_tell_a_broad_type_from_the_narrower_types_of_the_set():
    definitions = label_definitions(MUSIC, "contrasted")
    assert definitions["person"] == "names of people, real or fictional, except those tagged musicalartist"
    assert definitions["organisation"].endswith(", except those tagged band")
    assert definitions["location"].endswith(", except those tagged country")
    assert definitions["misc"] == "named entities that fit none of the other labels"
    for label in ("musicalartist", "band", "country", "album"):  # narrow types keep their own
        assert definitions[label] == default_description(label)


def test_contrasted_definitions_name_the_labels_as_the_set_spells_them():
    definitions = label_definitions(["PER", "Politician", "Writer", "MISC"], "contrasted")
    assert definitions["PER"].endswith(", except those tagged Politician or Writer")
    assert definitions["Politician"] == default_description("politician")
    # without a narrower type in the set, a broad type is described as usual
    assert label_definitions(["person", "location"], "contrasted") == label_definitions(["person", "location"])
    assert label_definitions(["misc"], "contrasted") == {"misc": default_description("misc")}


def test_an_unknown_definition_style_names_the_choices():
    with pytest.raises(ValueError, match=r"Unknown label definition style 'fancy'.*\['plain', 'contrasted'\]"):
        label_definitions(MUSIC, "fancy")
