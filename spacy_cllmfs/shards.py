"""Shards: how `annotate` reads its input, writes its output and knows where it stopped.

The input is split into shards of `shard_size` lines (`scan` reads bytes only);
shard `i` always holds the same lines, is written as one file under a temporary
name and renamed, and counts as finished once its line is in the manifest
(`manifest.jsonl`). A run killed at any point and started again redoes at most
the shards that were in flight, and reading the shards in index order gives the
docs in input order.
"""
import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.tokens import Doc, DocBin
from spacy.vocab import Vocab

INPUT_FORMATS = ("auto", "jsonl", "text", "spacy")
OUTPUT_FORMATS = ("spacy", "jsonl")
MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
MANIFEST_VERSION = 1
CHECKED_SETTINGS = (
    "input", "input_bytes", "input_head_sha1", "input_format", "output_format", "shard_size", "pipeline",
)
PathLike = Union[str, Path]


class AnnotateError(ValueError):
    """The corpus cannot be annotated as asked; the message names the fix."""


@dataclass
class ShardSpec:
    """A shard of the input: `n_lines` lines (or docs of a .spacy file) from `first_line`.

    index (int): The shard's number; it names the output file and fixes its place.
    first_line (int): The 1-based line (or doc) number of its first line.
    n_lines (int): The lines it covers, blank and unreadable ones included.
    n_docs (int): Its non-blank lines: the docs it can hold at most.
    start (int): Byte offset of its first line (doc index for .spacy input).
    end (int): Byte offset after its last line (doc index for .spacy input).
    payload (Optional[bytes]): Its docs as DocBin bytes (.spacy input only).
    """

    index: int
    first_line: int
    n_lines: int
    n_docs: int
    start: int
    end: int
    payload: Optional[bytes] = None

    def to_json(self) -> str:
        """RETURNS (str): The spec as JSON (the payload as base64), e.g. for a Ray dataset."""
        data: Dict[str, Any] = {k: v for k, v in asdict(self).items() if k != "payload"}
        data["payload"] = base64.b64encode(self.payload).decode("ascii") if self.payload is not None else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ShardSpec":
        data = json.loads(text)
        payload = data.pop("payload", None)
        return cls(**data, payload=base64.b64decode(payload) if payload is not None else None)


@dataclass
class ShardResult:
    """What a worker reports for a finished (written) shard."""

    shard: int
    file: str
    first_line: int
    lines: int
    docs: int
    errors: List[Tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ShardResult":
        errors = [(int(line), str(reason)) for line, reason in data.get("errors", [])]
        return cls(
            shard=int(data["shard"]), file=str(data["file"]), first_line=int(data["first_line"]),
            lines=int(data["lines"]), docs=int(data["docs"]), errors=errors, seconds=float(data.get("seconds", 0.0)),
        )


@dataclass
class Record:
    """One readable input line: its line number, text and meta (or a .spacy Doc)."""

    line: int
    text: str
    meta: Any = None
    doc: Optional[Doc] = None


# -- reading the input ---------------------------------------------------------------


def detect_input_format(path: PathLike) -> str:
    """RETURNS (str): "spacy" for .spacy files, "jsonl" for .jsonl/.json, else "text"."""
    suffix = Path(path).suffix.lower()
    if suffix == ".spacy":
        return "spacy"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "text"


def scan(path: PathLike, input_format: str, shard_size: int) -> Iterator[ShardSpec]:
    """Split the input into ShardSpecs of `shard_size` lines (docs for .spacy),
    reading it once as bytes (text, JSONL) without parsing it."""
    if shard_size < 1:
        raise AnnotateError(f"The shard size must be >= 1, got {shard_size}. Fix: e.g. --shard-size 1000.")
    path = Path(path)
    if input_format == "spacy":
        n_docs = len(DocBin().from_disk(path))
        for index, start in enumerate(range(0, n_docs, shard_size)):
            end = min(start + shard_size, n_docs)
            yield ShardSpec(index, start + 1, end - start, end - start, start, end)
        return
    index, offset, first_line, start = 0, 0, 1, 0
    n_lines = n_docs = 0
    with path.open("rb") as file:
        for raw in file:
            n_lines += 1
            n_docs += bool(raw.strip())
            offset += len(raw)
            if n_lines == shard_size:
                yield ShardSpec(index, first_line, n_lines, n_docs, start, offset)
                index, first_line, start = index + 1, first_line + n_lines, offset
                n_lines = n_docs = 0
    if n_lines:
        yield ShardSpec(index, first_line, n_lines, n_docs, start, offset)


def with_payloads(path: PathLike, specs: Iterable[ShardSpec]) -> Iterator[ShardSpec]:
    """Attach their docs (DocBin bytes) to the ShardSpecs of a .spacy input, in one pass.

    DocBin is not a streaming format: the file is read whole, once, here.
    """
    docbin = DocBin(store_user_data=True).from_disk(path)
    docs = docbin.get_docs(Vocab())
    position = 0
    for spec in specs:
        for _ in range(spec.start - position):
            next(docs)
        chunk = [next(docs) for _ in range(spec.end - spec.start)]
        position = spec.end
        spec.payload = DocBin(store_user_data=True, docs=chunk).to_bytes()
        yield spec


def read_shard(
    spec: ShardSpec, path: PathLike, input_format: str, vocab: Vocab, max_chars: int
) -> Tuple[List[Record], List[Tuple[int, str]]]:
    """Read a shard's lines.

    RETURNS (Tuple[List[Record], List[Tuple[int, str]]]): The readable records, and
        (line number, reason) for each line that cannot be read. Blank lines are skipped.
    """
    records: List[Record] = []
    errors: List[Tuple[int, str]] = []
    if input_format == "spacy":
        if spec.payload is None:
            raise AnnotateError(f"Shard {spec.index} of a .spacy input came without its docs.")
        docs = DocBin().from_bytes(spec.payload).get_docs(vocab)
        for line, doc in enumerate(docs, spec.first_line):
            if len(doc.text) > max_chars:
                errors.append((line, _too_long(len(doc.text), max_chars)))
            else:
                records.append(Record(line, doc.text, doc.user_data.get("meta"), doc))
        return records, errors
    with Path(path).open("rb") as file:
        file.seek(spec.start)
        data = file.read(spec.end - spec.start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line, raw in enumerate(lines, spec.first_line):
        if not raw.strip():
            continue
        try:
            record = _parse_line(raw, line, input_format)
        except ValueError as err:
            errors.append((line, str(err)))
            continue
        if len(record.text) > max_chars:
            errors.append((line, _too_long(len(record.text), max_chars)))
        else:
            records.append(record)
    return records, errors


def _parse_line(raw: bytes, line: int, input_format: str) -> Record:
    try:
        text = raw.decode("utf8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    text = text[:-1] if text.endswith("\r") else text
    if line == 1:
        text = text.lstrip("\ufeff")
    if input_format == "text":
        return Record(line, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f'a JSON {type(value).__name__}, not an object like {{"text": "...", "meta": {{}}}}')
    if not isinstance(value.get("text"), str):
        found = "no" if "text" not in value else f"a {type(value['text']).__name__} as"
        raise ValueError(f'{found} "text" field: each line needs {{"text": "...", "meta": ...}}')
    return Record(line, value["text"], value.get("meta"))


def _too_long(n_chars: int, max_chars: int) -> str:
    return f"{n_chars} characters, more than --max-chars {max_chars} (split the text, or raise --max-chars)"


# -- the output ----------------------------------------------------------------------


def shard_name(index: int, output_format: str) -> str:
    """RETURNS (str): The file name of shard `index`."""
    return f"shard-{index:06d}.{output_format}"


def doc_record(doc: Doc) -> Dict[str, Any]:
    """A Doc as a JSONL record: line, text, meta (if any) and ents as character offsets."""
    record: Dict[str, Any] = {"line": doc.user_data.get("line"), "text": doc.text}
    if doc.user_data.get("meta") is not None:
        record["meta"] = doc.user_data["meta"]
    record["ents"] = [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents]
    return record


def encode_shard(docs: Sequence[Doc], output_format: str) -> bytes:
    """RETURNS (bytes): The shard file's content."""
    if output_format == "spacy":
        return DocBin(store_user_data=True, docs=docs).to_bytes()
    return "".join(json.dumps(doc_record(doc), ensure_ascii=False) + "\n" for doc in docs).encode("utf8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, then rename it: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


class Manifest:
    """The record of finished shards in an output folder (`manifest.jsonl`).

    The first line holds the run's settings; each further line one finished shard.
    A line is appended only after its shard file is in place; a line cut off by
    a kill is dropped when the manifest is opened again.
    """

    def __init__(self, output_dir: Path, settings: Dict[str, Any], finished: Dict[int, ShardResult]) -> None:
        self.output_dir = output_dir
        self.settings = settings
        self.finished = finished

    @classmethod
    def open(cls, output_dir: PathLike, settings: Dict[str, Any], overwrite: bool = False) -> "Manifest":
        """Open (or start) the manifest of `output_dir` for a run with `settings`.

        RAISES (AnnotateError): If the folder holds the output of another run.
        """
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise AnnotateError(f"Output '{output_dir}' is a file. Fix: name a folder for the shards.")
        output_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in _own_files(output_dir):
                path.unlink()
        path = output_dir / MANIFEST
        if path.exists():
            stored, finished = read_manifest(path, repair=True)
            changed = [key for key in CHECKED_SETTINGS if stored.get(key) != settings.get(key)]
            if changed:
                details = "; ".join(f"{k}: {stored.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
                raise AnnotateError(
                    f"'{output_dir}' holds the shards of another run ({details}). Fix: run the same "
                    "command as before to resume it, use a new output folder, or pass --overwrite to start afresh."
                )
            finished = {i: r for i, r in finished.items() if (output_dir / r.file).is_file()}
        else:
            others = [p.name for p in output_dir.iterdir() if not p.name.startswith(".")]
            if others:
                raise AnnotateError(
                    f"Output folder '{output_dir}' is not empty ({', '.join(sorted(others)[:3])}) and holds no "
                    f"{MANIFEST}. Fix: name a new or empty folder."
                )
            header = json.dumps({"manifest": MANIFEST_VERSION, **settings}, ensure_ascii=False) + "\n"
            write_atomic(path, header.encode("utf8"))
            finished = {}
        for stale in output_dir.glob(".*.tmp"):
            stale.unlink()
        keep = {r.file for r in finished.values()} | {MANIFEST}
        for orphan in output_dir.glob("shard-*"):
            if orphan.name not in keep:
                orphan.unlink()  # written, but killed before its manifest line
        manifest = cls(output_dir, settings, finished)
        manifest.write_errors()
        return manifest

    def commit(self, result: ShardResult) -> None:
        """Record a finished shard (its file must be in place)."""
        with (self.output_dir / ERRORS).open("a", encoding="utf8") as file:
            for line, reason in result.errors:
                file.write(json.dumps({"line": line, "reason": reason}, ensure_ascii=False) + "\n")
        with (self.output_dir / MANIFEST).open("a", encoding="utf8") as file:
            file.write(result.to_json() + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.finished[result.shard] = result

    def write_errors(self) -> None:
        """(Re)write the errors file from the finished shards, in line order."""
        errors = sorted(error for r in self.finished.values() for error in r.errors)
        text = "".join(json.dumps({"line": ln, "reason": why}, ensure_ascii=False) + "\n" for ln, why in errors)
        write_atomic(self.output_dir / ERRORS, text.encode("utf8"))

    @property
    def n_docs(self) -> int:
        return sum(r.docs for r in self.finished.values())

    @property
    def n_errors(self) -> int:
        return sum(len(r.errors) for r in self.finished.values())


def _own_files(output_dir: Path) -> List[Path]:
    names = [output_dir / MANIFEST, output_dir / ERRORS]
    return [p for p in names if p.exists()] + list(output_dir.glob("shard-*")) + list(output_dir.glob(".*.tmp"))


def read_manifest(path: PathLike, repair: bool = False) -> Tuple[Dict[str, Any], Dict[int, ShardResult]]:
    """Read a manifest: the run's settings and the finished shards (the last entry per shard).

    repair (bool): Cut off a last line left unfinished by a kill (it has no newline).
    RAISES (AnnotateError): If a complete line is not valid.
    """
    path = Path(path)
    data = path.read_bytes()
    complete = data.split(b"\n")[:-1]  # the part after the last newline was cut off, if any
    entries: List[Dict[str, Any]] = []
    for number, raw in enumerate(complete, 1):
        try:
            entry = json.loads(raw)
        except ValueError as err:
            entry = err
        if not isinstance(entry, dict):
            raise AnnotateError(
                f"{path}:{number} is not a valid manifest line ({entry}). Fix: pass --overwrite to start afresh."
            )
        entries.append(entry)
    if not entries or entries[0].get("manifest") != MANIFEST_VERSION:
        raise AnnotateError(f"{path} is not a spacy-cllmfs manifest. Fix: pass --overwrite to start afresh.")
    good = sum(len(raw) + 1 for raw in complete)
    if repair and good < len(data):
        with path.open("r+b") as file:
            file.truncate(good)
    finished = {}
    for entry in entries[1:]:
        result = ShardResult.from_dict(entry)
        finished[result.shard] = result
    settings = {k: v for k, v in entries[0].items() if k != "manifest"}
    return settings, finished


def iter_docs(output_dir: PathLike, vocab: Optional[Vocab] = None) -> Iterator[Doc]:
    """Read the annotated docs of a `.spacy` output folder, in input order.

    Each doc's `user_data` holds its input "line" and, if the input had one, its "meta".
    """
    vocab = vocab if vocab is not None else Vocab()
    settings, finished = read_manifest(Path(output_dir) / MANIFEST)
    if settings.get("output_format") != "spacy":
        raise AnnotateError(f"'{output_dir}' holds JSONL shards. Fix: read them with iter_records.")
    for index in sorted(finished):
        yield from DocBin().from_disk(Path(output_dir) / finished[index].file).get_docs(vocab)


def iter_records(output_dir: PathLike) -> Iterator[Dict[str, Any]]:
    """Read the annotations of an output folder (either format) as JSONL records
    ({"line", "text", "meta", "ents": [{"start", "end", "label"}]}), in input order."""
    settings, finished = read_manifest(Path(output_dir) / MANIFEST)
    if settings.get("output_format") == "spacy":
        for doc in iter_docs(output_dir):
            yield doc_record(doc)
        return
    for index in sorted(finished):
        yield from srsly.read_jsonl(Path(output_dir) / finished[index].file)
