"""Worked examples for the prompt's `{examples}` slot (`spacy_cllmfs.prompt.v3`).

In-context prompting with the few shots is a strong few-shot baseline; showing
the same shots inside the cllmfs prompt lets the adapter learn on top of it.
Per label, the component keeps a few sentence windows of its training data
that have entities of the label (shortest first, so prompts stay short), and
their entity texts. Every prompt of the label shows the first `n` of them that
are not the prompted sentence itself, so in training a sentence never sees its
own answer, and at inference all sentences of a label share the same prefix.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from spacy.tokens import Span
from spacy.training import Example

from .labels import annotated_labels
from .prompts import PromptTemplate

SPARE = 1  # windows kept beyond `n` per label, so that leaving one out still shows `n`


@dataclass(frozen=True)
class Demonstration:
    """One worked example: a sentence window's text and its entities of one label."""

    text: str
    spans: Tuple[str, ...]


class Demonstrations:
    """Per label, its worked examples in the order they are shown. Not to be changed
    once made: `texts` keeps what it renders.

    by_label (Mapping[str, Sequence[Demonstration]]): The examples of each label.
    """

    def __init__(self, by_label: Optional[Mapping[str, Sequence[Demonstration]]] = None) -> None:
        self.by_label: Dict[str, List[Demonstration]] = {k: list(v) for k, v in (by_label or {}).items()}
        self._shown = {d.text for demos in self.by_label.values() for d in demos}
        self._rendered: Dict[PromptTemplate, Dict[str, str]] = {}

    @classmethod
    def from_examples(
        cls,
        examples: Iterable[Example],
        windows: Callable[[Any], List[Span]],
        labels: Sequence[str],
        n: int,
    ) -> "Demonstrations":
        """Choose, per label, the `n` (plus `SPARE`) shortest sentence windows of the
        gold examples that have an entity of the label, fewest tokens first (ties: the
        order of the data). Each text is kept once per label.

        windows (Callable[[Doc], List[Span]]): Splits a Doc into the component's windows.
        n (int): Examples shown per prompt.
        """
        found: Dict[str, List[Tuple[int, int, Demonstration]]] = {label: [] for label in labels}
        order = 0
        for example in examples:
            doc = example.reference
            own = annotated_labels(doc)
            ents = [e for e in doc.ents if e.label_ in found and (own is None or e.label_ in own)]
            if not ents:
                continue
            for window in windows(doc):
                inside = [e for e in ents if e.start >= window.start and e.end <= window.end]
                for label in dict.fromkeys(e.label_ for e in inside):
                    spans = tuple(e.text for e in inside if e.label_ == label)
                    found[label].append((len(window), order, Demonstration(window.text.strip(), spans)))
                    order += 1
        by_label: Dict[str, List[Demonstration]] = {}
        for label, candidates in found.items():
            chosen: List[Demonstration] = []
            for _, _, demo in sorted(candidates, key=lambda c: (c[0], c[1])):
                if len(chosen) == n + SPARE:
                    break
                if all(demo.text != other.text for other in chosen):
                    chosen.append(demo)
            by_label[label] = chosen
        return cls(by_label)

    def texts(self, template: PromptTemplate, sentence: Optional[str] = None) -> Dict[str, str]:
        """The `{examples}` text of each label for a prompted sentence: its first
        `template.demonstrations` examples that are not `sentence` itself.

        RETURNS (Dict[str, str]): Per label, the rendered examples ("" for none); for a
            sentence that is no example, one dict shared by all calls (do not change it).
        """
        sentence = sentence.strip() if sentence is not None else None
        if sentence not in self._shown:
            if template not in self._rendered:
                self._rendered[template] = self._render(template, None)
            return self._rendered[template]
        return self._render(template, sentence)

    def _render(self, template: PromptTemplate, sentence: Optional[str]) -> Dict[str, str]:
        result: Dict[str, str] = {}
        for label, demos in self.by_label.items():
            shown = [d for d in demos if d.text != sentence][: template.demonstrations]
            result[label] = template.render_examples([(d.text, d.spans) for d in shown])
        return result

    def to_dict(self) -> Dict[str, List[Dict[str, Any]]]:
        """RETURNS (dict): A JSON-serializable form (see `from_dict`)."""
        return {
            label: [{"text": d.text, "spans": list(d.spans)} for d in demos] for label, demos in self.by_label.items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Mapping[str, Any]]]) -> "Demonstrations":
        """Load what `to_dict` wrote.

        RAISES (ValueError): If an entry is not {"text": str, "spans": [str, ...]}.
        """
        by_label: Dict[str, List[Demonstration]] = {}
        for label, demos in data.items():
            by_label[label] = []
            for demo in demos:
                text, spans = demo.get("text"), demo.get("spans")
                if not isinstance(text, str) or not isinstance(spans, list) or not all(isinstance(s, str) for s in spans):
                    raise ValueError(
                        f"Demonstration {demo!r} of label '{label}' is not {{'text': str, 'spans': [str, ...]}}. "
                        "Fix: re-save the pipeline, or run `initialize` again to choose its examples."
                    )
                by_label[label].append(Demonstration(text, tuple(spans)))
        return cls(by_label)

    def __bool__(self) -> bool:
        return any(self.by_label.values())
