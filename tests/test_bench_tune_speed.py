"""A reduced run of bench/tune_speed.py on a tiny model and fixture data."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench import tune_speed  # noqa: E402

from test_bench_quality import make_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tune_speed_times_both_variants(tmp_path, tiny_model_path):
    data = make_data(tmp_path)
    output = tmp_path / "tune-speed.json"
    argv = ["--data", str(data), "--domain", "politics", "--model", str(tiny_model_path), "--device", "cpu",
            "--shots", "1", "--sentences", "4", "--threads", "1", "--output", str(output)]
    tune_speed.main(argv)
    tune_speed.main(argv + ["--variants", "shared_step_examples"])  # a rerun is added, not a replacement
    runs = json.loads(output.read_text())["runs"]
    assert len(runs) == 2 and set(runs[1]["variants"]) == {"shared_step_examples"}
    first = runs[0]
    assert first["training_sentences"] == 4 and first["batch_size"] == 2 and first["speedup_median_step"] > 0
    own, shared = first["variants"]["own_examples"], first["variants"]["shared_step_examples"]
    for variant in (own, shared):
        assert len(variant["step_s"]) == len(variant["losses"]) == 2 and variant["median_step_s"] > 0
    assert own["prefixes_per_step"] == 2 and shared["prefixes_per_step"] == 1
    assert shared["shared_tokens"] < own["shared_tokens"]  # one example fewer: both of the step's left out
    assert "cpu_native_bf16" in first and first["command"].startswith("python")
    with pytest.raises(SystemExit):
        tune_speed.main(argv + ["--variants", "fast"])
