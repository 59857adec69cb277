"""A reduced run of bench/quality.py (all five systems) on a tiny model and fixture data."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import spacy
import torch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402
from bench.table import (  # noqa: E402
    changed_settings, contrastive_table, describe, general_size_table, quality_table, relative_paths,
)
from spacy_cllmfs.labels import annotated_labels  # noqa: E402


def make_data(tmp_path):
    fixtures = ROOT / "tests" / "fixtures"
    for domain, source in (("politics", "crossner_sample.txt"), ("music", "music_sample.txt"),
                           ("conll2003", "conll2003_sample.txt")):
        (tmp_path / "data" / domain).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            shutil.copy(fixtures / source, tmp_path / "data" / domain / f"{split}.txt")
    return tmp_path / "data"


def test_quality_matrix_smoke_and_resume(tmp_path, tiny_model_path, capsys):
    make_data(tmp_path)
    output = tmp_path / "quality.json"
    default_mix = [
        "--data", str(tmp_path / "data"), "--profile", "cpu-smoke", "--model", str(tiny_model_path),
        "--device", "cpu", "--domains", "politics", "--shots", "1", "--test-limit", "3", "--epochs", "1",
        "--output", str(output), "--work", str(tmp_path / "work"),
        "--set", "source_limit=4", "--set", "spacy_ner_steps=4", "--set", "max_new_tokens=12",
        "--set", "llm_max_new_tokens=12", "--set", "dev_limit=3", "--set", "llm_tune_epochs=1",
        "--set", "general_size=4", "--set", 'extra_general_sizes={"politics": [6]}', "--set", "llm_general_size=4",
    ]
    argv = default_mix + ["--set", "general_conll=true"]  # CoNLL-2003 fills the larger mixes
    quality.main(argv + ["--time-budget", "1e-9"])  # the budget is spent before the first run
    assert "Time budget" in capsys.readouterr().out and not json.loads(output.read_text())["runs"]
    quality.main(argv)
    out = capsys.readouterr().out
    assert "Matrix complete" in out
    assert "tune_llm: dev ents_f" in out and "tune_llm: step 1/" in out  # spacy_llm_lora's progress
    results = json.loads(output.read_text())
    keys = {f"{s}|politics|k1|s0" for s in quality.SYSTEMS if s not in quality.GENERAL_SYSTEMS}
    sized = {"cllmfs_general|politics|k1|s0|n4", "cllmfs_general|politics|k1|s0|n6", "spacy_llm_general|politics|k1|s0|n4"}
    assert set(results["runs"]) == keys | sized
    for run in results["runs"].values():
        assert 0.0 <= run["ents_f"] <= 1.0 and run["infer_s"] > 0 and run["train_sentences"] > 0
        assert len(run["load_average_at_start"]) == 3 and len(run["load_average_at_end"]) == 3
        assert 0 < run["resident_gb_at_start"] <= run["process_peak_resident_gb"]
    assert results["settings"]["model"] == str(tiny_model_path) and results["machine"]["cpus"]
    assert list((tmp_path / "work").glob("source-*/adapter_config.json"))
    general = results["runs"]["cllmfs_general|politics|k1|s0|n6"]
    assert general["general_sentences"] == 6 and general["general_adapter"]["sentences"] == 6
    assert len(list((tmp_path / "work").glob("general-*-politics-n*/adapter_config.json"))) == 3
    general_llm = results["runs"]["spacy_llm_general|politics|k1|s0|n4"]  # conll2003 and music, 2 each
    assert general_llm["general_adapter"]["per_corpus"] == {"conll2003": 2, "music": 2}
    assert general_llm["general_adapter"]["steps"] == 2 and "0" in general_llm["dev_scores"]
    quality.main(argv)  # everything is done already: nothing runs again
    assert json.loads(output.read_text())["runs"] == results["runs"]
    quality.main(argv + ["--systems", "spacy_ner"])  # a resume with other arguments is recorded too
    resumed = json.loads(output.read_text())
    assert resumed["runs"] == results["runs"] and len(resumed["commands"]) == 3
    assert "Commands (one matrix, resumed)" in describe(resumed) and f"{len(keys) + 3} runs" in describe(resumed)
    assert "1-min load average at the start of the" in describe(resumed)
    assert "Settings other than the `cpu-smoke` profile's: dev_limit = 3, epochs = 1," in describe(resumed)
    assert "model =" not in describe(resumed)  # the model is named at the start
    assert resumed["machines"] == [resumed["machine"]]
    assert all(run["machine"] == resumed["machine"] for run in resumed["runs"].values())
    other = dict(resumed["machine"], processor="Another CPU")  # a matrix resumed on another machine
    assert "CPU (Another CPU)" in describe(dict(resumed, machines=resumed["machines"] + [other]))
    assert resumed["profile"] == "cpu-smoke"  # recorded: the table compares with that profile, not a default
    assert "Settings other than the `gpu` profile's: " in describe(dict(resumed, profile="gpu"))
    cllmfs = results["runs"]["cllmfs|politics|k1|s0"]
    assert cllmfs["dev_sentences"] == 3 and cllmfs["best_step"] in (1, 2) and len(cllmfs["dev_scores"]) <= 2
    assert set(cllmfs["calibration"]) >= {"open_bias", "f1_before", "f1_after"}
    tuned = results["runs"]["spacy_llm_lora|politics|k1|s0"]  # scored untrained (step 0), then tuned
    assert tuned["steps"] >= 1 and "0" in tuned["dev_scores"] and tuned["best_step"] in (0, tuned["steps"])
    try:  # continuing the file with other settings would mix two matrices
        quality.main(argv + ["--set", "negatives_per_positive=2.0"])
        raise AssertionError("a results file of other settings was continued")
    except SystemExit:
        pass
    assert "negatives_per_positive" in capsys.readouterr().err
    # the file's general runs mixed CoNLL-2003 in: continuing it with the default is refused,
    # and so is a file written before the setting existed (it ran with CoNLL-2003); the error
    # says how to continue it as recorded
    older = tmp_path / "older.json"
    older.write_text(json.dumps(dict(results, settings={k: v for k, v in results["settings"].items()
                                                        if k != "general_conll"})))
    for output_argv in ([], ["--output", str(older)]):
        with pytest.raises(SystemExit):
            quality.main(default_mix + output_argv)
        err = capsys.readouterr().err
        assert "(general_conll)" in err and "pass --set general_conll=true to continue it as recorded" in err
    table = quality_table(results)
    for system in quality.SYSTEMS:
        assert f"| {quality.SYSTEM_NAMES[system]}" in table
    assert "politics K=1" in table and "GLiNER-L" in table and "general mix -> domain (n=4) |" in table
    assert "then on its prompts (n=4) |" in table
    effect = contrastive_table(results)
    assert len(effect.splitlines()) == 2 + 1 + len(quality.ABLATIONS) and "(1) |" in effect
    sweep = general_size_table(results)
    assert "| politics | 1 | 0 (few-shot only) |" in sweep and "| politics | 1 | 6 |" in sweep


def test_a_resumed_file_keeps_every_machine_it_ran_on():
    old, new = {"cpus": 2, "processor": "AMD EPYC"}, {"cpus": 2, "processor": "Xeon"}
    results = {"machine": dict(old), "runs": {}}  # written before "machines" existed
    assert quality.record_machine(results, new) == new
    assert results["machine"] == new and results["machines"] == [old, new]
    quality.record_machine(results, dict(new))
    assert results["machines"] == [old, new]  # once each
    fresh: dict = {}
    quality.record_machine(fresh, new)
    assert fresh["machines"] == [new]


def test_general_mix_leaves_the_target_out_and_declares_labels(tmp_path):
    data = make_data(tmp_path)
    vocab = quality.spacy.blank("en").vocab
    docs = quality.general_docs(data, "politics", 4, vocab, conll=True)
    declared = [tuple(annotated_labels(doc)) for doc in docs]
    conll = ("LOC", "MISC", "ORG", "PER")
    music = tuple(sorted({e.label_ for d in quality.read_conll(data / "music" / "train.txt", vocab) for e in d.ents}))
    # an equal share per source (conll2003, music): 2 each; nothing of the target
    assert len(docs) == 4 and declared.count(conll) == 2 and declared.count(music) == 2
    assert all(len(doc.ents) for doc in docs) and music == ("album", "band", "location", "musicalartist", "musicalinstrument", "musicgenre", "song")
    # a music corpus of 2 sentences gives 2; CoNLL-2003 fills the rest
    blocks = (data / "music" / "train.txt").read_text().split("\n\n")
    (data / "music" / "train.txt").write_text("\n\n".join(blocks[:2]) + "\n")
    small = [tuple(annotated_labels(doc)) for doc in quality.general_docs(data, "politics", 6, vocab, conll=True)]
    assert len(small) == 6 and small.count(conll) == 4


def test_general_mixes_with_and_without_conll_have_their_own_data_and_adapters(tmp_path):
    data = make_data(tmp_path)
    vocab = quality.spacy.blank("en").vocab
    assert [name for name, _ in quality.general_sources(data, "politics", vocab, conll=True)] == ["conll2003", "music"]
    assert [name for name, _ in quality.general_sources(data, "politics", vocab, conll=False)] == ["music"]
    docs = quality.general_docs(data, "politics", 4, vocab, conll=False)
    music = {e.label_ for d in quality.read_conll(data / "music" / "train.txt", vocab) for e in d.ents}
    # music alone fills the mix, up to its 3 sentences with entities: no CoNLL-2003 label
    assert len(docs) == 3 and all(set(annotated_labels(doc)) == music for doc in docs)
    assert all(ent.label_ in music for doc in docs for ent in doc.ents)
    without = dict(quality.PROFILES["cpu-real"], model_tag="m", dtype="bfloat16", shots=[5])
    assert all(profile["general_conll"] is False for profile in quality.PROFILES.values())  # the default
    settings = dict(without, general_conll=True)
    # a mix with CoNLL-2003 keeps the folders and recipes of old (cached adapters stay valid) ...
    assert quality.general_folder(tmp_path, settings, "music", 250).name == "general-m-music-n250-e1"
    assert quality.general_llm_folder(tmp_path, settings, "music", 250).name.endswith("-lr0.0003")
    assert "conll" not in quality.general_llm_recipe(settings, "music", 250)
    # ... and the mix without it trains adapters of its own, never mixed up with them
    assert quality.general_folder(tmp_path, without, "music", 250).name == "general-m-music-n250-e1-noconll"
    assert quality.general_llm_folder(tmp_path, without, "music", 250).name.endswith("-lr0.0003-noconll")
    assert quality.general_llm_recipe(without, "music", 250)["conll"] is False
    # without CoNLL-2003 and without another domain, the error names the setting to change
    shutil.rmtree(data / "politics")
    with pytest.raises(ValueError, match="general_conll"):
        quality.general_docs(data, "music", 4, vocab, conll=False)


def test_a_file_written_before_general_conll_ran_with_conll():
    older = {"profile": "cpu-real", "settings": {"learn_rate": 3e-4}, "runs": {"spacy_llm_general|music|k5|s0|n250": {}}}
    assert quality.recorded_settings(older)["general_conll"] is True
    assert "Settings other than the `cpu-real` profile's: general_conll = true." == changed_settings(older).strip()
    # no general run read it: not named, and either value continues the file
    assert "general_conll" not in quality.recorded_settings(dict(older, runs={"cllmfs|music|k5|s0": {}}))
    assert changed_settings(dict(older, runs={"cllmfs|music|k5|s0": {}}, settings={"general_conll": True})) == ""
    assert changed_settings(dict(older, settings={"general_conll": False})) == ""
    assert quality.recorded_settings(dict(older, settings={"general_conll": False}))["general_conll"] is False


def test_runs_are_planned_most_important_first():
    settings = {"shots": [5, 20], "seeds": [0], "extra_seeds": {"politics": [1]}, "extra_shots": {},
                "general_size": 500, "extra_general_sizes": {"politics": [250, 1000]}}
    runs = quality.plan(settings, ["politics", "science"], ["cllmfs", "spacy_ner"])
    assert runs[:4] == [("politics", 5, 0, "cllmfs", None), ("politics", 5, 0, "spacy_ner", None),
                        ("science", 5, 0, "cllmfs", None), ("science", 5, 0, "spacy_ner", None)]
    assert len(runs) == len(set(runs)) == 2 * (2 * 2 + 2)  # politics: 2 K x 2 seeds, science: 2 K x 1 seed
    assert runs[4][:3] == ("politics", 5, 1)
    more = dict(settings, shots=[5], extra_shots={"politics": [20]})
    assert ("politics", 20, 0, "cllmfs", None) in quality.plan(more, ["politics"], ["cllmfs"])
    assert {run.k for run in quality.plan(more, ["politics"], ["cllmfs"], extra_shots=False)} == {5}  # --shots 5
    general = quality.plan(settings, ["politics", "science"], ["cllmfs", "cllmfs_general"])
    assert general[1].key == "cllmfs_general|politics|k5|s0|n500"
    # the size sweep comes last, at the first K and seed only
    assert [run.key for run in general[-2:]] == ["cllmfs_general|politics|k5|s0|n250",
                                                 "cllmfs_general|politics|k5|s0|n1000"]


def test_cllmfs_systems_differ_from_cllmfs_only_in_their_recipe():
    settings = {**quality.PROFILES["cpu-smoke"], "micro_batch_size": 8}
    base = quality.training_config(settings, "cllmfs")
    assert base["contrastive_weight"] == 0.1 and base["contrastive_negatives"] == "boundary"
    for system, change in [("cllmfs_lora", {"contrastive_weight": 0.0}),
                           ("cllmfs_center", {"contrastive_center": True}),
                           ("cllmfs_other_types", {"contrastive_negatives": "other_types"})]:
        config = quality.training_config(settings, system)
        assert {k: v for k, v in config.items() if base[k] != v} == change
    assert quality.training_config(settings, "cllmfs_general") == base


def test_contrastive_effect_is_the_difference_to_lora_only():
    def run(system, domain, f1):
        return {"system": system, "domain": domain, "k": 5, "ents_f": f1, "train_s": 1.0, "infer_s": 1.0}

    runs = [run("cllmfs_lora", "politics", 0.30), run("cllmfs", "politics", 0.35),
            run("cllmfs_lora", "music", 0.20), run("cllmfs", "music", 0.18),
            run("cllmfs_center", "music", 0.26), run("spacy_ner", "science", 0.5)]
    table = contrastive_table({"runs": {str(i): r for i, r in enumerate(runs)}})
    assert "| politics K=5 | music K=5 | mean (domains) |" in table and "science" not in table
    assert "LoRA + contrastive | +5.0 | -2.0 | +1.5 (2) |" in table
    assert "centred states | - | +6.0 | +6.0 (1) |" in table and "other-type" not in table
    assert contrastive_table({"runs": {"0": runs[1]}}) == ""


def test_describe_counts_runs_and_loads_in_the_right_number():
    run = {"wall_s": 60.0, "load_average_at_start": [0.64, 0.5, 0.4]}
    one = {"settings": {"model": "m"}, "machine": {"cpus": 2, "processor": "CPU"}, "command": "c",
           "runs": {"a": run}}
    assert "CPU (CPU), 1 run, measured wall time 1 min" in describe(one)
    assert "the start of the 1 run that recorded it: 0.6)" in describe(one)
    two = dict(one, runs={"a": run, "b": dict(run, load_average_at_start=[2.1, 1.0, 1.0])},
               superseded={"c": {"superseded": "why"}})
    assert "2 runs, sum of their measured wall times 2 min" in describe(two)
    assert "the 2 runs that recorded it: 0.6 to 2.1)" in describe(two)
    assert "keeps 1 superseded run, not in the table: c (why)." in describe(two)


def test_relative_paths_rewrites_only_absolute_paths():
    parent = Path("/home/ci/work")
    command = ("python bench/quality.py --data /home/ci/work/shared/data/crossner "
               "--model bench/work/models/m.gguf --output=/home/ci/work/main/r.json")
    assert relative_paths(command, parent) == (
        "python bench/quality.py --data ../shared/data/crossner "
        "--model bench/work/models/m.gguf --output=../main/r.json"
    )
    # a relative path that contains the parent's path is not an absolute path under it
    assert relative_paths("--model x/home/ci/work/m.gguf", parent) == "--model x/home/ci/work/m.gguf"


def test_general_llm_stages_have_their_own_learn_rates_and_cache_folders(tmp_path):
    settings = dict(quality.PROFILES["cpu-real"], model_tag="m", dtype="bfloat16", shots=[5],
                    llm_tune_learn_rate=1e-4)
    assert quality.llm_tuning(settings, seed=0).learn_rate == 1e-4  # the shot stage
    assert quality.llm_tuning(settings, seed=0, general=True).learn_rate == 3e-4  # the general stage
    contrastive = dict(settings, llm_tune_contrastive_weight=0.1)  # the shot stage's alone
    assert [quality.llm_tuning(contrastive, seed=0, general=g).contrastive_weight for g in (False, True)] == [0.1, 0.0]
    folder = quality.general_llm_folder(tmp_path, settings, "music", 250)
    # the shot stage's rate does not change the general adapter: it is reused
    assert quality.general_llm_folder(tmp_path, dict(settings, llm_tune_learn_rate=3e-4), "music", 250) == folder
    # what changes the general adapter changes its folder: it is trained anew, never mixed up
    others = [dict(settings, llm_general_learn_rate=1e-4), dict(settings, shots=[20]),
              dict(settings, llm_general_examples_shown=3), dict(settings, dtype="float32"),
              dict(settings, llm_label_definitions="contrasted")]
    names = {quality.general_llm_folder(tmp_path, other, "music", 250) for other in others}
    assert folder not in names and len(names) == len(others)


def test_a_set_value_is_json_or_else_the_text():
    assert quality.setting_value('"contrasted"') == quality.setting_value("contrasted") == "contrasted"
    assert quality.setting_value("false") is False and quality.setting_value("2.0") == 2.0
    assert quality.setting_value("{}") == {} and quality.setting_value('{"politics": [20]}') == {"politics": [20]}


def test_an_unknown_definition_style_is_refused_before_any_run(tmp_path, capsys):
    try:
        quality.main(["--data", str(tmp_path / "missing"), "--profile", "cpu-smoke", "--output", str(tmp_path / "q.json"),
                      "--set", "llm_label_definitions=fancy"])
        raise AssertionError("an unknown style was accepted")
    except SystemExit:
        pass
    assert "Unknown label definition style 'fancy'" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def tiny_adapter(value: float) -> "quality.AdapterState":
    weights = {"base_model.model.layer.q_proj.lora_A.weight": torch.full((2, 4), value),
               "base_model.model.layer.q_proj.lora_B.weight": torch.zeros(4, 2)}
    return quality.AdapterState(config={"peft_type": "LORA", "r": 2}, weights=weights)


def test_cached_adapter_trains_once_and_never_reuses_another_recipe(tmp_path):
    calls = []

    def train():
        calls.append(1)
        return tiny_adapter(float(len(calls))), {"steps": 3}

    recipe = quality.adapter_recipe({"model_tag": "m", "dtype": "bfloat16"}, learn_rate=3e-4, mix=(1, 2))
    assert recipe["mix"] == [1, 2]  # as JSON, so that it compares equal to the saved one
    folder = tmp_path / "general-m-music-n250"
    state, info = quality.cached_adapter(folder, recipe, train)
    again, info_again = quality.cached_adapter(folder, recipe, train)  # loaded, not trained
    assert len(calls) == 1 and info == info_again == {"steps": 3}
    assert torch.equal(again.weights["base_model.model.layer.q_proj.lora_A.weight"], torch.ones(2, 4))
    other = dict(recipe, learn_rate=1e-4)
    with pytest.raises(ValueError, match="another recipe .differs in learn_rate.*Fix: move"):
        quality.cached_adapter(folder, other, train)  # a folder that holds another recipe's adapter
    (folder / "recipe.json").unlink()  # an adapter cached before recipes were saved
    with pytest.raises(ValueError, match="no recipe.json"):
        quality.cached_adapter(folder, recipe, train)
    assert len(calls) == 1 and (folder / "adapter_config.json").exists()  # nothing retrained or overwritten


def test_adapter_recipes_hold_what_trains_the_adapter_and_nothing_else(tiny_nlp, tiny_model_config):
    settings = dict(quality.PROFILES["cpu-real"], model_tag="m", dtype="bfloat16", shots=[5])

    def recipe(settings, nlp=tiny_nlp):
        return quality.cllmfs_recipe(settings, nlp, target="music", size=250, epochs=settings["general_epochs"])

    base = recipe(settings)
    assert base["training"]["@misc"] == "spacy_cllmfs.training.v2" and base["learn_rate"] == 3e-4
    # what only the evaluation or the shot stage uses does not change the general adapter
    assert recipe(dict(settings, dev_evals=5, test_limit=10, epochs=9)) == base
    contrastive = spacy.blank("en")
    contrastive.add_pipe("cllmfs_ner", config={
        "model": tiny_model_config, "labels": ["person", "location"], "max_new_tokens": 24,
        "training": {"@misc": "spacy_cllmfs.training.v2", "contrastive_weight": 0.5}})
    others = [recipe(dict(settings, learn_rate=1e-4)), recipe(dict(settings, batch_size=8)),
              recipe(dict(settings, general_epochs=2)), recipe(dict(settings, dtype="float32")),
              recipe(settings, contrastive)]
    assert all(other != base for other in others)
    assert len({json.dumps(other, sort_keys=True) for other in others}) == len(others)
    llm = quality.general_llm_recipe(settings, "music", 250)  # the spacy-llm path's general stage
    assert llm["tuning"]["learn_rate"] == 3e-4 and llm["mix"] == {"size": 250, "shots": 5, "seed": 0}
    assert quality.general_llm_recipe(dict(settings, llm_tune_learn_rate=1e-4, llm_tune_epochs=8), "music", 250) == llm
    for changed in (dict(settings, llm_general_learn_rate=1e-4), dict(settings, llm_general_examples_shown=3),
                    dict(settings, shots=[20]), dict(settings, llm_tune_prompt_gradients=False),
                    dict(settings, llm_label_definitions="contrasted")):
        assert quality.general_llm_recipe(changed, "music", 250) != llm
    # plain definitions leave the recipe as it was before the setting existed: cached adapters stay valid
    assert "definitions" not in llm
