"""Entity labels as the prompt shows them: a readable name and a description."""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from spacy.tokens import Doc

# normalized label -> (name shown in the prompt, description)
KNOWN_LABELS: Dict[str, Tuple[str, str]] = {
    # CoNLL-2003 / WikiNER short forms
    "per": ("person", "names of people, real or fictional"),
    "loc": ("location", "names of places such as cities, countries, regions, rivers and mountains"),
    "org": ("organisation", "names of companies, institutions, agencies, teams and other organised groups"),
    "misc": (
        "miscellaneous",
        "named entities that are not a person, location or organisation, such as "
        "nationalities, events, works and products",
    ),
    # CrossNER
    "person": ("person", "names of people, real or fictional"),
    "location": ("location", "names of places such as cities, regions, rivers, mountains and buildings"),
    "organisation": (
        "organisation",
        "names of companies, institutions, agencies, teams and other organised groups",
    ),
    "organization": (
        "organization",
        "names of companies, institutions, agencies, teams and other organised groups",
    ),
    "country": ("country", "names of countries and states"),
    "event": ("event", "names of specific events such as wars, festivals, conferences and tournaments"),
    "politician": ("politician", "names of people who hold or held political office or run for it"),
    "politicalparty": ("political party", "names of political parties"),
    "election": ("election", "names of specific elections, such as the 2004 presidential election"),
    "scientist": ("scientist", "names of scientists and researchers"),
    "astronomicalobject": ("astronomical object", "names of stars, planets, moons, galaxies and comets"),
    "chemicalcompound": ("chemical compound", "names of chemical compounds and molecules"),
    "chemicalelement": ("chemical element", "names of chemical elements"),
    "academicjournal": ("academic journal", "names of scientific and academic journals"),
    "award": ("award", "names of awards, prizes and honours"),
    "protein": ("protein", "names of proteins"),
    "enzyme": ("enzyme", "names of enzymes"),
    "university": ("university", "names of universities and colleges"),
    "discipline": ("discipline", "names of scientific or academic disciplines and fields of study"),
    "theory": ("theory", "names of scientific theories, laws and principles"),
    "musicalartist": ("musical artist", "names of singers, musicians, composers and other music artists"),
    "band": ("band", "names of bands and musical groups"),
    "musicgenre": ("music genre", "names of music genres and styles"),
    "album": ("album", "titles of music albums"),
    "song": ("song", "titles of songs and singles"),
    "musicalinstrument": ("musical instrument", "names of musical instruments"),
    "writer": ("writer", "names of writers, poets and authors"),
    "book": ("book", "titles of books and novels"),
    "poem": ("poem", "titles of poems"),
    "magazine": ("magazine", "names of magazines and periodicals"),
    "literarygenre": ("literary genre", "names of literary genres and forms"),
    # OntoNotes 5 (spaCy's en_core_web_* labels)
    "gpe": ("geopolitical entity", "names of countries, cities and states"),
    "norp": ("nationality or group", "nationalities, religious or political groups"),
    "fac": ("facility", "names of buildings, airports, highways and bridges"),
    "product": ("product", "names of objects, vehicles, foods and other products"),
    "workofart": ("work of art", "titles of books, songs, films and other works of art"),
    "law": ("law", "names of laws and legal documents"),
    "language": ("language", "names of languages"),
    "date": ("date", "absolute or relative dates or periods"),
    "time": ("time", "times smaller than a day"),
    "percent": ("percent", "percentages"),
    "money": ("money", "monetary values, including the unit"),
    "quantity": ("quantity", "measurements such as weight or distance"),
    "ordinal": ("ordinal", "ordinal numbers such as first and second"),
    "cardinal": ("cardinal", "numerals that do not fall under another type"),
}


# a broad type -> the narrower types that schemes such as CrossNER annotate apart from it
# (a politician is never also tagged person); keys and values are normalized labels
NARROWER: Dict[str, Tuple[str, ...]] = {
    "person": ("politician", "scientist", "musicalartist", "writer"),
    "location": ("country", "gpe", "fac"),
    "organisation": ("politicalparty", "university", "band"),
    "event": ("election",),
}
NARROWER.update(per=NARROWER["person"], loc=NARROWER["location"], org=NARROWER["organisation"],
                organization=NARROWER["organisation"])
# types annotated only where no other type of the set applies
CATCH_ALL = ("misc", "miscellaneous", "other")
# how a set's descriptions are written (`label_definitions`)
DEFINITION_STYLES = ("plain", "contrasted")


@dataclass(frozen=True)
class LabelInfo:
    """One entity label: the spaCy label, the name the prompt uses, and its description."""

    label: str
    name: str
    description: str


def normalize_label(label: str) -> str:
    """Lower-case a label and drop separators: "WORK_OF_ART" -> "workofart"."""
    return re.sub(r"[\s_\-]+", "", label).lower()


def default_name(label: str) -> str:
    """The readable name of a label: "politicalparty" -> "political party"."""
    known = KNOWN_LABELS.get(normalize_label(label))
    if known:
        return known[0]
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label)
    return re.sub(r"[\s_\-]+", " ", spaced).strip().lower()


def default_description(label: str) -> str:
    """A description for labels without one in the config."""
    known = KNOWN_LABELS.get(normalize_label(label))
    if known:
        return known[1]
    return f"named entities of the type {default_name(label)}"


def label_definitions(labels: Iterable[str], style: str = "plain") -> Dict[str, str]:
    """The default description of each label of a set. "plain": each label on its own
    (`default_description`). "contrasted": told apart from the other labels of the set,
    as schemes such as CrossNER annotate them: a broad type excludes the narrower types
    present, named as the set names them ("person": "..., except those tagged
    politician" when "politician" is a label), and a catch-all type ("misc") is
    what fits none of the other labels.

    labels (Iterable[str]): The label set.
    style (str): "plain" or "contrasted".
    RETURNS (Dict[str, str]): The description of each label.
    RAISES (ValueError): On an unknown style.
    """
    check_definition_style(style)
    labels = validate_labels(labels)
    definitions = {label: default_description(label) for label in labels}
    if style == "plain":
        return definitions
    present = {normalize_label(label): label for label in labels}
    for label in labels:
        key = normalize_label(label)
        if key in CATCH_ALL and len(labels) > 1:
            definitions[label] = "named entities that fit none of the other labels"
            continue
        narrower = [present[n] for n in NARROWER.get(key, ()) if n in present]
        if narrower:
            definitions[label] = f"{definitions[label]}, except those tagged {' or '.join(narrower)}"
    return definitions


def check_definition_style(style: str) -> str:
    """Check a `label_definitions` style early, before a model is loaded.

    style (str): The style.
    RETURNS (str): The style.
    RAISES (ValueError): When it is not one of `DEFINITION_STYLES`.
    """
    if style not in DEFINITION_STYLES:
        raise ValueError(f"Unknown label definition style {style!r}. Fix: use one of {list(DEFINITION_STYLES)}.")
    return style


def validate_labels(labels: Iterable[str]) -> List[str]:
    """Check labels: non-empty strings, no duplicates. Order is kept.

    RAISES (ValueError): On an empty or non-string label, or a duplicate.
    """
    result: List[str] = []
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(
                f"Invalid entity label {label!r}: labels must be non-empty strings, "
                "e.g. labels = [\"person\", \"location\"]."
            )
        if label in result:
            raise ValueError(f"Entity label '{label}' is listed twice. Fix: list each label once.")
        result.append(label)
    return result


def label_infos(
    labels: Iterable[str],
    descriptions: Optional[Mapping[str, str]] = None,
    names: Optional[Mapping[str, str]] = None,
) -> List[LabelInfo]:
    """Combine labels with configured (or default) names and descriptions.

    RAISES (ValueError): If a description or name is given for a label that is not listed.
    """
    labels = validate_labels(labels)
    for what, mapping in (("label_descriptions", descriptions), ("label_names", names)):
        unknown = sorted(set(mapping or {}) - set(labels))
        if unknown:
            raise ValueError(
                f"`{what}` has entries for {unknown}, which are not among the labels "
                f"{labels}. Fix: correct the label names or add them to `labels`."
            )
    return [
        LabelInfo(
            label=label,
            name=(names or {}).get(label) or default_name(label),
            description=(descriptions or {}).get(label) or default_description(label),
        )
        for label in labels
    ]


# Doc.user_data key: the labels a training Doc is annotated for (see `annotated_labels`)
ANNOTATED_LABELS = "cllmfs_labels"


def set_annotated_labels(doc: Doc, labels: Iterable[str]) -> None:
    """Declare which labels `doc` is annotated for, when that is fewer than the
    component's: a CoNLL-2003 sentence in a general training mix is annotated for
    PER/LOC/ORG/MISC only, so it must not teach "no politician here". Training
    prompts such a Doc with its own labels only. Kept by DocBin (user data).
    """
    doc.user_data[ANNOTATED_LABELS] = validate_labels(labels)


def annotated_labels(doc: Doc) -> Optional[List[str]]:
    """RETURNS (Optional[List[str]]): The labels `doc` declares it is annotated for,
        or None: annotated for all of the component's labels.
    RAISES (ValueError): If the declaration is not a list of label strings.
    """
    labels = doc.user_data.get(ANNOTATED_LABELS)
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise ValueError(
            f"Doc.user_data['{ANNOTATED_LABELS}'] is {labels!r}, not a list of labels. "
            "Fix: set it with spacy_cllmfs.labels.set_annotated_labels(doc, ['person', ...])."
        )
    return validate_labels(labels)
