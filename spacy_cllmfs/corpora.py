"""Read NER corpora (CoNLL/BIO, Few-NERD episodes, spaCy JSONL) into Docs."""
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import spacy
from spacy.language import Language
from spacy.tokens import Doc, DocBin, Span
from spacy.vocab import Vocab

SCHEMES = ("auto", "bio", "bioes", "io")
FORMATS = ("auto", "conll", "bio", "bioes", "io", "fewnerd", "jsonl")
DOCSTART = "-DOCSTART-"
CONVERT_HINT = "python -m spacy_cllmfs convert INPUT {path}"

# A tag prefix is one upper-case letter and a dash: "B-ORG", "I-person-actor".
# Bare types such as "person-actor" or "politician" have no prefix.
_PREFIX_RE = re.compile(r"^([A-Z])-(.+)$")
_BIO_PREFIXES = {"B", "I"}
_BIOES_PREFIXES = {"B", "I", "E", "S", "L", "U"}
_AUTO_BIO_PREFIXES = {"B", "E", "S", "L", "U"}


class CorpusError(ValueError):
    """A corpus file is malformed. The message names the file, the line and
    the fix."""


@dataclass
class Episode:
    """One N-way K-shot episode: support and query sentences and the entity
    types of the episode."""

    support: List[Doc] = field(default_factory=list)
    query: List[Doc] = field(default_factory=list)
    types: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Tag decoding


def _tag_error(path: Path, line_no: int, tag: str, problem: str, fix: str) -> CorpusError:
    return CorpusError(f"{path}:{line_no}: {problem} in tag '{tag}'. Fix: {fix}")


def detect_scheme(tags: Sequence[str]) -> str:
    """Guess the tagging scheme of a tag sequence.

    tags (Sequence[str]): All tags of a file.
    RETURNS (str): "bioes" if any tag has a B-/E-/S-/L-/U- prefix, else "io".
    """
    for tag in tags:
        match = _PREFIX_RE.match(tag)
        if match and match.group(1) in _AUTO_BIO_PREFIXES:
            return "bioes"
    return "io"


def tags_to_spans(
    tags: Sequence[str],
    scheme: str,
    *,
    path: Union[str, Path] = "<tags>",
    line_nos: Optional[Sequence[int]] = None,
) -> List[Tuple[int, int, str]]:
    """Decode one sentence's tags into entity spans, conlleval-style: an I-
    (or E-) tag that does not continue an entity of the same type starts one.

    tags (Sequence[str]): One tag per token.
    scheme (str): "bio", "bioes" or "io" (not "auto").
    path (Union[str, Path]): File name used in error messages.
    line_nos (Optional[Sequence[int]]): Line number of each tag, for errors.
    RETURNS (List[Tuple[int, int, str]]): (start, end, label) token spans.
    """
    if scheme not in ("bio", "bioes", "io"):
        raise ValueError(f"Unknown tagging scheme '{scheme}'. Fix: use one of bio, bioes, io.")
    path = Path(path)
    allowed = _BIO_PREFIXES if scheme == "bio" else _BIOES_PREFIXES
    spans: List[Tuple[int, int, str]] = []
    start: Optional[int] = None
    label: Optional[str] = None

    def close(end: int) -> None:
        nonlocal start, label
        if start is not None and label is not None:
            spans.append((start, end, label))
        start, label = None, None

    for i, tag in enumerate(tags):
        line_no = line_nos[i] if line_nos is not None else i + 1
        if not tag:
            raise CorpusError(
                f"{path}:{line_no}: empty tag. Fix: give every token a tag "
                f"('O' for tokens outside entities)."
            )
        if tag == "O":
            close(i)
            continue
        match = _PREFIX_RE.match(tag)
        if scheme == "io":
            if match is None:
                typ = tag
            elif match.group(1) == "I":
                typ = match.group(2)
            elif match.group(1) in _BIOES_PREFIXES:
                raise _tag_error(
                    path, line_no, tag, f"'{match.group(1)}-' prefix with scheme 'io'",
                    "use scheme 'bio'/'bioes'/'auto' (--format conll) for prefixed tags.",
                )
            else:
                raise _tag_error(
                    path, line_no, tag, f"unknown prefix '{match.group(1)}-'",
                    "use bare types ('person'), 'I-person' or 'O' in IO files.",
                )
            if label != typ:
                close(i)
                start, label = i, typ
            continue
        if match is None:
            raise _tag_error(
                path, line_no, tag, f"missing B-/I- prefix (scheme '{scheme}')",
                "prefix entity tags with B-/I- or read the file with scheme 'io' "
                "(--format io).",
            )
        prefix, typ = match.group(1), match.group(2)
        if prefix not in allowed:
            expected = "B-, I-" if scheme == "bio" else "B-, I-, E-, S-, L-, U-"
            fix = f"use only the prefixes {expected} and 'O'"
            if prefix in _BIOES_PREFIXES:
                fix += " or read the file with scheme 'bioes'"
            raise _tag_error(path, line_no, tag, f"unknown prefix '{prefix}-'", fix + ".")
        if prefix == "B":
            close(i)
            start, label = i, typ
        elif prefix == "I":
            if label != typ:
                close(i)
                start, label = i, typ
        elif prefix in ("E", "L"):
            if label != typ:
                close(i)
                start, label = i, typ
            close(i + 1)
        else:  # S-, U-
            close(i)
            spans.append((i, i + 1, typ))
    close(len(tags))
    return spans


def make_doc(vocab: Vocab, words: Sequence[str], spans: Sequence[Tuple[int, int, str]]) -> Doc:
    """Create a Doc with annotated entities; tokens outside them are "O".

    vocab (Vocab): The vocab of the Doc.
    words (Sequence[str]): The tokens.
    spans (Sequence[Tuple[int, int, str]]): (start, end, label) token spans.
    RETURNS (Doc): The Doc, with doc.ents annotated even when empty.
    """
    n = len(words)
    spaces = [True] * (n - 1) + [False] if n else []
    doc = Doc(vocab, words=list(words), spaces=spaces)
    doc.set_ents([Span(doc, s, e, label=lab) for s, e, lab in spans], default="outside")
    return doc


# ---------------------------------------------------------------------------
# CoNLL / BIO


def _read_lines(path: Path) -> List[str]:
    """Lines of a UTF-8 text file without line endings (\\n, \\r\\n or a BOM)."""
    if not path.exists():
        raise FileNotFoundError(f"Corpus file not found: {path}. Fix: check the path.")
    if path.is_dir():
        raise CorpusError(f"{path} is a directory. Fix: pass a single corpus file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not valid UTF-8 ({err}). Fix: re-encode the file as UTF-8.")
    # Split on \n only: str.splitlines() would also split on characters such
    # as U+2028 or \x85 that can occur inside tokens.
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _jsonl_records(path: Path) -> Iterator[Tuple[int, Any]]:
    """(line number, parsed JSON) for each non-empty line of a JSONL file."""
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no}: invalid JSON ({err}). Fix: write one JSON object per line.")


def _split_conll_line(line: str, path: Path, line_no: int) -> Tuple[str, str]:
    if "\t" in line:
        columns = [column.strip() for column in line.split("\t")]
    else:
        columns = line.split()
    if len(columns) < 2 or not columns[0]:
        raise CorpusError(
            f"{path}:{line_no}: expected 'token<TAB>tag', got {line!r}. Fix: put the "
            f"token in the first and the tag in the last column (tab- or space-separated), "
            f"or separate sentences with an empty line."
        )
    token, tag = columns[0], columns[-1]
    if not tag:
        raise CorpusError(
            f"{path}:{line_no}: empty tag in {line!r}. Fix: give every token a tag "
            f"in the last column ('O' for tokens outside entities)."
        )
    return token, tag


def _conll_sentences(path: Path) -> Iterator[List[Tuple[int, str, str]]]:
    """Yield sentences as lists of (line_no, token, tag)."""
    sentence: List[Tuple[int, str, str]] = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            if sentence:
                yield sentence
            sentence = []
            continue
        if line.split()[0] == DOCSTART:
            if sentence:
                yield sentence
            sentence = []
            continue
        token, tag = _split_conll_line(line, path, line_no)
        sentence.append((line_no, token, tag))
    if sentence:
        yield sentence


def read_conll(path: Union[str, Path], vocab: Vocab, *, scheme: str = "auto") -> List[Doc]:
    """Read a CoNLL/BIO file: one token per line, token in the first column,
    tag in the last. Empty lines separate sentences; -DOCSTART- lines are
    skipped.

    path (Union[str, Path]): The file.
    vocab (Vocab): The vocab of the Docs.
    scheme (str): "bio", "bioes", "io" or "auto" (bioes if any tag has a
        B-/E-/S-/L-/U- prefix, else io).
    RETURNS (List[Doc]): One Doc per sentence, entities annotated.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown scheme '{scheme}'. Fix: use one of {', '.join(SCHEMES)}.")
    path = Path(path)
    sentences = list(_conll_sentences(path))
    if scheme == "auto":
        scheme = detect_scheme([tag for sent in sentences for _, _, tag in sent])
    docs = []
    for sent in sentences:
        line_nos = [line_no for line_no, _, _ in sent]
        tags = [tag for _, _, tag in sent]
        spans = tags_to_spans(tags, scheme, path=path, line_nos=line_nos)
        docs.append(make_doc(vocab, [token for _, token, _ in sent], spans))
    return docs


# ---------------------------------------------------------------------------
# Few-NERD episodes


def _episode_split(
    record: Dict[str, Any], key: str, types: List[str], vocab: Vocab, path: Path, line_no: int
) -> List[Doc]:
    where = f"{path}:{line_no}"
    split = record[key]
    if not isinstance(split, dict) or "word" not in split or "label" not in split:
        raise CorpusError(
            f"{where}: '{key}' must be an object with 'word' and 'label' lists. "
            f"Fix: write it as {{\"word\": [[...], ...], \"label\": [[...], ...]}}."
        )
    words, labels = split["word"], split["label"]
    if not isinstance(words, list) or not isinstance(labels, list):
        raise CorpusError(f"{where}: '{key}.word' and '{key}.label' must be lists. Fix: use JSON lists.")
    if len(words) != len(labels):
        raise CorpusError(
            f"{where}: '{key}' has {len(words)} sentences in 'word' but {len(labels)} in "
            f"'label'. Fix: give one label list per sentence."
        )
    known = set(types)
    docs = []
    for i, (toks, tags) in enumerate(zip(words, labels)):
        if not isinstance(toks, list) or not isinstance(tags, list) or not all(
            isinstance(x, str) for x in list(toks) + list(tags)
        ):
            raise CorpusError(
                f"{where}: {key} sentence {i} must be a list of strings in 'word' and "
                f"'label'. Fix: write tokens and tags as JSON strings."
            )
        if len(toks) != len(tags):
            raise CorpusError(
                f"{where}: {key} sentence {i} has {len(toks)} words but {len(tags)} labels. "
                f"Fix: give exactly one label per word."
            )
        if not toks:
            raise CorpusError(f"{where}: {key} sentence {i} is empty. Fix: remove it or add its tokens.")
        spans = tags_to_spans(tags, "io", path=path, line_nos=[line_no] * len(tags))
        unknown = sorted({lab for _, _, lab in spans if lab not in known})
        if unknown:
            raise CorpusError(
                f"{where}: {key} sentence {i} has labels {unknown} that are not in the "
                f"episode's types {types}. Fix: add them to 'types' or tag them 'O'."
            )
        docs.append(make_doc(vocab, toks, spans))
    return docs


def read_fewnerd_episodes(path: Union[str, Path], vocab: Vocab) -> List[Episode]:
    """Read Few-NERD episode JSONL: one object per line with "support",
    "query" ({"word": [[tok, ...]], "label": [[tag, ...]]}, IO tags) and
    "types".

    path (Union[str, Path]): The file.
    vocab (Vocab): The vocab of the Docs.
    RETURNS (List[Episode]): The episodes, in file order.
    """
    path = Path(path)
    episodes = []
    for line_no, record in _jsonl_records(path):
        missing = [key for key in ("support", "query", "types") if not isinstance(record, dict) or key not in record]
        if missing:
            raise CorpusError(
                f"{path}:{line_no}: episode is missing {missing}. Fix: every line needs "
                f"'support', 'query' and 'types' (Few-NERD episode format)."
            )
        types = record["types"]
        if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
            raise CorpusError(f"{path}:{line_no}: 'types' must be a list of type names. Fix: e.g. [\"person-actor\"].")
        support = _episode_split(record, "support", types, vocab, path, line_no)
        query = _episode_split(record, "query", types, vocab, path, line_no)
        episodes.append(Episode(support=support, query=query, types=list(types)))
    return episodes


def episodes_to_docs(episodes: Sequence[Episode]) -> List[Doc]:
    """Flatten episodes into Docs marked with user_data "episode", "split"
    and "types" (the layout `convert` writes for Few-NERD).

    episodes (Sequence[Episode]): The episodes.
    RETURNS (List[Doc]): Copies of the support then query Docs of each
        episode, in order.
    """
    docs = []
    for i, episode in enumerate(episodes):
        for split, split_docs in (("support", episode.support), ("query", episode.query)):
            for doc in split_docs:
                doc = doc.copy()
                doc.user_data["episode"] = i
                doc.user_data["split"] = split
                doc.user_data["types"] = list(episode.types)
                docs.append(doc)
    return docs


def episodes_from_docs(docs: Sequence[Doc]) -> List[Episode]:
    """Rebuild episodes from Docs written by `episodes_to_docs`.

    docs (Sequence[Doc]): Docs with user_data "episode", "split", "types".
    RETURNS (List[Episode]): The episodes, ordered by episode number.
    """
    episodes: Dict[int, Episode] = {}
    for i, doc in enumerate(docs):
        if "episode" not in doc.user_data or doc.user_data.get("split") not in ("support", "query"):
            raise CorpusError(
                f"Doc {i} has no episode/split in user_data. Fix: create the file with "
                f"`python -m spacy_cllmfs convert EPISODES.jsonl OUTPUT.spacy --format fewnerd`."
            )
        number = int(doc.user_data["episode"])
        episode = episodes.setdefault(number, Episode(types=list(doc.user_data.get("types", []))))
        getattr(episode, doc.user_data["split"]).append(doc)
    return [episodes[number] for number in sorted(episodes)]


# ---------------------------------------------------------------------------
# spaCy / Prodigy JSONL


def _record_doc(nlp: Language, record: Dict[str, Any], path: Path, line_no: int) -> Doc:
    text = record["text"]
    tokens = record.get("tokens")
    if not tokens:
        return nlp.make_doc(text)
    if not isinstance(tokens, list) or not all(isinstance(t, dict) and isinstance(t.get("text"), str) for t in tokens):
        raise CorpusError(
            f"{path}:{line_no}: 'tokens' must be a list of objects with a 'text'. "
            f"Fix: use Prodigy tokens ({{\"text\", \"start\", \"end\", \"ws\"}}) or drop 'tokens'."
        )
    words = [t["text"] for t in tokens]
    spaces = []
    for i, tok in enumerate(tokens):
        if "ws" in tok:
            spaces.append(bool(tok["ws"]))
        elif "end" in tok and i + 1 < len(tokens) and "start" in tokens[i + 1]:
            spaces.append(tokens[i + 1]["start"] > tok["end"])
        else:
            spaces.append(isinstance(tok.get("end"), int) and text[tok["end"]: tok["end"] + 1] == " ")
    doc = Doc(nlp.vocab, words=words, spaces=spaces)
    if doc.text != text:
        raise CorpusError(
            f"{path}:{line_no}: the 'tokens' do not reproduce the 'text' "
            f"({doc.text[:40]!r} vs {text[:40]!r}). Fix: correct the tokens' 'ws' "
            f"flags or drop 'tokens' to let spaCy tokenize the text."
        )
    return doc


def _record_spans(record: Dict[str, Any], path: Path, line_no: int) -> List[Tuple[int, int, str]]:
    if record.get("spans") and record.get("entities"):
        raise CorpusError(
            f"{path}:{line_no}: record has both 'spans' and 'entities'. "
            f"Fix: keep only one of them."
        )
    raw = record.get("spans") or record.get("entities") or []
    if not isinstance(raw, list):
        raise CorpusError(f"{path}:{line_no}: 'spans'/'entities' must be a list. Fix: use a JSON list.")
    spans = []
    for item in raw:
        if isinstance(item, dict) and {"start", "end", "label"} <= set(item):
            start, end, label = item["start"], item["end"], item["label"]
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            start, end, label = item
        else:
            raise CorpusError(
                f"{path}:{line_no}: bad span {item!r}. Fix: write spans as "
                f"{{\"start\": 0, \"end\": 5, \"label\": \"X\"}} or entities as [0, 5, \"X\"]."
            )
        if not isinstance(start, int) or not isinstance(end, int) or not isinstance(label, str) or not label:
            raise CorpusError(
                f"{path}:{line_no}: bad span {item!r}: start/end must be integers and "
                f"label a non-empty string. Fix: correct the span."
            )
        spans.append((start, end, label))
    return spans


def read_jsonl(
    path: Union[str, Path], vocab_or_nlp: Union[Vocab, Language, None] = None, *, lang: str = "en"
) -> List[Doc]:
    """Read spaCy/Prodigy-style JSONL: {"text": ..., "spans": [{"start",
    "end", "label"}]} or {"text": ..., "entities": [[start, end, label]]}.
    Texts are tokenized with the given nlp's tokenizer (or spacy.blank(lang))
    unless the record has Prodigy "tokens".

    path (Union[str, Path]): The file.
    vocab_or_nlp (Union[Vocab, Language, None]): The nlp whose tokenizer is
        used, or a vocab for a blank `lang` pipeline.
    lang (str): Language of the blank tokenizer when no nlp is given.
    RETURNS (List[Doc]): One Doc per record, entities annotated.
    """
    path = Path(path)
    if isinstance(vocab_or_nlp, Language):
        nlp = vocab_or_nlp
    elif isinstance(vocab_or_nlp, Vocab):
        nlp = spacy.blank(lang, vocab=vocab_or_nlp)
    else:
        nlp = spacy.blank(lang)
    docs = []
    for line_no, record in _jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{line_no}: record has no 'text' string. Fix: add \"text\": \"...\".")
        if not record["text"].strip():
            raise CorpusError(f"{path}:{line_no}: 'text' is empty. Fix: remove the record or add its text.")
        doc = _record_doc(nlp, record, path, line_no)
        text = record["text"]
        ents = []
        for start, end, label in _record_spans(record, path, line_no):
            if not 0 <= start < end <= len(text):
                raise CorpusError(
                    f"{path}:{line_no}: span ({start}, {end}, {label!r}) is out of range "
                    f"for a text of {len(text)} characters. Fix: use 0 <= start < end <= "
                    f"{len(text)} (character offsets)."
                )
            span = doc.char_span(start, end, label=label)
            if span is None:
                span = doc.char_span(start, end, label=label, alignment_mode="expand")
                if span is None:
                    raise CorpusError(
                        f"{path}:{line_no}: span ({start}, {end}, {label!r}) "
                        f"{text[start:end]!r} covers no token. Fix: correct its offsets."
                    )
                warnings.warn(
                    f"{path}:{line_no}: span ({start}, {end}, {label!r}) {text[start:end]!r} "
                    f"does not align with token boundaries; expanded to "
                    f"({span.start_char}, {span.end_char}) {span.text!r}. Fix: use token-aligned offsets.",
                    stacklevel=2,
                )
            ents.append(((start, end), span))
        ents.sort(key=lambda item: (item[1].start, item[1].end))
        for (prev_chars, prev), (chars, span) in zip(ents, ents[1:]):
            if span.start < prev.end:
                raise CorpusError(
                    f"{path}:{line_no}: overlapping spans ({prev_chars[0]}, {prev_chars[1]}, "
                    f"{prev.label_!r}) {prev.text!r} and ({chars[0]}, {chars[1]}, "
                    f"{span.label_!r}) {span.text!r}. Fix: remove one of them (NER spans "
                    f"cannot overlap)."
                )
        doc.set_ents([span for _, span in ents], default="outside")
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------
# DocBin conversion


def detect_format(path: Union[str, Path]) -> str:
    """Guess the format of a corpus file from its extension and content.

    path (Union[str, Path]): The file.
    RETURNS (str): "fewnerd" for .json/.jsonl with a "support" key, "jsonl"
        for other .json/.jsonl files, else "conll".
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        return "conll"
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(
                f"{path}:{line_no}: invalid JSON ({err}). Fix: write one JSON object per "
                f"line, or pass --format explicitly."
            )
        return "fewnerd" if isinstance(record, dict) and "support" in record else "jsonl"
    return "jsonl"


def read_docs(path: Union[str, Path], *, fmt: str = "auto", lang: str = "en") -> List[Doc]:
    """Read any supported corpus file into Docs (Few-NERD episodes flattened
    with user_data "episode", "split" and "types").

    path (Union[str, Path]): The file.
    fmt (str): "auto", "conll", "bio", "bioes", "io", "fewnerd" or "jsonl".
    lang (str): Language of the blank vocab/tokenizer.
    RETURNS (List[Doc]): The Docs.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format '{fmt}'. Fix: use one of {', '.join(FORMATS)}.")
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    nlp = spacy.blank(lang)
    if fmt == "fewnerd":
        return episodes_to_docs(read_fewnerd_episodes(path, nlp.vocab))
    if fmt == "jsonl":
        return read_jsonl(path, nlp)
    scheme = "auto" if fmt == "conll" else fmt
    return read_conll(path, nlp.vocab, scheme=scheme)


def convert(
    input_path: Union[str, Path], output_path: Union[str, Path], *, fmt: str = "auto", lang: str = "en"
) -> int:
    """Convert a corpus file into a .spacy DocBin (user data stored).

    input_path (Union[str, Path]): The corpus file.
    output_path (Union[str, Path]): The .spacy file; parent folders are created.
    fmt (str): "auto", "conll", "bio", "bioes", "io", "fewnerd" or "jsonl".
    lang (str): Language of the blank vocab/tokenizer.
    RETURNS (int): The number of Docs written.
    """
    docs = read_docs(input_path, fmt=fmt, lang=lang)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    DocBin(store_user_data=True, docs=docs).to_disk(output_path)
    return len(docs)


def load_docbin(path: Union[str, Path], vocab: Vocab) -> List[Doc]:
    """Load the Docs of a .spacy file.

    path (Union[str, Path]): The .spacy file.
    vocab (Vocab): The vocab of the Docs.
    RETURNS (List[Doc]): The Docs, with their user data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"DocBin file not found: {path}. Fix: create it with "
            f"`{CONVERT_HINT.format(path=path)}`."
        )
    if path.is_dir():
        raise CorpusError(f"{path} is a directory. Fix: pass a single .spacy file.")
    try:
        doc_bin = DocBin().from_disk(path)
    except Exception as err:  # msgpack/zlib raise various error types
        raise CorpusError(
            f"{path}: not a readable .spacy DocBin ({type(err).__name__}: {err}). Fix: "
            f"recreate it with `{CONVERT_HINT.format(path=path)}`."
        ) from err
    return list(doc_bin.get_docs(vocab))
