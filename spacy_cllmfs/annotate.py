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
manifest. `shards.py` holds the input, output and manifest formats;
`annotate_ray.py` runs the same shards on a Ray cluster.
"""
import hashlib
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc

from .shards import (
    ERRORS,
    INPUT_FORMATS,
    MANIFEST,
    OUTPUT_FORMATS,
    AnnotateError,
    Manifest,
    PathLike,
    Record,
    ShardResult,
    ShardSpec,
    detect_input_format,
    encode_shard,
    iter_docs,
    iter_records,
    read_manifest,
    read_shard,
    scan,
    shard_name,
    with_payloads,
    write_atomic,
)

logger = logging.getLogger("spacy_cllmfs")

FACTORY = "cllmfs_ner"


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
        bar = progress_bar(todo, progress, len(device_list or [None]))
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


def progress_bar(todo: Plan, enabled: bool, n_workers: int) -> Any:
    """RETURNS (tqdm): A bar over the docs of the whole input, with docs/s and the ETA."""
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


def pending_specs(todo: Plan) -> Iterator[ShardSpec]:
    """The shards still to do, with their docs attached for a .spacy input."""
    if todo.settings.input_format == "spacy":
        return with_payloads(todo.settings.input_path, todo.pending)
    return iter(todo.pending)


def _run_here(todo: Plan, device: Optional[str], threads: Optional[int], bar: Any) -> None:
    import torch

    before = torch.get_num_threads()
    counter = _ShardProgress(bar)
    try:
        annotator = ShardAnnotator(todo.settings, device, threads)
        for spec in pending_specs(todo):
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
    specs = pending_specs(todo)
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


__all__ = [
    "ERRORS",
    "MANIFEST",
    "AnnotateError",
    "AnnotateSummary",
    "Manifest",
    "ShardAnnotator",
    "ShardResult",
    "ShardSpec",
    "annotate",
    "iter_docs",
    "iter_records",
    "load_pipeline",
    "plan",
    "read_manifest",
    "scan",
]
