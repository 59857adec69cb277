"""Peak memory and time of loading a GGUF model: transformers' loader vs ours.

Each (model, dtype, loader) is loaded once in a fresh Python process, which
reports its peak resident set size (VmHWM from /proc/self/status, Linux only),
its RSS before loading (after the imports) and the load time in seconds.

    transformers  AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=...)
    streaming     spacy_cllmfs.gguf_loading.load_gguf_model(folder, gguf_file, dtype)

Example (the Qwen file comes from `python bench/get_model.py qwen2.5-coder-0.5b-instruct bench/work/models`):
    python bench/gguf_memory.py --model embedded \
        --model bench/work/models/qwen2.5-coder-0.5b-instruct.gguf \
        --output bench/results/gguf-memory-cpu.json
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_model, load_averages, memory_gib  # noqa: E402

LOADERS = ("transformers", "streaming")
DTYPES = ("float32", "bfloat16")
# Imported before the clock starts, so that neither loader pays for them.
PRELOADED_MODULES = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.modeling_gguf_pytorch_utils",
    "gguf",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="'embedded' or a .gguf path (repeatable)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="default: both")
    parser.add_argument("--loader", action="append", choices=LOADERS, help="default: both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the loading process")
    parser.add_argument("--output", type=Path, help="Write the results as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "GGUF", "DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_model(model: str) -> Path:
    """RETURNS (Path): The GGUF file for 'embedded' or a path."""
    if model == "embedded":
        from spacy_cllmfs.embedded import embedded_model_path

        return embedded_model_path()
    path = Path(model)
    if not path.is_file():
        raise SystemExit(f"{model} is not a file. Fix: pass 'embedded' or a .gguf path.")
    return path


def status_mib(field: str) -> float:
    """RETURNS (float): A VmXXX field of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def child(loader: str, gguf: str, dtype_name: str, threads: int) -> Dict[str, Any]:
    """Load the model once in this process; RETURNS (Dict[str, Any]): the measurements."""
    import importlib

    import torch

    torch.set_num_threads(threads)
    for module in PRELOADED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    from transformers import AutoModelForCausalLM

    from spacy_cllmfs.gguf_loading import load_gguf_model

    path = Path(gguf)
    dtype = getattr(torch, dtype_name)
    before = status_mib("VmRSS")
    start = time.perf_counter()
    if loader == "transformers":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = load_gguf_model(str(path.parent), path.name, dtype, "cpu")
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    return {
        "loader": loader,
        "dtype": dtype_name,
        "model_class": type(model).__name__,
        "weights_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_over_before_mib": round(peak - before, 1),
        "rss_after_mib": round(status_mib("VmRSS"), 1),
        "load_seconds": round(seconds, 2),
    }


def measure(model: str, loader: str, dtype: str, threads: int) -> Dict[str, Any]:
    """Run one load in a fresh process; RETURNS (Dict[str, Any]): its measurements."""
    path = resolve_model(model)
    command = [sys.executable, __file__, "--child", loader, str(path), dtype, "--threads", str(threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": model, "file_mib": round(path.stat().st_size / 2**20, 1), **result}


def environment(argv: Sequence[str], threads: int) -> Dict[str, Any]:
    """Versions, machine and command line."""
    import gguf
    import torch
    import transformers

    return {
        "command": shlex.join(["python", "bench/gguf_memory.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "load_average_at_start": load_averages(),
    }


def _dist_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, threads=args.threads)))
        return
    env = environment(argv, args.threads)
    results = []
    for model in args.model or ["embedded"]:
        for dtype in args.dtype or DTYPES:
            for loader in args.loader or LOADERS:
                result = measure(model, loader, dtype, args.threads)
                results.append(result)
                print(
                    f"{model} {dtype:9} {loader:12} peak {result['peak_rss_mib']:8.1f} MiB "
                    f"(+{result['peak_over_before_mib']:.1f} over {result['rss_before_mib']:.1f}; "
                    f"weights {result['weights_mib']:.1f}) {result['load_seconds']:6.2f} s",
                    flush=True,
                )
    env["load_average_at_end"] = load_averages()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
