"""Seconds per step of the spacy-llm shot stage (`tune_llm`), each prompt with its own
few-shot examples against one shared prompt per step (`shared_step_examples`).

    python bench/tune_speed.py --data ../shared/data/crossner --domain science \
        --model bench/work/models/qwen2.5-coder-1.5b-instruct.gguf --dtype float32 \
        --output bench/results/tune-speed-cpu-qwen1_5b-science.json

The task shows the domain's K-shot sample as its examples (as `spacy_llm_lora` in
bench/quality.py); the first `--sentences` of it are trained on, without prompt
gradients, `--batch-size` per step, one epoch per variant, from a fresh adapter each
time. A step's time is taken between the step log lines of `tune_llm` (the first from
the start of training): the first step of a variant also pays for warm-up, so the
median is the figure to compare.
"""
import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import spacy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import load_averages, machine_info  # noqa: E402
from bench.quality import Domain  # noqa: E402
from spacy_cllmfs.llm_tuning import TuningSettings, step_items, llm_model_of, tune_llm  # noqa: E402
from spacy_cllmfs.loop import as_examples  # noqa: E402
from spacy_cllmfs.memory import peak_resident_bytes  # noqa: E402
from spacy_cllmfs.models import HFCausalLM, cpu_bf16_support  # noqa: E402
from spacy_cllmfs.spacy_llm import SpacyLLMModel, ner_v3_pipeline  # noqa: E402

VARIANTS = ("own_examples", "shared_step_examples")


class StepClock(logging.Handler):
    """Records when `tune_llm` logs each finished step."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: List[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("tune_llm: step "):
            self.times.append(time.perf_counter())


def variant_settings(variant: str, batch_size: int) -> TuningSettings:
    """The shot stage's settings of a variant (bench/quality.py's, no prompt gradients)."""
    shared = variant == "shared_step_examples"
    return TuningSettings(epochs=1, batch_size=batch_size, prompt_gradients=False, seed=0,
                          shared_step_examples=shared, micro_batch_size=batch_size if shared else 1)


def prompt_sizes(nlp: spacy.Language, examples: Sequence[Any], settings: TuningSettings) -> Dict[str, float]:
    """Mean prompt and shared-part tokens of the variant's first step, and how many
    distinct shared parts it computes."""
    task, model = llm_model_of(nlp, "llm")
    step = [(task, model, example) for example in examples[: settings.batch_size]]
    items = step_items(step, random.Random(0), settings)
    return {
        "prompt_tokens": statistics.mean(len(i.prompt.ids) for i in items),
        "shared_tokens": statistics.mean(i.prompt.shared_len for i in items),
        "answer_tokens": statistics.mean(len(i.answer) for i in items),
        "prefixes_per_step": len({tuple(i.prompt.prefix) for i in items}),
    }


def run_variant(nlp: spacy.Language, lm: HFCausalLM, examples: Sequence[Any], variant: str,
                batch_size: int) -> Dict[str, Any]:
    settings = variant_settings(variant, batch_size)
    sizes = prompt_sizes(nlp, examples, settings)
    clock = StepClock()
    log = logging.getLogger("spacy_cllmfs.llm_tuning")
    log.setLevel(logging.INFO)
    log.addHandler(clock)
    lm.reset_adapter()
    load = load_averages()
    start = time.perf_counter()
    try:
        report = tune_llm(nlp, list(examples), settings=settings)
    finally:
        log.removeHandler(clock)
        lm.reset_adapter()
    marks = [start] + clock.times
    steps = [round(b - a, 2) for a, b in zip(marks, marks[1:])]
    return {**sizes, "step_s": steps, "median_step_s": statistics.median(steps),
            "losses": report.losses, "load_average_at_start": load,
            "peak_rss_gib_so_far": round(peak_resident_bytes() / 2**30, 2)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CrossNER folder (…/crossner)")
    parser.add_argument("--domain", default="science")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shots", type=int, default=5, help="K of the K-shot sample shown as examples")
    parser.add_argument("--sentences", type=int, default=6, help="Training sentences per variant")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    torch.set_num_threads(args.threads)
    results: Dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {"runs": []}
    domain = Domain(args.data, args.domain, 0, spacy.blank("en").vocab)
    shots = domain.shots(args.shots, 0)
    lm = HFCausalLM(args.model, device=args.device, dtype=args.dtype)
    began = time.perf_counter()
    lm.model  # noqa: B018 (load the weights now, outside the timings)
    loaded_s = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix="bench-tune-speed-") as work:
        nlp, n_examples = ner_v3_pipeline(SpacyLLMModel(lm), domain.labels, shots, Path(work) / "examples.json")
        examples = as_examples(nlp, shots)[: args.sentences]
        run: Dict[str, Any] = {
            **machine_info(), "cpu_native_bf16": cpu_bf16_support()[0], "domain": args.domain, "k": args.shots,
            "prompt_examples": n_examples,
            "labels": len(domain.labels), "training_sentences": len(examples), "batch_size": args.batch_size,
            "model": args.model, "dtype": str(lm.dtype), "device": str(lm.device), "threads": args.threads,
            "load_s": round(loaded_s, 1), "variants": {},
        }
        for variant in variants:
            run["variants"][variant] = run_variant(nlp, lm, examples, variant, args.batch_size)
            print(variant, json.dumps({k: v for k, v in run["variants"][variant].items() if k != "losses"}),
                  flush=True)
    if "own_examples" in run["variants"] and "shared_step_examples" in run["variants"]:
        own, shared = (run["variants"][v]["median_step_s"] for v in ("own_examples", "shared_step_examples"))
        run["speedup_median_step"] = round(own / shared, 2)
    results["runs"].append(run)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
