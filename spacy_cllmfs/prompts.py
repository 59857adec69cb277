"""The prompt and answer format, shared by training and inference.

One prompt per (sentence, label), as in CLLMFS:

    Please extract the entity of {label} in the input sentence given below, the
    entity of {label} refers to {description}.
    Input sentence: {sentence}
    -> I can extract entities for you, the extracted entities are <<< span >>> <<< span >>>

The fixed start of the answer is part of the prompt, so the model only
generates the spans and the end-of-answer token ("no entity" costs one step).

Prompts are assembled from token ids, not re-tokenized as one string: the
template's literal pieces are tokenized once, and the sentence is tokenized
word by word (one spaCy token at a time, with its leading space). Every
spaCy token therefore maps to a contiguous range of model tokens, answer
spans are copies of those ranges, and training and inference see the very
same ids. The ids before the first label-dependent piece are the same for
all labels of a sentence (`Prompt.shared_len`), and with the label first the ids
before the sentence are the same for all sentences of a label
(`Prompt.sentence_start`): either is a prefix whose KV cache is computed once.

With `spacy_cllmfs.prompt.v3` the instruction also shows worked examples of the
label (an `{examples}` slot, filled from `demonstrations.Demonstrations`): a few
sentences from the training data, each followed by its answer in the answer
format, so the model sees the task done before it is asked.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from spacy.tokens import Span
from spacy.util import registry

from .labels import LabelInfo

DEFAULT_INSTRUCTION = (
    "Please extract the entity of {label} in the input sentence given below, "
    "the entity of {label} refers to {description}.\nInput sentence: {sentence}"
)
SENTENCE_FIRST_INSTRUCTION = (
    "Input sentence: {sentence}\nPlease extract the entity of {label} in the input sentence "
    "given above, the entity of {label} refers to {description}."
)
EXAMPLES_INSTRUCTION = (
    "Please extract the entity of {label} in the input sentence given below, "
    "the entity of {label} refers to {description}.\n{examples}Input sentence: {sentence}"
)
DEFAULT_EXAMPLE = "Example sentence: {sentence}\n{answer}\n\n"
DEFAULT_ANSWER_PREFIX = "I can extract entities for you, the extracted entities are"
ANCHOR = "\n"  # text that never merges with what follows it (see `PromptBuilder._encode`)
SPAN_OPEN = " <<<"
SPAN_CLOSE = " >>>"
SLOTS = ("label", "description", "sentence", "examples")
_MARKS = {name: f"\x1f{name.upper()}\x1f" for name in SLOTS + ("answer",)}
_MARK_RE = re.compile("(" + "|".join(re.escape(m) for m in _MARKS.values()) + ")")
_SLOT_OF_MARK = {mark: name for name, mark in _MARKS.items()}


@dataclass(frozen=True)
class PromptTemplate:
    """The prompt's text: instruction with {label}, {description} and {sentence}
    placeholders, the fixed start of the answer, and the span delimiters.

    use_chat_template (bool): Wrap the prompt in the tokenizer's chat template if it has one.
    system_prompt (Optional[str]): A system message. None keeps the chat template's default
        (SmolLM2's and Qwen2.5's add ~20 tokens to every prompt); "" sends an empty one,
        which replaces that default with the shortest system turn the template allows.
    demonstrations (int): Worked examples per label in the `{examples}` slot (0: the
        instruction has no such slot).
    example (str): How one worked example reads, with {sentence} and {answer} (the
        answer prefix and the spans, as an answer reads).
    """

    instruction: str = DEFAULT_INSTRUCTION
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    span_open: str = SPAN_OPEN
    span_close: str = SPAN_CLOSE
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    demonstrations: int = 0
    example: str = DEFAULT_EXAMPLE

    def __post_init__(self) -> None:
        counts = {slot: self.instruction.count("{" + slot + "}") for slot in SLOTS}
        if counts["sentence"] != 1 or counts["label"] < 1 or counts["description"] > 1 or counts["examples"] > 1:
            raise ValueError(
                "The prompt instruction must contain {sentence} exactly once, {label} at "
                "least once and {description} and {examples} at most once; got "
                f"{counts} in {self.instruction!r}."
            )
        if not isinstance(self.demonstrations, int) or isinstance(self.demonstrations, bool) or self.demonstrations < 0:
            raise ValueError(f"The prompt's `demonstrations` must be an integer >= 0, got {self.demonstrations!r}.")
        if bool(self.demonstrations) != bool(counts["examples"]):
            raise ValueError(
                f"The prompt asks for {self.demonstrations} demonstrations per label but its instruction "
                f"has {counts['examples']} {{examples}} slot. Fix: use spacy_cllmfs.prompt.v3 (label first, "
                "with examples), or put {examples} in the instruction and set demonstrations >= 1 together."
            )
        if self.example.count("{sentence}") != 1 or self.example.count("{answer}") != 1:
            raise ValueError(
                f"The prompt's `example` must contain {{sentence}} and {{answer}} once each, got {self.example!r}."
            )
        try:
            self.instruction.format(**{slot: "" for slot in SLOTS})
            self.example.format(sentence="", answer="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"The prompt instruction has an unknown placeholder ({err}). Only "
                "{label}, {description}, {sentence} and {examples} (and in `example`, "
                "{sentence} and {answer}) are filled in; write other "
                "braces as {{ and }}."
            ) from err
        if not self.span_open.strip() or not self.span_close.strip():
            raise ValueError("span_open and span_close must be visible delimiters like ' <<<'.")


    def render_examples(self, examples: Sequence[Tuple[str, Sequence[str]]]) -> str:
        """The `{examples}` text of worked examples given as (sentence text, entity texts):
        each answer reads as a real one (the answer prefix, then ` <<< span >>>` per span).
        """
        parts = []
        for text, spans in examples:
            answer = self.answer_prefix + "".join(f"{self.span_open} {span}{self.span_close}" for span in spans)
            parts.append(self.example.format(sentence=text, answer=answer))
        return "".join(parts)


@registry.misc("spacy_cllmfs.prompt.v1")
def prompt_v1(
    instruction: str = DEFAULT_INSTRUCTION,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    span_open: str = SPAN_OPEN,
    span_close: str = SPAN_CLOSE,
    use_chat_template: bool = True,
    system_prompt: Optional[str] = None,
) -> PromptTemplate:
    """The CLLMFS prompt, label first (see the module docstring for the text). Only the
    chat header is shared by the labels of a sentence."""
    return PromptTemplate(
        instruction=instruction,
        answer_prefix=answer_prefix,
        span_open=span_open,
        span_close=span_close,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )


@registry.misc("spacy_cllmfs.prompt.v2")
def prompt_v2(
    instruction: str = SENTENCE_FIRST_INSTRUCTION,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    span_open: str = SPAN_OPEN,
    span_close: str = SPAN_CLOSE,
    use_chat_template: bool = True,
    system_prompt: Optional[str] = "",
) -> PromptTemplate:
    """The CLLMFS prompt, sentence first: the sentence comes before the per-label
    question, so the chat header and the sentence form a prefix that all labels
    share (computed once per sentence), and the chat template's default system
    message is replaced by an empty one. The question and answer are the paper's.
    """
    return PromptTemplate(
        instruction=instruction,
        answer_prefix=answer_prefix,
        span_open=span_open,
        span_close=span_close,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )


@registry.misc("spacy_cllmfs.prompt.v3")
def prompt_v3(
    instruction: str = EXAMPLES_INSTRUCTION,
    demonstrations: int = 2,
    example: str = DEFAULT_EXAMPLE,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    span_open: str = SPAN_OPEN,
    span_close: str = SPAN_CLOSE,
    use_chat_template: bool = True,
    system_prompt: Optional[str] = "",
) -> PromptTemplate:
    """The CLLMFS prompt, label first, with worked examples: after the label's
    description come `demonstrations` sentences of the training data that have
    entities of the label, each with its answer (a sentence is never its own
    example). Everything before the sentence depends on the label only, so it is
    computed once per label and batch, not once per sentence.
    """
    return PromptTemplate(
        instruction=instruction,
        answer_prefix=answer_prefix,
        span_open=span_open,
        span_close=span_close,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
        demonstrations=demonstrations,
        example=example,
    )


@dataclass
class Prompt:
    """The token ids of one (sentence, label) prompt, answer prefix included.

    ids (List[int]): The prompt's token ids.
    label (str): The spaCy label asked for.
    shared_len (int): How many leading ids are the same for every label of this sentence.
    word_spans (List[Tuple[int, int]]): Per spaCy token of the sentence, its [start, end)
        positions in `ids` (empty for whitespace tokens, which the prompt leaves out).
    label_positions (List[int]): Positions of the first mention of the label's name.
    sentence_start (int): Where the sentence starts: the ids before it depend on the
        label only (and on the examples shown), not on the sentence.
    """

    ids: List[int]
    label: str
    shared_len: int
    word_spans: List[Tuple[int, int]]
    label_positions: List[int]
    sentence_start: int = 0

    @property
    def prefix(self) -> List[int]:
        """RETURNS (List[int]): The ids shared by all labels of the sentence."""
        return self.ids[: self.shared_len]

    @property
    def suffix(self) -> List[int]:
        """RETURNS (List[int]): The label's own ids, after the shared prefix."""
        return self.ids[self.shared_len :]

    def sentence_ids(self) -> List[int]:
        """RETURNS (List[int]): The ids of the sentence, in order."""
        return [t for s, e in self.word_spans for t in self.ids[s:e]]


@dataclass
class AnswerSpan:
    """One span of a parsed answer: its text and a score in [0, 1]."""

    text: str
    score: float


@dataclass
class AnswerFormat:
    """The token ids that delimit spans and end an answer."""

    open_ids: List[int]
    close_ids: List[int]
    end_id: int
    span_open: str = SPAN_OPEN
    span_close: str = SPAN_CLOSE
    _text_re: Any = field(default=None, repr=False)

    def parse_ids(self, ids: Sequence[int], logprobs: Sequence[float], decode: Any) -> List[AnswerSpan]:
        """Parse generated ids made under the copy constraint into spans.

        Complete `open ... close` groups become spans; an unfinished group at the
        end (the token budget ran out) is left out. The score is the geometric
        mean probability of the span's tokens and its closing delimiter.
        """
        spans: List[AnswerSpan] = []
        n_open, n_close = len(self.open_ids), len(self.close_ids)
        i = 0
        while i < len(ids):
            if list(ids[i : i + n_open]) != self.open_ids:
                i += 1
                continue
            start = i + n_open
            end = _find(ids, self.close_ids, start)
            if end < 0:
                break
            if end > start:
                scored = list(logprobs[start : end + 1])
                text = decode(list(ids[start:end])).strip()
                if text:
                    spans.append(AnswerSpan(text, math.exp(sum(scored) / len(scored))))
            i = end + n_close
        return spans

    def parse_text(self, text: str, score: float = 1.0) -> List[AnswerSpan]:
        """Parse free text like '<<< a >>> <<< b >>>' (unconstrained decoding, spacy-llm)."""
        if self._text_re is None:
            self._text_re = re.compile(
                re.escape(self.span_open.strip()) + r"(.*?)" + re.escape(self.span_close.strip()),
                re.DOTALL,
            )
        return [AnswerSpan(m.strip(), score) for m in self._text_re.findall(text) if m.strip()]


class PromptBuilder:
    """Turns (sentence, label) pairs into `Prompt`s and gold answers into ids.

    template (PromptTemplate): The prompt text.
    tokenizer: A Hugging Face tokenizer.
    """

    def __init__(self, template: PromptTemplate, tokenizer: Any) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self._anchor = _anchor_ids(tokenizer)
        prompt_text, after_answer = self._render(template, tokenizer)
        self.pieces: List[Tuple[str, Any]] = []  # ("ids", List[int]) or (slot, leading text)
        pending = ""
        for part in _MARK_RE.split(prompt_text):
            if part in _SLOT_OF_MARK:
                self.pieces.append((_SLOT_OF_MARK[part], pending))
                pending = ""
            elif part:
                stripped = part.rstrip(" ")
                pending = part[len(stripped) :]
                if stripped:
                    self.pieces.append(("ids", self._encode(stripped, at_start=not self.pieces)))
        if pending:
            self.pieces.append(("ids", self._encode(pending)))
        self.sentence_lead = next(lead for kind, lead in self.pieces if kind == "sentence")
        self.format = AnswerFormat(
            open_ids=self._encode(template.span_open),
            close_ids=self._encode(template.span_close),
            end_id=end_of_answer_id(tokenizer, after_answer),
            span_open=template.span_open,
            span_close=template.span_close,
        )
        self._cache: Dict[str, List[int]] = {}

    def _render(self, template: PromptTemplate, tokenizer: Any) -> Tuple[str, str]:
        user = template.instruction.format(**{slot: _MARKS[slot] for slot in SLOTS})
        assistant = template.answer_prefix + _MARKS["answer"]
        if template.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            if template.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": template.system_prompt})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            bos = ""
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
                bos = tokenizer.bos_token
            system = f"{template.system_prompt}\n\n" if template.system_prompt else ""
            text = f"{bos}{system}### Instruction:\n{user}\n\n### Response:\n{assistant}"
        if text.count(_MARKS["answer"]) != 1:
            raise ValueError("The chat template altered the prompt; set use_chat_template = false.")
        before, after = text.split(_MARKS["answer"])
        return before, after

    def _encode(self, text: str, at_start: bool = False) -> List[int]:
        """Tokenize a piece of the prompt as it reads in the middle of the prompt (or at
        its start). Byte-level BPE tokenizes a piece alone as it does in context.
        SentencePiece-style tokenizers (Metaspace, with a dummy prefix: Llama-2, Mistral,
        Phi-3) prefix every text with a space marker, so a piece alone would gain a
        marker (or lose the one its own space gives): it is tokenized after an anchor
        ("\n", which merges with nothing), and the anchor's ids are cut off."""
        if at_start or self._anchor is None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._encode_many([text])[0]

    def _encode_many(self, texts: List[str]) -> List[List[int]]:
        if self._anchor is None:
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        n = len(self._anchor)
        encoded = self.tokenizer([ANCHOR + t for t in texts], add_special_tokens=False)["input_ids"]
        return [list(ids[n:]) for ids in encoded]

    def encode_words(self, texts: List[str]) -> List[List[int]]:
        """Tokenize word pieces (with their leading space), with a cache."""
        missing = list({t for t in texts if t not in self._cache})
        if missing:
            encoded = self._encode_many(missing)
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache.update(zip(missing, encoded))
        return [self._cache[t] for t in texts]

    def word_pieces(self, sentence: Span) -> List[str]:
        """The text of each spaCy token as the prompt shows it: "" for whitespace
        tokens, else the token with a leading space if whitespace precedes it."""
        pieces: List[str] = []
        space_before, first = True, True
        for token in sentence:
            if token.is_space:
                pieces.append("")
                space_before = True
                continue
            lead = self.sentence_lead if first else (" " if space_before else "")
            pieces.append(lead + token.text)
            space_before, first = bool(token.whitespace_), False
        return pieces

    def count_tokens(self, sentence: Span) -> int:
        """RETURNS (int): The number of model tokens the sentence takes in a prompt."""
        pieces = [p for p in self.word_pieces(sentence) if p]
        return sum(len(ids) for ids in self.encode_words(pieces))

    def overhead(self, label: LabelInfo, examples: Optional[Mapping[str, str]] = None) -> int:
        """RETURNS (int): The number of prompt tokens that are not the sentence."""
        empty = self._assemble([], label, (examples or {}).get(label.label, ""))
        return len(empty.ids)

    def build(
        self, pieces: Sequence[str], labels: Sequence[LabelInfo], examples: Optional[Mapping[str, str]] = None
    ) -> List[Prompt]:
        """Build one prompt per label for a sentence given as `word_pieces`.

        examples (Optional[Mapping[str, str]]): Per label, the text of its `{examples}`
            slot (see `PromptTemplate.render_examples`); labels without one show none.
        """
        encoded = self.encode_words([p for p in pieces if p])
        words: List[List[int]] = []
        it = iter(encoded)
        for piece in pieces:
            words.append(next(it) if piece else [])
        examples = examples or {}
        return [self._assemble(words, label, examples.get(label.label, "")) for label in labels]

    def _assemble(self, words: List[List[int]], label: LabelInfo, examples: str = "") -> Prompt:
        ids: List[int] = []
        shared_len: Optional[int] = None
        sentence_start = 0
        word_spans: List[Tuple[int, int]] = []
        label_positions: List[int] = []
        slot_text = {"label": label.name, "description": label.description, "examples": examples}
        for kind, value in self.pieces:
            if kind == "ids":
                ids.extend(value)
            elif kind == "sentence":
                sentence_start = len(ids)
                for word in words:
                    word_spans.append((len(ids), len(ids) + len(word)))
                    ids.extend(word)
            else:
                if shared_len is None:
                    shared_len = len(ids)
                start = len(ids)
                ids.extend(self.encode_words([value + slot_text[kind]])[0])
                if kind == "label" and not label_positions:
                    label_positions = list(range(start, len(ids)))
        return Prompt(
            ids=ids,
            label=label.label,
            shared_len=len(ids) if shared_len is None else shared_len,
            word_spans=word_spans,
            label_positions=label_positions,
            sentence_start=sentence_start,
        )

    def answer_ids(self, prompt: Prompt, spans: Sequence[Tuple[int, int]]) -> List[int]:
        """The gold answer for `prompt`: spans given as [start, end) word indices of the
        sentence, copied from the prompt in order of their start, then the end token."""
        fmt = self.format
        ids: List[int] = []
        for start, end in sorted(set(spans)):
            positions = [p for s, e in prompt.word_spans[start:end] for p in range(s, e)]
            if not positions:
                continue
            ids.extend(fmt.open_ids)
            ids.extend(prompt.ids[positions[0] : positions[-1] + 1])
            ids.extend(fmt.close_ids)
        ids.append(fmt.end_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids back into text."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _anchor_ids(tokenizer: Any) -> Optional[List[int]]:
    """The ids of `ANCHOR` if pieces must be tokenized after it (see
    `PromptBuilder._encode`), or None if a piece tokenizes alone as in context."""

    def encode(text: str) -> List[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if encode("a") + encode(" b") + encode(".") == encode("a b."):
        return None
    anchor = encode(ANCHOR)
    for piece in (" b", ".", "b"):
        if encode(ANCHOR + piece)[: len(anchor)] != anchor:
            raise ValueError(
                "The tokenizer merges a line break with the text after it, so prompts cannot "
                "be assembled word by word. Fix: use a byte-level BPE or SentencePiece tokenizer."
            )
    return anchor


def end_of_answer_id(tokenizer: Any, after_answer: str) -> int:
    """The token that ends an answer: the special token that the chat template puts
    right after the assistant's text (e.g. <|im_end|>), else the eos token.

    after_answer (str): The rendered template's text after the assistant's content.
    RAISES (ValueError): If there is neither.
    """
    following = tokenizer(after_answer, add_special_tokens=False)["input_ids"] if after_answer.strip() else []
    if following and is_special(tokenizer, following[0]):
        return int(following[0])
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no end-of-sequence token and its chat template does not end a "
            "turn with a special token, so answers cannot end. Fix: use a tokenizer with an eos_token."
        )
    return int(tokenizer.eos_token_id)


def is_special(tokenizer: Any, token_id: int) -> bool:
    """RETURNS (bool): Whether the id is one of the tokenizer's special tokens."""
    if token_id in set(tokenizer.all_special_ids):
        return True
    token = (getattr(tokenizer, "added_tokens_decoder", None) or {}).get(token_id)
    return bool(getattr(token, "special", False))


def _find(seq: Sequence[int], sub: Sequence[int], start: int) -> int:
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if list(seq[i : i + n]) == list(sub):
            return i
    return -1
