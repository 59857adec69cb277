"""Inference speed of `cllmfs_ner` against plain Hugging Face generation.

Four systems annotate the same sentences with all labels, one after the other,
on the same loaded model:

(a) per_prompt   one `model.generate` call per (sentence, label) prompt, the way
                 spacy-llm's Hugging Face backend works;
(b) hf_batched   `model.generate` over batches of left-padded prompts: every row
                 runs until the longest answer of its batch has ended;
(c) cllmfs_free  `spacy_cllmfs.decoding.generate` without constraints: a row
                 leaves the batch (and the KV cache) as soon as its answer ends;
(d) cllmfs_pipe  the user path before prefix sharing: `nlp.pipe(texts)` with the
                 component constrained, every prompt computed whole, fixed batches
                 (`shared_prefix = false`, `refill = false`), the paper's template;
(e) cllmfs_shared_label_first     `nlp.pipe` with the shared-prefix path and
                 refilled batches, the paper's label-first template (prompt.v1):
                 the same prompts as (d), so the same entities are expected;
(f) cllmfs_shared_sentence_first  the same with the sentence-first template
                 (prompt.v2): the sentence is part of the shared prefix.
With `--dtypes float32,bfloat16`, (d)-(f) run again on a bfloat16 copy of the
model (suffix `_bf16`), where the CPU computes bf16 natively (AVX512-BF16 or AMX)
or on a GPU; elsewhere the bf16 runs are skipped and the reason recorded.
`--train-shots N` adds training throughput: `update()` on the first N training
sentences of the domain, shared prefix against whole prompts.

Every system runs `--repeats` times (default 3; systems a-c `--baseline-repeats`
times); the median wall time counts, and every wall time is in the JSON.
(a), (b) and (c) get exactly the same prompt ids (from `component.make_prompts`)
and their greedy outputs are compared token by token. (b) uses the same batches
as (c) (prompts sorted by length), so the two differ only in when rows stop. The
entities of (d)-(f) are compared with those of (d).

Example:
    python bench/speed.py --data ../shared/data/crossner --domain politics \
        --limit 20 --model embedded --device cpu --batch-size 32 --max-new-tokens 48 \
        --output bench/results/speed-cpu-smollm2-politics.json
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import spacy
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_model, load_averages  # noqa: E402
from spacy_cllmfs.memory import peak_resident_bytes, release_memory  # noqa: E402

PIPE_SYSTEMS: Dict[str, Dict[str, Any]] = {
    "cllmfs_pipe": {"shared_prefix": False, "refill": False, "prompt": "spacy_cllmfs.prompt.v1"},
    "cllmfs_shared_label_first": {"shared_prefix": True, "refill": True, "prompt": "spacy_cllmfs.prompt.v1"},
    "cllmfs_shared_sentence_first": {"shared_prefix": True, "refill": True, "prompt": "spacy_cllmfs.prompt.v2"},
}
SYSTEMS = ("per_prompt", "hf_batched", "cllmfs_free", *PIPE_SYSTEMS)
COMPARED = ("per_prompt", "hf_batched", "cllmfs_free")
H100_BF16_DENSE_TFLOPS = 989.0
MEMORY_SAMPLE_S = 0.002
REPEATS = 3  # set from --repeats
BASELINE_REPEATS = 3  # set from --baseline-repeats
WALLS: Dict[str, List[float]] = {}  # every measured wall time, per system


# -- inputs -------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("sentences and labels")
    source.add_argument("--data", type=Path, help="CrossNER root folder (holds <domain>/test.txt)")
    source.add_argument("--domain", help="CrossNER domain, e.g. politics")
    source.add_argument("--texts-file", type=Path, help="Plain text file, one sentence per line")
    source.add_argument("--labels", help="Comma-separated labels (with --texts-file)")
    source.add_argument("--limit", type=int, default=50, help="Use the first N sentences")
    parser.add_argument("--model", default="embedded", help='"embedded", a hub name, a folder or a .gguf file')
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:N" or "auto"')
    parser.add_argument("--adapter", default=None, help="A LoRA adapter folder (e.g. <pipeline>/cllmfs_ner/adapter)")
    parser.add_argument("--dtype", default="auto", help='"auto" (bf16 on GPU, fp32 on CPU), "float32", ...')
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=32, help="Prompts per forward pass (b, c, d)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Longest answer, in tokens")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak of the device in TFLOP/s (default: measured fp32 matmul on CPU, 989 on CUDA)",
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"Comma-separated subset of {','.join(SYSTEMS)}"
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per system; the median wall time counts")
    parser.add_argument(
        "--baseline-repeats", type=int, default=None, help="Runs of systems a-c (default: --repeats)"
    )
    parser.add_argument(
        "--dtypes", default="float32", help="Comma-separated weight dtypes for systems d-f (float32,bfloat16)"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="Token budget of a prefill (e, f)")
    parser.add_argument(
        "--train-shots", type=int, default=0, help="Also time update() on the first N train sentences"
    )
    parser.add_argument("--output", type=Path, help="Write the results as JSON here")
    args = parser.parse_args(argv)
    if args.texts_file is None and (args.data is None or args.domain is None):
        parser.error("give --data and --domain, or --texts-file and --labels")
    if args.texts_file is not None and not args.labels:
        parser.error("--texts-file needs --labels")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if args.limit < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or args.threads < 0 or args.repeats < 1:
        parser.error("--limit, --batch-size, --max-new-tokens and --repeats must be >= 1, --threads >= 0")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.dtypes[:1] != ["float32"] or not set(args.dtypes) <= {"float32", "bfloat16"}:
        parser.error("--dtypes must start with float32 and may add bfloat16")
    return args


def crossner_inputs(data: Path, domain: str, limit: int) -> Tuple[List[str], List[str]]:
    """The first `limit` test sentences of a CrossNER domain, and the domain's labels
    (entity types found in its train, dev and test files, sorted)."""
    from spacy_cllmfs.corpora import read_conll

    vocab = spacy.blank("en").vocab
    folder = Path(data) / domain
    test_docs = read_conll(folder / "test.txt", vocab)
    labels = set()
    for split in ("train", "dev", "test"):
        path = folder / f"{split}.txt"
        docs = test_docs if split == "test" else (read_conll(path, vocab) if path.exists() else [])
        labels.update(ent.label_ for doc in docs for ent in doc.ents)
    return [doc.text for doc in test_docs[:limit]], sorted(labels)


def text_file_inputs(path: Path, labels: str, limit: int) -> Tuple[List[str], List[str]]:
    """The first `limit` non-empty lines of a text file, and the given labels."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf8").splitlines()]
    return [line for line in lines if line][:limit], [label.strip() for label in labels.split(",") if label.strip()]


def build_nlp(
    args: argparse.Namespace,
    labels: Sequence[str],
    system: str = "cllmfs_pipe",
    dtype: Optional[str] = None,
    model: Any = None,
) -> spacy.Language:
    """A blank English pipeline with the `cllmfs_ner` component (constrained), set up as
    `system` (see PIPE_SYSTEMS); `model`, an HFCausalLM, is shared if given."""
    import spacy_cllmfs  # noqa: F401  (registers the factory)

    settings = dict(PIPE_SYSTEMS[system])
    nlp = spacy.blank("en")
    component = nlp.add_pipe(
        "cllmfs_ner",
        config={
            "labels": list(labels),
            "model": {
                "@misc": "spacy_cllmfs.HFCausalLM.v1",
                "name": args.model,
                "device": args.device,
                "dtype": dtype or args.dtype,
                "adapter": args.adapter,
            },
            "prompt": {"@misc": settings.pop("prompt")},
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "max_batch_tokens": args.max_batch_tokens,
            **settings,
        },
    )
    if model is not None:
        component.model = model
    return nlp


def cpu_computes_bf16() -> Tuple[bool, str]:
    """RETURNS (Tuple[bool, str]): Whether this CPU has native bf16 matmuls, and why."""
    from spacy_cllmfs.models import cpu_bf16_support

    return cpu_bf16_support()


# -- measurement helpers ------------------------------------------------------------


@dataclass
class ForwardCount:
    """Calls of the model's forward, the rows they computed and the (padded) positions."""

    calls: int = 0
    rows: int = 0
    positions: int = 0


@contextmanager
def count_forwards(model: Any) -> Iterator[ForwardCount]:
    """Count the calls of `model.forward` (a pre-hook on the top module) while inside."""
    count = ForwardCount()

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        count.calls += 1
        if ids is not None:
            count.rows += int(ids.shape[0])
            count.positions += int(ids.shape[0] * ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


class PeakMemory:
    """Peak memory of one measured block, as a delta over the memory before it.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
    CPU: the process's RSS sampled by a thread every 2 ms (psutil), minus the RSS
    at the start (after gc and malloc_trim). Without psutil: the growth of
    `resource.getrusage().ru_maxrss`, which only sees new lifetime peaks.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._baseline = 0
        self._max = 0
        try:
            import psutil

            self._process: Any = psutil.Process()
        except ImportError:
            self._process = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated delta (reset_peak_memory_stats before)"
        if self._process is not None:
            return (
                f"RSS sampled every {MEMORY_SAMPLE_S * 1000:g} ms by a psutil thread, "
                "delta over RSS after gc+malloc_trim"
            )
        return "resource.getrusage ru_maxrss growth (lower bound: only new lifetime peaks count)"

    def _rss(self) -> int:
        if self._process is not None:
            return int(self._process.memory_info().rss)
        return peak_resident_bytes()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            self._stop.wait(MEMORY_SAMPLE_S)

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        self._baseline = self._max = self._rss()
        if self._process is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._max = max(self._max, self._rss())
        self.peak_bytes = max(0, self._max - self._baseline)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """The best matmul throughput of `size` x `size` matrices, in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        if i >= 2:  # the first two are warm-up
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e12


def peak_tflops(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Tuple[float, str]:
    """The device's peak (given, assumed for CUDA, or measured on CPU) and where it came from."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda":
        return H100_BF16_DENSE_TFLOPS, "assumed: H100 SXM dense bf16 (no --peak-tflops given)"
    value = measure_peak_tflops(device, dtype)
    return value, f"measured: best of 8 {dtype} 1024x1024 matmuls, {torch.get_num_threads()} torch threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def truncate_at_end(ids: Sequence[int], end_id: int) -> List[int]:
    """The generated ids up to and including the first end token."""
    ids = list(ids)
    return ids[: ids.index(end_id) + 1] if end_id in ids else ids


# -- the systems --------------------------------------------------------------------


@dataclass
class Decoding:
    """What one greedy decoding run needs, shared by systems a-c."""

    model: Any
    prompts: List[List[int]]
    end_id: int
    pad_id: int
    max_new_tokens: int
    batch_size: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generation_config(self) -> Any:
        """Plain greedy search: no sampling and no processors from the model's defaults."""
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.end_id,
            pad_token_id=self.pad_id,
        )

    def batches(self) -> List[List[int]]:
        """Prompt indices in batches, longest first, as `decoding.generate` makes them."""
        order = sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i]), i))
        return [order[b : b + self.batch_size] for b in range(0, len(order), self.batch_size)]


def run_per_prompt(run: Decoding) -> List[List[int]]:
    """(a) One `model.generate` call per prompt."""
    config, outputs = run.generation_config(), []
    with torch.inference_mode():
        for ids in run.prompts:
            input_ids = torch.tensor([ids], device=run.device)
            sequences = run.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
            outputs.append(truncate_at_end(sequences[0, len(ids) :].tolist(), run.end_id))
    return outputs


def run_hf_batched(run: Decoding) -> List[List[int]]:
    """(b) `model.generate` over left-padded batches (rows run until the batch ends)."""
    config = run.generation_config()
    outputs: List[List[int]] = [[] for _ in run.prompts]
    with torch.inference_mode():
        for rows in run.batches():
            width = max(len(run.prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), run.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(run.prompts[i])
                input_ids[r, width - n :] = torch.tensor(run.prompts[i], dtype=torch.long)
                mask[r, width - n :] = 1
            sequences = run.model.generate(
                input_ids=input_ids.to(run.device), attention_mask=mask.to(run.device), generation_config=config
            )
            for r, i in enumerate(rows):
                outputs[i] = truncate_at_end(sequences[r, width:].tolist(), run.end_id)
    return outputs


def run_cllmfs_free(run: Decoding) -> List[List[int]]:
    """(c) `decoding.generate` without constraints (rows leave the batch when they end)."""
    from spacy_cllmfs.decoding import generate

    generations = generate(
        run.model,
        run.prompts,
        end_id=run.end_id,
        pad_id=run.pad_id,
        max_new_tokens=run.max_new_tokens,
        batch_size=run.batch_size,
    )
    return [g.ids + ([run.end_id] if g.finished else []) for g in generations]


@dataclass
class SystemResult:
    """The measurements of one system."""

    name: str
    wall_s: float
    sentences: int
    prompts: int
    prompt_tokens: int
    generated_tokens: int
    forward_passes: int
    rows_computed: int
    positions_computed: int
    peak_memory_mib: float
    sentences_per_s: float = 0.0
    prompts_per_s: float = 0.0
    generated_tokens_per_s: float = 0.0
    floor_s: float = 0.0
    fraction_of_floor: float = 0.0
    speedup_vs_per_prompt: Optional[float] = None
    notes: str = ""
    walls_s: List[float] = field(default_factory=list)
    outputs: Optional[List[List[int]]] = field(default=None, repr=False)
    entities: Optional[List[List[Tuple[int, int, str]]]] = field(default=None, repr=False)

    def finish(self, flops_per_token: float, head_flops: float, peak_flops: float) -> None:
        """Fill in the rates and the compute floor from the raw counts."""
        self.sentences_per_s = self.sentences / self.wall_s
        self.prompts_per_s = self.prompts / self.wall_s
        self.generated_tokens_per_s = self.generated_tokens / self.wall_s
        flops = flops_per_token * (self.prompt_tokens + self.generated_tokens) + head_flops * self.generated_tokens
        self.floor_s = flops / peak_flops
        self.fraction_of_floor = self.floor_s / self.wall_s

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data.pop("outputs")
        data.pop("entities")
        return data


def measure(
    name: str,
    fn: Callable[[], Any],
    model: Any,
    device: torch.device,
    memory: PeakMemory,
) -> Tuple[Any, float, ForwardCount, float]:
    """Run `fn` once, timing it and counting forward passes and peak memory.

    RETURNS (Tuple[Any, float, ForwardCount, float]): fn's result, wall seconds,
        forward counts and the peak memory delta in MiB.
    """
    walls: List[float] = []
    peak = 0.0
    repeats = BASELINE_REPEATS if name in COMPARED else REPEATS
    for repeat in range(repeats):
        print(f"[speed] running {name} ({repeat + 1}/{repeats}) ...", file=sys.stderr, flush=True)
        with memory, count_forwards(model) as forwards:
            _sync(device)
            start = time.perf_counter()
            result = fn()
            _sync(device)
            walls.append(time.perf_counter() - start)
        peak = max(peak, memory.peak_bytes / 2**20)
        print(f"[speed] {name}: {walls[-1]:.2f} s", file=sys.stderr, flush=True)
    WALLS[name] = walls
    return result, statistics.median(walls), forwards, peak


def decoding_system(
    name: str, fn: Callable[[Decoding], List[List[int]]], run: Decoding, n_sentences: int, memory: PeakMemory
) -> SystemResult:
    """Measure one of systems a-c on the shared prompts."""
    outputs, wall, forwards, peak = measure(name, lambda: fn(run), run.model, run.device, memory)
    return SystemResult(
        name=name,
        wall_s=wall,
        sentences=n_sentences,
        prompts=len(run.prompts),
        prompt_tokens=sum(len(p) for p in run.prompts),
        generated_tokens=sum(len(o) for o in outputs),
        forward_passes=forwards.calls,
        rows_computed=forwards.rows,
        positions_computed=forwards.positions,
        peak_memory_mib=peak,
        outputs=outputs,
    )


def pipe_system(name: str, nlp: spacy.Language, texts: List[str], memory: PeakMemory) -> SystemResult:
    """(d)-(f) Measure `nlp.pipe(texts)` with the component as configured."""
    from spacy_cllmfs.decoding import DecodingStats

    component = nlp.get_pipe("cllmfs_ner")
    model = component.model.inference_model()
    nlp(texts[0])  # warm-up of this configuration

    def annotate() -> List[Any]:
        component.stats = DecodingStats()
        return list(nlp.pipe(texts))

    docs, wall, forwards, peak = measure(name, annotate, model, next(model.parameters()).device, memory)
    stats = component.stats
    n_ents = sum(len(doc.ents) for doc in docs)
    return SystemResult(
        name=name,
        wall_s=wall,
        sentences=len(docs),
        prompts=sum(len(task.prompts) for task in component.make_prompts(docs)),
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        forward_passes=forwards.calls,
        rows_computed=forwards.rows,
        positions_computed=forwards.positions,
        peak_memory_mib=peak,
        notes=(
            f"constrained={component.constrained}; includes tokenization, prompt building and "
            f"alignment; outputs differ from a-c by design; {n_ents} entities set; "
            f"DecodingStats forward_passes={stats.forward_passes}, prompt tokens read "
            f"{stats.prompt_tokens_read} (computed: {stats.prompt_tokens})"
        ),
        entities=[[(e.start, e.end, e.label_) for e in doc.ents] for doc in docs],
    )


# -- comparison and report -------------------------------------------------------------


def compare_outputs(results: Dict[str, SystemResult]) -> Dict[str, Any]:
    """Count the prompts whose generated ids differ between systems a-c."""
    names = [n for n in COMPARED if n in results]
    if len(names) < 2:
        return {"systems": names, "mismatches": None, "pairs": {}, "examples": []}
    outputs = [results[n].outputs or [] for n in names]
    n_prompts = len(outputs[0])
    differing = [i for i in range(n_prompts) if any(o[i] != outputs[0][i] for o in outputs[1:])]
    pairs = {
        f"{names[x]}~{names[y]}": sum(outputs[x][i] != outputs[y][i] for i in range(n_prompts))
        for x in range(len(names))
        for y in range(x + 1, len(names))
    }
    examples = []
    for i in differing[:5]:
        first = min(_first_difference(outputs[0][i], o[i]) for o in outputs[1:] if o[i] != outputs[0][i])
        examples.append({"prompt": i, "first_different_step": first, **{n: o[i] for n, o in zip(names, outputs)}})
    return {
        "systems": names,
        "prompts": n_prompts,
        "mismatches": len(differing),
        "pairs": pairs,
        "examples": examples,
    }


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return step
    return min(len(a), len(b))


def markdown_table(results: Dict[str, SystemResult]) -> str:
    """The results as a markdown table."""
    header = (
        "| system | wall s | sentences/s | prompts/s | gen tokens/s | gen tokens | forward passes "
        "| rows computed | peak mem MiB | % of floor | speedup vs (a) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results.values():
        speedup = f"{r.speedup_vs_per_prompt:.2f}x" if r.speedup_vs_per_prompt else "-"
        lines.append(
            f"| {r.name} | {r.wall_s:.2f} | {r.sentences_per_s:.2f} | {r.prompts_per_s:.2f} "
            f"| {r.generated_tokens_per_s:.1f} | {r.generated_tokens} | {r.forward_passes} "
            f"| {r.rows_computed} | {r.peak_memory_mib:.0f} | {100 * r.fraction_of_floor:.2f}% | {speedup} |"
        )
    return "\n".join(lines)


def environment(args: argparse.Namespace, argv: Sequence[str], model: Any, device: torch.device) -> Dict[str, Any]:
    """Versions, machine, model and command line."""
    import transformers

    return {
        "command": shlex.join(["python", "bench/speed.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "adapter": args.adapter,
        "model_class": type(model).__name__,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "spacy": spacy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_averages(),
    }


# -- main ---------------------------------------------------------------------------


def warm_up(run: Decoding) -> None:
    """Run each decoding path once on a little input, outside the measurements."""
    small = Decoding(run.model, run.prompts[:2], run.end_id, run.pad_id, min(4, run.max_new_tokens), 2)
    run_per_prompt(Decoding(run.model, run.prompts[:1], run.end_id, run.pad_id, small.max_new_tokens, 1))
    run_hf_batched(small)
    run_cllmfs_free(small)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark, print a markdown table and return (and optionally write) the results."""
    global REPEATS, BASELINE_REPEATS
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    REPEATS = args.repeats
    BASELINE_REPEATS = args.baseline_repeats or args.repeats
    WALLS.clear()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return benchmark(args, argv)
    finally:
        torch.set_num_threads(threads)


def flop_counts(model: Any) -> Dict[str, int]:
    """Parameters that every token passes through (not the input embedding, which is a
    lookup, nor the output head, computed only where logits are kept), and the head's."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    seen = {id(embedding)} | ({id(head.weight)} if head is not None else set())
    body = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return {"n_parameters": sum(p.numel() for p in model.parameters()), "body": body, "head": head_params}


def entity_agreement(results: Dict[str, "SystemResult"], reference: str) -> Dict[str, Any]:
    """Per pipe system, how many sentences got entities other than `reference`'s."""
    base = results[reference].entities if reference in results else None
    if base is None:
        return {}
    return {
        name: {"sentences_differing": sum(a != b for a, b in zip(base, r.entities)), "sentences": len(base)}
        for name, r in results.items()
        if r.entities is not None and name != reference
    }


def training_throughput(
    args: argparse.Namespace, labels: Sequence[str], model: Any, memory: PeakMemory
) -> Dict[str, Any]:
    """Seconds of `update()` (gradients, no optimizer step) on the first `--train-shots`
    training sentences: whole prompts vs shared prefixes (both templates)."""
    from spacy.training import Example

    from spacy_cllmfs.corpora import read_conll

    gold = read_conll(Path(args.data) / args.domain / "train.txt", spacy.blank("en").vocab)[: args.train_shots]
    runs: Dict[str, Any] = {}
    for name, system, shared in (
        ("unshared_label_first", "cllmfs_pipe", False),
        ("shared_label_first", "cllmfs_shared_label_first", True),
        ("shared_sentence_first", "cllmfs_shared_sentence_first", True),
    ):
        nlp = build_nlp(args, labels, system, model=model)
        component = nlp.get_pipe("cllmfs_ner")
        component.training.shared_prefix = shared
        examples = [Example(nlp.make_doc(doc.text), doc) for doc in gold]
        items = component.training_items(examples)
        nlp.update(examples[:2], sgd=False)  # warm-up
        _, wall, _, peak = measure(f"train_{name}", lambda: nlp.update(examples, sgd=False), model.model,
                                   model.device, memory)
        for param in model.trainable_parameters():
            param.grad = None
        runs[name] = {
            "wall_s": wall,
            "walls_s": WALLS[f"train_{name}"],
            "sentences_per_s": len(examples) / wall,
            "prompts": len(items),
            "prompt_and_answer_tokens": sum(len(i.ids) for i in items),
            "peak_memory_mib": peak,
            "losses": dict(component.last_losses),
        }
    base = runs["unshared_label_first"]["wall_s"]
    for run in runs.values():
        run["speedup_vs_unshared"] = base / run["wall_s"]
    return {"sentences": len(gold), "what": "nlp.update(examples, sgd=False) on the first N train sentences",
            "runs": runs}


def benchmark(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    """Load the model, run the systems, print the table and write the JSON report."""
    if args.texts_file is not None:
        texts, labels = text_file_inputs(args.texts_file, args.labels, args.limit)
        source = str(args.texts_file)
    else:
        texts, labels = crossner_inputs(args.data, args.domain, args.limit)
        source = f"{args.data}/{args.domain}/test.txt"
    if not texts or not labels:
        raise SystemExit(f"No sentences ({len(texts)}) or no labels ({labels}) to benchmark.")
    nlp = build_nlp(args, labels)
    component = nlp.get_pipe("cllmfs_ner")
    lm = component.model
    model = lm.inference_model(merge=False)  # systems a-c and d: the path before merging
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    tasks = component.make_prompts([nlp.make_doc(t) for t in texts])
    run = Decoding(
        model=model,
        prompts=[list(p.ids) for task in tasks for p in task.prompts],
        end_id=component.builder.format.end_id,
        pad_id=lm.pad_id,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    warm_up(run)
    peak, peak_source = peak_tflops(args, device, dtype)
    env = environment(args, argv, model, device)
    counts = flop_counts(model)
    env.update(n_parameters_body=counts["body"], n_parameters_head=counts["head"])
    memory = PeakMemory(device)
    functions = {"per_prompt": run_per_prompt, "hf_batched": run_hf_batched, "cllmfs_free": run_cllmfs_free}
    results: Dict[str, SystemResult] = {}
    peaks = {"float32": (peak, peak_source)}
    skipped: Dict[str, str] = {}
    for dtype_name in args.dtypes:
        suffix = "" if dtype_name == "float32" else "_bf16"
        if dtype_name == "float32":
            system_lm = lm
        else:
            supported, why = (True, "GPU") if device.type == "cuda" else cpu_computes_bf16()
            if not supported:
                skipped[f"*{suffix}"] = f"skipped: {why}"
                continue
            system_lm = build_nlp(args, labels, dtype=dtype_name).get_pipe("cllmfs_ner").model
            peaks[dtype_name] = peak_tflops(args, device, torch.bfloat16)
        for name in args.systems:
            if name in PIPE_SYSTEMS:
                system_nlp = build_nlp(args, labels, name, model=system_lm)
                system_lm.merge_lora = name != "cllmfs_pipe"  # the path before merging did not merge
                results[name + suffix] = pipe_system(name + suffix, system_nlp, texts, memory)
            elif not suffix:
                results[name] = decoding_system(name, functions[name], run, len(texts), memory)
        system_lm.merge_lora = True
    for name, result in results.items():
        result.walls_s = WALLS[name]
        floor_peak = peaks["bfloat16" if name.endswith("_bf16") else "float32"][0]
        result.finish(2.0 * counts["body"], 2.0 * counts["head"], floor_peak * 1e12)
        if "per_prompt" in results:
            result.speedup_vs_per_prompt = results["per_prompt"].wall_s / result.wall_s
    agreement = compare_outputs(results)
    entities = entity_agreement(results, "cllmfs_pipe")
    training = training_throughput(args, labels, lm, memory) if args.train_shots else None
    env["load_average_at_end"] = load_averages()
    report = {
        "environment": env,
        "inputs": {
            "source": source,
            "sentences": len(texts),
            "labels": labels,
            "prompts": len(run.prompts),
            "prompt_tokens": sum(len(p) for p in run.prompts),
            "batch_size": args.batch_size,
            "max_batch_tokens": args.max_batch_tokens,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "baseline_repeats": args.baseline_repeats or args.repeats,
            "end_id": run.end_id,
            "pad_id": run.pad_id,
        },
        "compute_floor": {
            "peak_tflops": {k: v[0] for k, v in peaks.items()},
            "peak_source": {k: v[1] for k, v in peaks.items()},
            "flops_per_token": 2.0 * counts["body"],
            "head_flops_per_generated_token": 2.0 * counts["head"],
            "formula": "2 x non-embedding body parameters x (prompt tokens computed + generated tokens) "
            "+ 2 x output-head parameters x generated tokens, per system (a shared prefix counts once)",
        },
        "memory_method": memory.method,
        "agreement": agreement,
        "entity_agreement_vs_cllmfs_pipe": entities,
        "skipped": skipped,
        "systems": {name: r.to_json() for name, r in results.items()},
        "training": training,
    }
    table = markdown_table(results)
    report["table"] = table
    print(table)
    print(
        f"\n{len(texts)} sentences x {len(labels)} labels = {len(run.prompts)} prompts, "
        f"{report['inputs']['prompt_tokens']} prompt tokens; peak {peak:.3f} TFLOP/s ({peak_source}); "
        f"memory: {memory.method}."
    )
    if agreement["mismatches"] is not None:
        print(f"a/b/c outputs: {agreement['mismatches']} of {agreement['prompts']} prompts differ {agreement['pairs']}")
    print(f"entities vs cllmfs_pipe: {entities}; skipped: {skipped}")
    if training:
        print("training:", {k: round(v["sentences_per_s"], 3) for k, v in training["runs"].items()})
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf8")
    return report


if __name__ == "__main__":
    main()
