"""`annotate` against a plain `nlp.pipe` loop on a synthetic corpus, on CPU.

    python bench/annotate.py --lines 100000 --output bench/results/annotate-cpu.json

Builds the tiny random model of the tests (spacy_cllmfs.testing) and a pipeline
around it, writes a JSONL corpus of `--lines` lines, then runs, each in its own
process, with the process tree's RSS sampled over time:

- plain:     read the lines, `nlp.pipe`, write JSONL (what a user's own loop does)
- annotate:  `python -m spacy_cllmfs annotate` with 1 worker, then with 2 workers
- resume:    annotate, killed (SIGKILL) after a few shards, then started again: the
             time from the restart to its first new shard

The tiny model measures the cost of the machinery around the model (reading,
sharding, writing, worker processes), not of a real LLM, whose time per doc is
100-1000x larger. The 1-minute load average is recorded: other jobs may share the
machine (the script waits up to --max-wait seconds for it to be quiet first).
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info, wait_for_quiet  # noqa: E402

WORDS = (
    "Barack Obama visited Paris with Angela Merkel in 2009 , the Labour Party won the general election "
    "in the United Kingdom . Marie Curie worked at the University of Paris and New York"
).split()


def write_corpus(path: Path, lines: int, seed: int = 0) -> int:
    """A JSONL corpus: 6-14 random words per line, meta with an id; one line in 10,000
    is unreadable, to exercise the errors file. RETURNS (int): The readable lines."""
    rng = random.Random(seed)
    readable = 0
    with path.open("w", encoding="utf8") as file:
        for i in range(lines):
            if i % 10_000 == 9_999:
                file.write("{not json\n")
                continue
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            file.write(json.dumps({"text": text, "meta": {"id": i}}) + "\n")
            readable += 1
    return readable


def build_pipeline(path: Path, labels: List[str], max_new_tokens: int) -> None:
    import spacy

    from spacy_cllmfs.testing import build_tiny_model

    model = build_tiny_model(path.parent / "tiny-model")
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={
        "labels": labels, "max_new_tokens": max_new_tokens,
        "model": {"@misc": "spacy_cllmfs.HFCausalLM.v1", "name": str(model), "device": "cpu"},
    })
    nlp.to_disk(path)


def plain_loop(pipeline: str, corpus: str, output: str, batch_size: int, threads: int) -> None:
    """What a user writes by hand: read JSONL, nlp.pipe, write JSONL (no resume, no errors file)."""
    import spacy
    import torch

    torch.set_num_threads(threads)
    nlp = spacy.load(pipeline)

    def texts():
        with open(corpus, encoding="utf8") as file:
            for line in file:
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError):
                    continue

    with open(output, "w", encoding="utf8") as out:
        for doc in nlp.pipe(texts(), batch_size=batch_size):
            ents = [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents]
            out.write(json.dumps({"text": doc.text, "ents": ents}) + "\n")


def tree_rss(pid: int) -> Optional[float]:
    """RETURNS (Optional[float]): The RSS of a process and its children in MiB."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_sampled(command: List[str], log: Path, sample_s: float = 1.0, stop: Any = None) -> Dict[str, Any]:
    """Run a command, sampling its process tree's RSS; `stop(elapsed)` may end it early.
    Its output goes to `log` (a pipe that nobody reads would block it once full)."""
    begin = time.time()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return _sample(proc, begin, log, sample_s, stop)


def _sample(proc: Any, begin: float, log: Path, sample_s: float, stop: Any) -> Dict[str, Any]:
    samples: List[List[float]] = []
    killed = False
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        if rss is not None:
            samples.append([round(time.time() - begin, 1), round(rss, 1)])
        if stop is not None and stop(time.time() - begin):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(sample_s)
    proc.wait()
    wall = time.time() - begin
    output = log.read_text(encoding="utf8", errors="replace")
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(proc.args)} failed:\n{output[-3000:]}")
    last = [line for line in output.splitlines() if " docs in " in line]
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mib": max((s[1] for s in samples), default=None),
        "rss_mib_over_time": thin(samples, 120),
        "summary_line": last[-1] if last else None,
        "killed": killed,
    }


def relative(text: str) -> str:
    """Paths inside the checkout, relative to it (results hold no machine's paths)."""
    return text.replace(str(ROOT) + "/", "")


def thin(samples: List[List[float]], n: int) -> List[List[float]]:
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)] + [samples[-1]]


def manifest_entries(output: Path) -> List[Dict[str, Any]]:
    path = output / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[1:-1]]


def ents_of_annotate(output: Path) -> List[Any]:
    from spacy_cllmfs.annotate import iter_records

    return [r["ents"] for r in iter_records(output)]


def ents_of_plain(output: Path) -> List[Any]:
    with output.open(encoding="utf8") as file:
        return [json.loads(line)["ents"] for line in file]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--labels", default="person", help="Comma-separated labels (prompts per doc).")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--resume-after", type=int, default=3, help="Kill the resume run after N shards.")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work" / "annotate")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "annotate-cpu.json")
    parser.add_argument("--busy-load", type=float, default=1.5, help="Wait while the 1-min load is above this.")
    parser.add_argument("--max-wait", type=float, default=900, help="Seconds to wait for a quiet machine.")
    parser.add_argument("--note", default=None, help="A remark to keep in the results (e.g. on the load).")
    parser.add_argument("--plain-loop", nargs=3, metavar=("PIPELINE", "CORPUS", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        plain_loop(*args.plain_loop, batch_size=args.batch_size, threads=args.threads)
        return

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    pipeline, corpus = work / "pipeline", work / "corpus.jsonl"
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    build_pipeline(pipeline, labels, args.max_new_tokens)
    readable = write_corpus(corpus, args.lines)
    quiet = wait_for_quiet(args.busy_load, args.max_wait)
    result: Dict[str, Any] = {**machine_info(), **quiet}
    if args.note:
        result["note"] = args.note
    cores = result["cores"] or 1
    result["settings"] = {
        "lines": args.lines, "readable_lines": readable, "shard_size": args.shard_size,
        "batch_size": args.batch_size, "labels": labels, "max_new_tokens": args.max_new_tokens,
        "model": "spacy_cllmfs.testing.build_tiny_model (4 layers, hidden 64, random)",
        "corpus": "synthetic JSONL, 6-14 random words per line, 1 unreadable line in 10,000",
    }
    annotate = [sys.executable, "-m", "spacy_cllmfs", "annotate", str(pipeline), str(corpus)]
    flags = ["--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "--no-progress"]
    runs: Dict[str, Any] = {}

    def record(name: str, command: List[str], threads: int, workers: int, **extra: Any) -> Dict[str, Any]:
        print(f"bench: {name}: {' '.join(command)}", file=sys.stderr)
        measured = run_sampled(command, work / f"{name}.log", **extra)
        if measured["summary_line"]:
            measured["summary_line"] = relative(measured["summary_line"])
        measured.update(command=relative(" ".join(["python"] + command[1:])), workers=workers,
                        torch_threads_per_worker=threads, load_average_1min_after=os.getloadavg()[0])
        if not measured["killed"]:
            measured["docs_per_s"] = round(readable / measured["wall_s"], 1)
        runs[name] = measured
        print(f"bench: {name}: {measured.get('docs_per_s')} docs/s, peak RSS {measured['peak_rss_mib']} MiB",
              file=sys.stderr)
        return measured

    plain_out = work / "plain.jsonl"
    record("plain_nlp_pipe", [sys.executable, str(Path(__file__).resolve()), "--plain-loop", str(pipeline),
                              str(corpus), str(plain_out), "--batch-size", str(args.batch_size), "--threads", "1"],
           threads=1, workers=1)
    for workers in (1, 2):
        out = work / f"annotate-{workers}"
        threads = 1 if workers == 1 else max(1, cores // workers)
        command = annotate + [str(out), "--overwrite", "--workers", str(workers), "--threads", str(threads)] + flags
        record(f"annotate_{workers}_worker{'s' if workers > 1 else ''}", command, threads=threads, workers=workers)
    plain_ents = ents_of_plain(plain_out)
    result["same_entities"] = {
        f"annotate_{w}_vs_plain": ents_of_annotate(work / f"annotate-{w}") == plain_ents for w in (1, 2)
    }

    # resume: kill after a few shards, start again, time to the first new shard
    out = work / "resume"
    command = annotate + [str(out), "--overwrite", "--threads", "1"] + flags
    record("resume_first_run_killed", command, threads=1, workers=1,
           stop=lambda _: len(manifest_entries(out)) >= args.resume_after)
    before = len(manifest_entries(out))
    command = annotate + [str(out), "--threads", "1"] + flags
    restart: Dict[str, float] = {}

    def first_new_shard(elapsed: float) -> bool:
        if len(manifest_entries(out)) > before and "first_new_shard_s" not in restart:
            restart["first_new_shard_s"] = elapsed
        return "first_new_shard_s" in restart

    measured = record("resume_restart", command, threads=1, workers=1, sample_s=0.1, stop=first_new_shard)
    shard_times = sorted(e["seconds"] for e in manifest_entries(out))
    result["resume"] = {
        "shards_done_before_restart": before,
        "restart_to_first_new_shard_s": round(restart.get("first_new_shard_s", measured["wall_s"]), 1),
        "median_shard_s_in_steady_state": shard_times[len(shard_times) // 2] if shard_times else None,
        "note": "the restart pays process start-up and pipeline loading once, plus the shard it redoes",
    }
    result["runs"] = runs
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench: wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
