"""Markdown tables from bench/results/*.json, and the README section that holds them.

    python bench/table.py            # rewrite the README's benchmark section
    python bench/table.py --print    # print it instead
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality import (  # noqa: E402
    ABLATIONS, DEFAULT_PROFILE, DOMAINS, GLINER_PUBLISHED, OPTIONAL, PROFILES, SYSTEM_NAMES, SYSTEMS,
    general_size, recorded_settings, summarize,
)

START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"


def quality_table(results: Dict[str, Any]) -> str:
    """F1 (mean ± std over seeds) per system and domain/K, plus mean train/infer times."""
    summary = summarize(results["runs"])
    columns = sorted(
        {(r["domain"], r["k"]) for r in results["runs"].values()},
        key=lambda c: (DOMAINS.index(c[0]) if c[0] in DOMAINS else 99, c[0], c[1]),
    )
    header = ["system"] + [f"{d} K={k}" for d, k in columns] + ["train s", "infer s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    settings = results.get("settings", {})
    for system in SYSTEMS:
        cells, train, infer = [], [], []
        general = general_size(settings, system)
        size = f"|n{general}" if general else ""
        for domain, k in columns:
            entry = summary.get(f"{system}|{domain}|k{k}{size}")
            if entry is None:
                cells.append("-")
                continue
            std = f" ± {entry['std']:.1f}" if entry["std"] is not None else ""
            cells.append(f"{entry['mean']:.1f}{std}")
            train.append(entry["train_s"])
            infer.append(entry["infer_s"])
        if system in OPTIONAL and not train:
            continue  # a variant shows where it was run
        times = [f"{sum(train) / len(train):.0f}", f"{sum(infer) / len(infer):.0f}"] if train else ["-", "-"]
        name = SYSTEM_NAMES[system] + (f" (n={general})" if size else "")
        lines.append(f"| {name} | " + " | ".join(cells + times) + " |")
    published = [f"{GLINER_PUBLISHED[d]:.1f}†" if d in GLINER_PUBLISHED else "-" for d, _ in columns]
    lines.append("| GLiNER-L zero-shot (published, not measured) | " + " | ".join(published + ["-", "-"]) + " |")
    return "\n".join(lines)


def speed_table(results: Dict[str, Any]) -> str:
    """One row per decoding system of a bench/speed.py result."""
    systems = results["systems"]
    base = systems.get("cllmfs_pipe")
    with_base = base is not None and any(name.startswith("cllmfs_shared") for name in systems)
    rows: List[str] = [
        "| system | sentences/s | prompts/s | generated tokens/s | forward passes | peak memory MiB "
        "| share of compute floor | speed-up vs one generate() per prompt |"
        + (" speed-up vs cllmfs_pipe |" if with_base else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if with_base else ""),
    ]
    for name, system in systems.items():
        speedup = system.get("speedup_vs_per_prompt")
        row = (
            f"| {name} | {_rate(system['sentences_per_s'])} | {system['prompts_per_s']:.2f} | "
            f"{system['generated_tokens_per_s']:.1f} | {system['forward_passes']} | "
            f"{system['peak_memory_mib']:.0f} | {100 * system['fraction_of_floor']:.1f}% | "
            + (f"{speedup:.2f}x |" if speedup else "- |")
        )
        if with_base:
            row += f" {base['wall_s'] / system['wall_s']:.2f}x |"
        rows.append(row)
    training = results.get("training")
    if training:
        rows += ["", f"Training, `update()` on {training['sentences']} train sentences (median of "
                 f"{len(next(iter(training['runs'].values()))['walls_s'])} runs):", "",
                 "| training path | sentences/s | prompts | peak memory MiB | speed-up vs unshared |",
                 "|---|---|---|---|---|"]
        for name, run in training["runs"].items():
            rows.append(f"| {name} | {_rate(run['sentences_per_s'])} | {run['prompts']} | "
                        f"{run['peak_memory_mib']:.0f} | {run['speedup_vs_unshared']:.2f}x |")
    return "\n".join(rows)


def general_size_table(results: Dict[str, Any]) -> str:
    """F1 against the size of the general mix (0: few-shot only, the cllmfs row), for the
    domains and K where cllmfs_general ran at more than one size; "" if none did."""
    summary = summarize(results["runs"])
    sizes: Dict[tuple, Dict[int, float]] = {}
    for run in results["runs"].values():
        if run["system"] == "cllmfs_general":
            entry = summary[f"cllmfs_general|{run['domain']}|k{run['k']}|n{run['general_sentences']}"]
            sizes.setdefault((run["domain"], run["k"]), {})[run["general_sentences"]] = entry["mean"]
    swept = {column: by_size for column, by_size in sizes.items() if len(by_size) > 1}
    if not swept:
        return ""
    lines = ["| domain | K | general sentences | F1 | general adapter train s |", "|---|---|---|---|---|"]
    for (domain, k), by_size in sorted(swept.items()):
        base = summary.get(f"cllmfs|{domain}|k{k}")
        if base is not None:
            lines.append(f"| {domain} | {k} | 0 (few-shot only) | {base['mean']:.1f} | - |")
        for size, f1 in sorted(by_size.items()):
            run = next(r for r in results["runs"].values() if r["system"] == "cllmfs_general"
                       and (r["domain"], r["k"], r["general_sentences"]) == (domain, k, size))
            train = run.get("general_adapter", {}).get("train_s")
            lines.append(f"| {domain} | {k} | {size} | {f1:.1f} | {f'{train:.0f}' if train else '-'} |")
    return "\n".join(lines)


def contrastive_table(results: Dict[str, Any]) -> str:
    """The contrastive term's effect: F1 of each contrastive system minus that of
    cllmfs_lora (same shots, LoRA only) per domain/K where both ran, and the mean over
    them; "" if no pair ran."""
    summary = summarize(results["runs"])
    columns = sorted({(r["domain"], r["k"]) for r in results["runs"].values() if r["system"] == "cllmfs_lora"},
                     key=lambda c: (DOMAINS.index(c[0]) if c[0] in DOMAINS else 99, c[0], c[1]))
    rows = []
    for system in ("cllmfs",) + ABLATIONS:
        deltas = []
        for domain, k in columns:
            entry, base = summary.get(f"{system}|{domain}|k{k}"), summary[f"cllmfs_lora|{domain}|k{k}"]
            deltas.append(None if entry is None else entry["mean"] - base["mean"])
        measured = [d for d in deltas if d is not None]
        if measured:
            cells = ["-" if d is None else f"{d:+.1f}" for d in deltas]
            mean = f"{sum(measured) / len(measured):+.1f} ({len(measured)})"
            rows.append(f"| {SYSTEM_NAMES[system]} | " + " | ".join(cells + [mean]) + " |")
    if not rows:
        return ""
    header = ["system"] + [f"{d} K={k}" for d, k in columns] + ["mean (domains)"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])


def _rate(value: float) -> str:
    """Two decimals, or three significant digits for slow rates (0.0243, not 0.02)."""
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def relative_paths(command: str, parent: Path = ROOT.parent) -> str:
    """Show absolute paths under the repository's parent folder as `../...` (older files
    recorded them), leaving relative paths that merely contain that folder's name alone.
    """
    return re.sub(rf"(?<![^\s=]){re.escape(str(parent))}/", "../", command)


def describe(results: Dict[str, Any]) -> str:
    settings = results.get("settings", {})
    machines = results.get("machines") or [results.get("machine", {})]
    where = " and ".join(dict.fromkeys(
        m.get("gpu") or f"{m.get('cpus')}-core CPU ({m.get('processor') or m.get('platform')})" for m in machines
    ))
    commands = [relative_paths(c) for c in results.get("commands") or [results.get("command")]]
    shown = "Command: " if len(commands) == 1 else "Commands (one matrix, resumed): "
    runs = results["runs"]
    wall = sum(run.get("wall_s", 0.0) for run in runs.values())
    superseded = results.get("superseded", {})
    kept = (f". The file also keeps {count(len(superseded), 'superseded run')}, not in the table: "
            + "; ".join(f"{key} ({run.get('superseded')})" for key, run in superseded.items()) + "."
            ) if superseded else ""
    loads = [run["load_average_at_start"][0] for run in runs.values() if run.get("load_average_at_start")]
    load = ""
    if loads:
        low, high = f"{min(loads):.1f}", f"{max(loads):.1f}"
        load = (f" (1-min load average at the start of the {count(len(loads), 'run')} that recorded it: "
                f"{low if low == high else f'{low} to {high}'})")
    walls = "measured wall time" if len(runs) == 1 else "sum of their measured wall times"
    return (f"Model `{settings.get('model')}`, {where}, {count(len(runs), 'run')}, {walls} "
            f"{wall / 60:.0f} min{load}.{changed_settings(results)} {shown}"
            + "; ".join(f"`{c}`" for c in commands) + kept)


def count(number: int, noun: str) -> str:
    """"1 run", "3 runs": a count with its noun in the right number."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def changed_settings(results: Dict[str, Any]) -> str:
    """The recorded settings that differ from those of the file's recorded profile (for
    older files, the one their command named), e.g. a learn rate set with `--set`; ""
    if none do (`general_conll` only where a general system ran, `recorded_settings`)."""
    profile = results.get("profile")
    if profile is None:  # a file written before the profile was recorded: the one its command named
        words = (results.get("command") or "").split()
        profile = words[words.index("--profile") + 1] if "--profile" in words[:-1] else DEFAULT_PROFILE
    recorded, defaults = recorded_settings(results), PROFILES.get(profile, {})
    changed = [f"{key} = {json.dumps(recorded[key])}" for key in sorted(set(recorded) & set(defaults))
               if key != "model" and recorded[key] != defaults[key]]
    return f" Settings other than the `{profile}` profile's: {', '.join(changed)}." if changed else ""


def section(results_dir: Path) -> str:
    parts = ["## Benchmarks", "",
             "Every figure below comes from the JSON file named with it, written by the command shown; "
             "`python bench/table.py` regenerates this section. † published, not measured here.", ""]
    for path in sorted(results_dir.glob("quality-*.json")):
        results = json.loads(path.read_text())
        parts += [f"### Few-shot F1 (spaCy ents_f x 100): `{_shown(path)}`", "", describe(results), "",
                  quality_table(results), ""]
        effect = contrastive_table(results)
        if effect:
            parts += ["The contrastive term's effect: F1 minus that of LoRA only (same shots), "
                      "per domain and its mean over the domains where both ran:", "", effect, ""]
        sweep = general_size_table(results)
        if sweep:
            parts += ["F1 against the size of the general mix (CoNLL-2003 + the other CrossNER domains) "
                      "the adapter saw before the K shots:", "", sweep, ""]
    for path in sorted(results_dir.glob("speed-*.json")):
        results = json.loads(path.read_text())
        parts += [f"### Annotation speed: `{_shown(path)}`", "", speed_description(results), "",
                  speed_table(results), ""]
    return "\n".join(parts).rstrip() + "\n"


def speed_description(results: Dict[str, Any]) -> str:
    env, inputs, floor = results["environment"], results["inputs"], results["compute_floor"]
    agreement = results["agreement"]
    return (
        f"{inputs['sentences']} sentences x {len(inputs['labels'])} labels = {inputs['prompts']} prompts "
        f"({inputs['prompt_tokens']} prompt tokens), model `{env['model']}`"
        + (f" with LoRA adapter `{env['adapter']}`" if env.get("adapter") else " (no adapter)")
        + f" ({env['n_parameters'] / 1e6:.0f}M "
        f"parameters, {env['dtype']}) on {env['device']} ({env['device_name']}, {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads), {env['date'][:10]}{_load(env)}."
        + (f" Outputs of the three unconstrained systems differed on {agreement['mismatches']} of "
           f"{agreement['prompts']} prompts." if agreement.get("mismatches") is not None else "")
        + f"{_entities(results)} "
        f"Compute floor: {floor['formula']} at {_peaks(floor)}. Command: `{relative_paths(env['command'])}`"
    )


def _peaks(floor: Dict[str, Any]) -> str:
    peak, source = floor["peak_tflops"], floor["peak_source"]
    if not isinstance(peak, dict):
        return f"{peak:.3f} TFLOP/s ({source})"
    return "; ".join(f"{value:.3f} TFLOP/s {dtype} ({source[dtype]})" for dtype, value in peak.items())


def _entities(results: Dict[str, Any]) -> str:
    """How often the pipe systems' entities differ from those of `cllmfs_pipe`."""
    agreement = results.get("entity_agreement_vs_cllmfs_pipe") or {}
    parts = [f"{name} {a['sentences_differing']} of {a['sentences']}" for name, a in agreement.items()]
    skipped = "; ".join(f"{k} {v}" for k, v in (results.get("skipped") or {}).items())
    text = f" Sentences whose entities differ from cllmfs_pipe's: {', '.join(parts)}." if parts else ""
    return text + (f" Not run: {skipped}." if skipped else "")


def _load(env: Dict[str, Any]) -> str:
    """The 1-minute load average at the start, when the run recorded it (other jobs slow CPU runs)."""
    load = env.get("load_average_at_start")
    return f", 1-min load average {load[0]:.1f} at the start" if load else ""


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def main_with(results_dir: Path, readme_path: Path) -> None:
    """Replace the README's section between the markers with fresh tables."""
    readme = readme_path.read_text(encoding="utf8")
    if START not in readme or END not in readme:
        raise SystemExit(f"{readme_path} has no {START} ... {END} markers.")
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme_path.write_text(f"{head}{START}\n{section(results_dir)}{END}{tail}", encoding="utf8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--print", action="store_true", dest="print_only")
    args = parser.parse_args()
    if args.print_only:
        print(section(args.results))
    else:
        main_with(args.results, args.readme)


if __name__ == "__main__":
    main()
