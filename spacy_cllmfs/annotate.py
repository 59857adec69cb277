"""Annotate a corpus with a pipeline: an input file -> shards of annotated docs.

    scan the input once (bytes only) -> ShardSpecs of `shard_size` lines
    -> skip the shards that the manifest lists as finished
    -> per shard: read its lines -> nlp.pipe -> write the shard (temporary name, then
       rename) -> append one line to the manifest

The manifest (`manifest.jsonl` in the output folder) is the truth: a shard file
counts only once its manifest line is written, so a run killed at any point and
started again with the same command redoes at most the shards that were in
flight. Shard `i` always holds the same input lines, so reading the shards in
index order gives the docs in input order, however many workers wrote them and
however often the run was resumed.

Workers are processes started with "spawn" (never fork: CUDA does not survive
it), one per device, each loading the pipeline once; the parent only scans the
input, hands out ShardSpecs (byte ranges: small messages) and writes the
manifest. `annotate_ray` runs the same shards on a Ray cluster (Ray Data's
`map_batches` with an actor pool); `EntityAnnotator` is the actor for users who
already hold a Ray dataset of texts.
"""
import base64
import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import srsly
from spacy.language import Language
from spacy.tokens import Doc, DocBin
from spacy.vocab import Vocab

logger = logging.getLogger("spacy_cllmfs")

INPUT_FORMATS = ("auto", "jsonl", "text", "spacy")
OUTPUT_FORMATS = ("spacy", "jsonl")
MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
MANIFEST_VERSION = 1
CHECKED_SETTINGS = (
    "input", "input_bytes", "input_head_sha1", "input_format", "output_format", "shard_size", "pipeline",
)
FACTORY = "cllmfs_ner"
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


@dataclass
class AnnotateSummary:
    """The state of an output folder after a run."""

    output: Path
    shards: int
    shards_before: int
    docs: int
    errors: int
    seconds: float

    @property
    def shards_written(self) -> int:
        return self.shards - self.shards_before


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


# -- the pipeline ------------------------------------------------------------------


def pipeline_config(pipeline: str) -> Any:
    """RETURNS (Config): The config of a pipeline folder or installed package."""
    from spacy.util import get_package_path, is_package, load_config

    path = Path(pipeline)
    if not path.exists() and is_package(pipeline):
        path = get_package_path(pipeline)
    candidates = [path / "config.cfg"] + sorted(path.glob("*/config.cfg"))
    for candidate in candidates:
        if candidate.is_file():
            return load_config(candidate)
    raise AnnotateError(
        f"Pipeline '{pipeline}' was not found (no config.cfg). Fix: pass a folder written by "
        "nlp.to_disk (e.g. training/model-best) or the name of an installed pipeline package."
    )


def load_pipeline(pipeline: str, device: Optional[str] = None) -> Language:
    """Load a pipeline, with the model of every `cllmfs_ner` component moved to `device`.

    device (Optional[str]): "cpu", "cuda:N", ...; None keeps the configured device.
    """
    import spacy

    overrides: Dict[str, Any] = {}
    if device is not None:
        names = [
            name for name, block in pipeline_config(pipeline).get("components", {}).items()
            if block.get("factory") == FACTORY
        ]
        if not names:
            raise AnnotateError(
                f"Pipeline '{pipeline}' has no {FACTORY} component, so --devices/--workers cannot "
                "place its model. Fix: annotate without --devices (one process)."
            )
        overrides = {"components": {name: {"model": {"device": device}} for name in names}}
    return spacy.load(pipeline, config=overrides)


def cpu_count() -> int:
    """RETURNS (int): The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def quiet_loading() -> None:
    """No per-process weight-loading bars from transformers in workers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@dataclass
class WorkerSettings:
    """What a worker needs to annotate shards; picklable."""

    pipeline: str
    input_path: str
    input_format: str
    output_dir: str
    output_format: str
    batch_size: int
    max_chars: int


class ShardAnnotator:
    """Loads the pipeline once, then annotates and writes whole shards.

    settings (WorkerSettings): Input, output and batching.
    device (Optional[str]): Where the cllmfs_ner models go (None: as configured).
    threads (Optional[int]): torch CPU threads for this process (None: unchanged).
    """

    def __init__(self, settings: WorkerSettings, device: Optional[str] = None, threads: Optional[int] = None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.settings = settings
        self.nlp = load_pipeline(settings.pipeline, device)
        for _, component in self.nlp.pipeline:  # load the weights now, not with the first shard
            model = getattr(component, "model", None)
            if callable(getattr(model, "load", None)) and hasattr(model, "is_loaded"):
                model.load()

    def __call__(self, spec: ShardSpec, on_progress: Optional[Callable[[int], None]] = None) -> ShardResult:
        """Annotate the shard `spec` and write it; RETURNS (ShardResult)."""
        begin = time.perf_counter()
        docs, errors = self.annotate(spec, on_progress)
        name = shard_name(spec.index, self.settings.output_format)
        write_atomic(Path(self.settings.output_dir) / name, encode_shard(docs, self.settings.output_format))
        return ShardResult(
            spec.index, name, spec.first_line, spec.n_lines, len(docs), errors, time.perf_counter() - begin
        )

    def annotate(
        self, spec: ShardSpec, on_progress: Optional[Callable[[int], None]] = None
    ) -> Tuple[List[Doc], List[Tuple[int, str]]]:
        """RETURNS (Tuple[List[Doc], List[Tuple[int, str]]]): The shard's annotated docs
        in input order, and (line, reason) for each line left out."""
        records, errors = self._read(spec)
        done: List[Doc] = []
        try:
            for doc in self.nlp.pipe(self._docs(records), batch_size=self.settings.batch_size):
                done.append(doc)
                if on_progress is not None and len(done) % self.settings.batch_size == 0:
                    on_progress(self.settings.batch_size)
        except Exception as err:  # one doc broke the batch: find it, keep the rest
            logger.warning("Shard %d: the pipeline failed (%s); annotating its docs one by one.", spec.index, err)
            records, _ = self._read(spec)  # fresh docs: the failed batch may be half-annotated
            done = []
            for record, doc in zip(records, self._docs(records)):
                try:
                    done.append(self.nlp(doc))
                except Exception as doc_err:
                    reason = f"the pipeline failed on this doc: {type(doc_err).__name__}: {doc_err}"
                    errors.append((record.line, reason))
            if records and not done:  # not a bad doc: a broken pipeline
                raise AnnotateError(
                    f"The pipeline failed on every doc of shard {spec.index} ({type(err).__name__}: {err}). "
                    "Fix the pipeline, then run the same command again to resume."
                ) from err
        return done, sorted(errors)

    def _read(self, spec: ShardSpec) -> Tuple[List[Record], List[Tuple[int, str]]]:
        s = self.settings
        return read_shard(spec, s.input_path, s.input_format, self.nlp.vocab, s.max_chars)

    def _docs(self, records: Sequence[Record]) -> Iterator[Doc]:
        for record in records:
            doc = record.doc if record.doc is not None else self.nlp.make_doc(record.text)
            doc.user_data["line"] = record.line
            if record.meta is not None:
                doc.user_data["meta"] = record.meta
            yield doc


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


# -- running ---------------------------------------------------------------------


@dataclass
class Plan:
    """The shards still to do, and what the manifest already holds."""

    manifest: Manifest
    pending: List[ShardSpec]
    total_docs: int
    done_docs: int
    settings: WorkerSettings


def plan(
    pipeline: str,
    input_path: PathLike,
    output_dir: PathLike,
    *,
    input_format: str = "auto",
    output_format: str = "spacy",
    shard_size: int = 1000,
    batch_size: int = 64,
    max_chars: int = 1_000_000,
    overwrite: bool = False,
) -> Plan:
    """Check the settings, open the manifest and list the shards still to do."""
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"Input file '{input_path}' does not exist. Fix: check the path.")
    if input_format not in INPUT_FORMATS:
        raise AnnotateError(f"Unknown input format '{input_format}'. Use one of: {', '.join(INPUT_FORMATS)}.")
    if output_format not in OUTPUT_FORMATS:
        raise AnnotateError(f"Unknown output format '{output_format}'. Use one of: {', '.join(OUTPUT_FORMATS)}.")
    for name, value in (("batch size", batch_size), ("--max-chars", max_chars)):
        if value < 1:
            raise AnnotateError(f"The {name} must be >= 1, got {value}.")
    fmt = detect_input_format(input_path) if input_format == "auto" else input_format
    pipeline_config(pipeline)  # fails early on a wrong pipeline name
    resolved_pipeline = str(Path(pipeline).resolve()) if Path(pipeline).exists() else pipeline
    with input_path.open("rb") as file:
        head = hashlib.sha1(file.read(1 << 20)).hexdigest()
    run_settings = {
        "input": str(input_path.resolve()), "input_bytes": input_path.stat().st_size, "input_head_sha1": head,
        "input_format": fmt, "output_format": output_format, "shard_size": shard_size,
        "pipeline": resolved_pipeline,
    }
    manifest = Manifest.open(output_dir, run_settings, overwrite=overwrite)
    specs = list(scan(input_path, fmt, shard_size))
    pending = [spec for spec in specs if spec.index not in manifest.finished]
    total = sum(spec.n_docs for spec in specs)
    done = total - sum(spec.n_docs for spec in pending)
    worker = WorkerSettings(resolved_pipeline, str(input_path.resolve()), fmt, str(Path(output_dir).resolve()),
                            output_format, batch_size, max_chars)
    return Plan(manifest, pending, total, done, worker)


def parse_devices(devices: Optional[Union[str, Sequence[str]]]) -> Optional[List[str]]:
    """Parse "cuda:0,cuda:1" into a checked list of devices (None if not given)."""
    from .models import resolve_device

    if devices is None:
        return None
    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if not items:
        raise AnnotateError("--devices is empty. Fix: e.g. --devices cuda:0,cuda:1 (or --workers N on CPU).")
    for device in items:
        if device == "auto":
            raise AnnotateError("--devices takes concrete devices (cpu, cuda:N), not 'auto'.")
        resolve_device(device)
    return items


def annotate(
    pipeline: str,
    input_path: PathLike,
    output_dir: PathLike,
    *,
    input_format: str = "auto",
    output_format: str = "spacy",
    shard_size: int = 1000,
    batch_size: int = 64,
    workers: int = 1,
    devices: Optional[Union[str, Sequence[str]]] = None,
    threads: Optional[int] = None,
    max_chars: int = 1_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> AnnotateSummary:
    """Annotate a corpus file into `.spacy` or JSONL shards; resumes a killed run.

    pipeline (str): A pipeline folder or package (e.g. training/model-best).
    input_path (PathLike): JSONL ({"text": ..., "meta": ...} per line), plain text (one
        doc per line) or a .spacy file.
    output_dir (PathLike): The folder for the shards, manifest.jsonl and errors.jsonl.
    input_format (str): "auto" (from the suffix), "jsonl", "text" or "spacy".
    output_format (str): "spacy" (DocBin shards) or "jsonl" (ents as character offsets).
    shard_size (int): Input lines per shard: the unit of output and of resuming.
    batch_size (int): Docs per `nlp.pipe` batch.
    workers (int): CPU worker processes (the cores are split among them); 1 runs in
        this process with the configured device.
    devices (Optional[Union[str, Sequence[str]]]): One worker process per device, e.g.
        "cuda:0,cuda:1" (overrides `workers`).
    threads (Optional[int]): torch threads per worker (default: cores / workers when
        there are several workers; unchanged in this process otherwise).
    max_chars (int): Longer texts go to the errors file instead of the pipeline.
    overwrite (bool): Delete the output of an earlier run in `output_dir` first.
    progress (bool): Show a progress bar (docs/s and ETA) on stderr.
    RETURNS (AnnotateSummary): Shards, docs and errors in the output folder.
    """
    begin = time.perf_counter()
    device_list = parse_devices(devices)
    if workers < 1:
        raise AnnotateError(f"--workers must be >= 1, got {workers}.")
    if device_list is not None and workers > 1:
        raise AnnotateError(
            "--workers and --devices were both given. Fix: use --devices alone, which starts one worker "
            "per listed device (list a device twice for two workers on it: --devices cuda:0,cuda:0)."
        )
    if device_list is None and workers > 1:
        device_list = ["cpu"] * workers
    if threads is not None and threads < 1:
        raise AnnotateError(f"--threads must be >= 1, got {threads}.")
    if device_list is not None and len(device_list) > 1 and threads is None:
        threads = max(1, cpu_count() // len(device_list))
    todo = plan(
        pipeline, input_path, output_dir, input_format=input_format, output_format=output_format,
        shard_size=shard_size, batch_size=batch_size, max_chars=max_chars, overwrite=overwrite,
    )
    shards_before = len(todo.manifest.finished)
    if todo.pending:
        bar = _progress_bar(todo, progress, len(device_list or [None]))
        try:
            if device_list is None or len(device_list) == 1:
                _run_here(todo, device_list[0] if device_list else None, threads, bar)
            else:
                _run_workers(todo, device_list, threads, bar)
        finally:
            bar.close()
    todo.manifest.write_errors()
    return AnnotateSummary(
        Path(output_dir), len(todo.manifest.finished), shards_before, todo.manifest.n_docs,
        todo.manifest.n_errors, time.perf_counter() - begin,
    )


def _progress_bar(todo: Plan, enabled: bool, n_workers: int) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=todo.total_docs, initial=todo.done_docs, unit="doc", disable=not enabled,
               dynamic_ncols=True, smoothing=0.05, desc="annotate")
    bar.set_postfix_str(f"{len(todo.pending)} shards to do, {n_workers} worker(s)")
    return bar


class _ShardProgress:
    """Counts docs per shard, so that a finished shard tops the bar up to its size."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.counted: Dict[int, int] = {}

    def add(self, shard: int, n: int) -> None:
        self.counted[shard] = self.counted.get(shard, 0) + n
        self.bar.update(n)

    def finish(self, spec: ShardSpec) -> None:
        rest = spec.n_docs - self.counted.pop(spec.index, 0)
        if rest > 0:
            self.bar.update(rest)


def _specs(todo: Plan) -> Iterator[ShardSpec]:
    if todo.settings.input_format == "spacy":
        return with_payloads(todo.settings.input_path, todo.pending)
    return iter(todo.pending)


def _run_here(todo: Plan, device: Optional[str], threads: Optional[int], bar: Any) -> None:
    import torch

    before = torch.get_num_threads()
    counter = _ShardProgress(bar)
    try:
        annotator = ShardAnnotator(todo.settings, device, threads)
        for spec in _specs(todo):
            result = annotator(spec, lambda n, i=spec.index: counter.add(i, n))
            todo.manifest.commit(result)
            counter.finish(spec)
    finally:
        torch.set_num_threads(before)


def _worker_main(
    worker_id: int, settings: WorkerSettings, device: str, threads: Optional[int], tasks: Any, results: Any
) -> None:
    """A worker process: load the pipeline once, then annotate the shards it is given."""
    try:
        quiet_loading()
        annotator = ShardAnnotator(settings, device, threads)
        results.put(("ready", worker_id, device))
        while True:
            spec = tasks.get()
            if spec is None:
                break
            result = annotator(spec, lambda n, i=spec.index: results.put(("progress", i, n)))
            results.put(("done", worker_id, result))
    except BaseException:  # reported to the parent, which stops the run
        results.put(("failed", worker_id, traceback.format_exc()))


def _run_workers(todo: Plan, devices: List[str], threads: Optional[int], bar: Any) -> None:
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(i, todo.settings, device, threads, tasks, results),
                    name=f"cllmfs-annotate-{i}", daemon=True)
        for i, device in enumerate(devices)
    ]
    for proc in procs:
        proc.start()
    specs = _specs(todo)
    in_flight: Dict[int, ShardSpec] = {}
    counter = _ShardProgress(bar)
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < 2 * len(procs):  # bounded: a few shards per worker
                spec = next(specs, None)
                if spec is None:
                    exhausted = True
                    for _ in procs:
                        tasks.put(None)
                    break
                in_flight[spec.index] = spec
                tasks.put(spec)
            if exhausted and not in_flight:
                break
            try:
                kind, who, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    raise AnnotateError(
                        f"Worker process {dead[0].name} died (exit code {dead[0].exitcode}), e.g. out of "
                        "memory. The finished shards are kept: run the same command again to resume."
                    )
                continue
            if kind == "progress":
                counter.add(who, value)
            elif kind == "done":
                todo.manifest.commit(value)
                counter.finish(in_flight.pop(value.shard))
            elif kind == "failed":
                raise AnnotateError(
                    f"Worker {who} ({devices[who]}) failed; the finished shards are kept, so the same "
                    f"command resumes the run once the cause is fixed.\n{value}"
                )
    finally:
        for proc in procs:
            proc.join(timeout=10 if exhausted and not in_flight else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        tasks.close()
        results.close()


# -- Ray -------------------------------------------------------------------------


class EntityAnnotator:
    """A Ray Data actor that runs a pipeline over batches of texts.

    Use it on a dataset that you already have (one model per actor):

        ds.map_batches(EntityAnnotator, fn_constructor_kwargs={"pipeline": "model-best"},
                       batch_size=64, concurrency=4, num_gpus=1)

    pipeline (str): A pipeline folder or package, readable on every node.
    device (Optional[str]): Where the cllmfs_ner models go; None: "cuda" if the
        actor was given a GPU, else "cpu".
    text_column (str): The column holding the texts; an "ents" column is added with
        the entities of each text as [{"start", "end", "label"}] (character offsets).
    """

    def __init__(self, pipeline: str, device: Optional[str] = None, text_column: str = "text",
                 batch_size: int = 64) -> None:
        quiet_loading()
        device = device or _ray_device()
        self.nlp = load_pipeline(pipeline, device)
        self.text_column = text_column
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        texts = [str(text) for text in batch[self.text_column]]
        ents = [
            [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents]
            for doc in self.nlp.pipe(texts, batch_size=self.batch_size)
        ]
        return {**batch, "ents": ents}


def _ray_device() -> str:
    try:
        import ray

        return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:  # not inside a Ray worker
        return "cpu"


class _RayShardWriter:
    """The actor of `annotate_ray`: a ShardAnnotator per actor, one shard per call."""

    def __init__(self, settings: WorkerSettings, device: Optional[str], threads: Optional[int]) -> None:
        quiet_loading()
        self.annotator = ShardAnnotator(settings, device or _ray_device(), threads)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {"result": [self.annotator(ShardSpec.from_json(str(spec))).to_json() for spec in batch["spec"]]}


def annotate_ray(
    pipeline: str,
    input_path: PathLike,
    output_dir: PathLike,
    *,
    address: Optional[str] = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    input_format: str = "auto",
    output_format: str = "spacy",
    shard_size: int = 1000,
    batch_size: int = 64,
    max_chars: int = 1_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> AnnotateSummary:
    """Annotate a corpus on a Ray cluster: the same shards and manifest as `annotate`.

    The shards still to do become a Ray dataset; `map_batches` runs them on a pool of
    `actors` actors, each holding the pipeline on its GPU (`gpus_per_actor`) or CPU
    slice (`cpus_per_actor` cores). Actors read their lines from `input_path` and
    write their shards into `output_dir` themselves, so both must be reachable at
    the same path on every node (a shared filesystem); the driver writes the manifest.

    address (Optional[str]): The cluster: "auto" (the one this node belongs to),
        "ray://HOST:10001", or None to use a running `ray.init()` or start a local one.
    Other settings as in `annotate`.
    """
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise AnnotateError(
            "Ray is not installed. Fix: pip install 'spacy-cllmfs[ray]' (or 'ray[data]>=2.9')."
        ) from err
    if actors < 1:
        raise AnnotateError(f"The number of Ray actors must be >= 1, got {actors}.")
    begin = time.perf_counter()
    todo = plan(
        pipeline, input_path, output_dir, input_format=input_format, output_format=output_format,
        shard_size=shard_size, batch_size=batch_size, max_chars=max_chars, overwrite=overwrite,
    )
    shards_before = len(todo.manifest.finished)
    if todo.pending:
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        rows = [{"spec": spec.to_json()} for spec in _specs(todo)]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4096))
        threads = max(1, int(cpus_per_actor)) if not gpus_per_actor else None
        results = dataset.map_batches(
            _RayShardWriter,
            fn_constructor_kwargs={"settings": todo.settings, "device": None, "threads": threads},
            batch_size=1,
            concurrency=actors,
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
        by_index = {spec.index: spec for spec in todo.pending}
        bar = _progress_bar(todo, progress, actors)
        try:
            for row in results.iter_rows():
                result = ShardResult.from_dict(json.loads(row["result"]))
                todo.manifest.commit(result)
                bar.update(by_index[result.shard].n_docs)
        finally:
            bar.close()
    todo.manifest.write_errors()
    return AnnotateSummary(
        Path(output_dir), len(todo.manifest.finished), shards_before, todo.manifest.n_docs,
        todo.manifest.n_errors, time.perf_counter() - begin,
    )


__all__ = [
    "AnnotateError",
    "AnnotateSummary",
    "EntityAnnotator",
    "Manifest",
    "ShardAnnotator",
    "ShardResult",
    "ShardSpec",
    "annotate",
    "annotate_ray",
    "iter_docs",
    "iter_records",
    "load_pipeline",
    "read_manifest",
    "scan",
]
