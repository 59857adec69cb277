"""The property tests of tests/test_properties.py on 10,000+ random cases.

    python bench/properties.py --examples 10000 --output bench/results/properties.json

Runs pytest with CLLMFS_PROPERTY_EXAMPLES set (random, not the suite's fixed
examples) and hypothesis' statistics, and records the cases run per property.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine_info  # noqa: E402

_TEST = re.compile(r"^(tests/\S+::\S+):$")
_COUNTS = re.compile(r"(\d+) passing examples?, (\d+) failing examples?, (\d+) invalid examples?")


def parse_statistics(output: str) -> Dict[str, Dict[str, int]]:
    """Per test: passing, failing and invalid examples, summed over hypothesis' phases."""
    stats: Dict[str, Dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        match = _TEST.match(line.strip())
        if match:
            current = match.group(1)
            stats[current] = {"passing": 0, "failing": 0, "invalid": 0}
            continue
        counts = _COUNTS.search(line)
        if counts and current:
            for key, value in zip(("passing", "failing", "invalid"), counts.groups()):
                stats[current][key] += int(value)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="Cases over all properties (about).")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "properties.json")
    args = parser.parse_args()
    result: Dict[str, Any] = machine_info()
    env = {**os.environ, "CLLMFS_PROPERTY_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "tests/test_properties.py", "-p", "no:cacheprovider",
               "--hypothesis-show-statistics", "-q"]
    begin = time.time()
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    stats = parse_statistics(run.stdout)
    summary = [line for line in run.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    result.update(
        pytest_command=" ".join(["CLLMFS_PROPERTY_EXAMPLES=" + str(args.examples), "python"] + command[1:]),
        seconds=round(time.time() - begin, 1),
        exit_code=run.returncode,
        pytest_summary=summary[-1] if summary else None,
        properties=stats,
        total_passing_examples=sum(s["passing"] for s in stats.values()),
        total_failing_examples=sum(s["failing"] for s in stats.values()),
    )
    if run.returncode != 0:
        result["failures"] = run.stdout[-8000:]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{result['total_passing_examples']} passing cases, {result['total_failing_examples']} failing, "
          f"pytest exit {run.returncode} ({result['seconds']}s) -> {args.output}")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
