"""`annotate_ray` on a local Ray instance: the same shards and entities as one process."""
import pytest
import spacy

from conftest import randomize_adapter
from spacy_cllmfs.annotate import MANIFEST, annotate, iter_records, read_manifest
from spacy_cllmfs.annotate_ray import annotate_ray
from test_annotate import BAD_LINES, MAX_CHARS, write_jsonl

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'spacy-cllmfs[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_ray_actors_write_the_same_shards(local_ray, tiny_model_config, tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("cllmfs_ner", config={"model": tiny_model_config, "labels": ["person", "location"],
                                       "max_new_tokens": 12})
    randomize_adapter(nlp.get_pipe("cllmfs_ner"), seed=3, scale=0.2)
    nlp.to_disk(tmp_path / "pipeline")
    corpus = tmp_path / "corpus.jsonl"
    texts = write_jsonl(corpus, 24)
    settings = dict(shard_size=4, batch_size=4, max_chars=MAX_CHARS, progress=False)
    summary = annotate_ray(str(tmp_path / "pipeline"), corpus, tmp_path / "ray", actors=2, cpus_per_actor=1,
                           **settings)
    assert (summary.shards, summary.shards_written, summary.docs) == (6, 6, len(texts))
    _, finished = read_manifest(tmp_path / "ray" / MANIFEST)
    assert sorted(finished) == list(range(6))
    single = annotate(str(tmp_path / "pipeline"), corpus, tmp_path / "single", threads=1, **settings)
    assert single.errors == summary.errors == len(BAD_LINES)
    records = list(iter_records(tmp_path / "ray"))
    assert [r["line"] for r in records] == sorted(texts)
    assert any(r["ents"] for r in records)
    assert records == list(iter_records(tmp_path / "single"))
    resumed = annotate_ray(str(tmp_path / "pipeline"), corpus, tmp_path / "ray", actors=2, **settings)
    assert (resumed.shards_written, resumed.shards_before) == (0, 6)
