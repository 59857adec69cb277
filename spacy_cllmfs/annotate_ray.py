"""Annotating on a Ray cluster: the shards and manifest of `annotate`, run by Ray Data.

The shards still to do become a Ray dataset, and `map_batches` runs them on a
pool of actors, each holding the pipeline on its GPU or CPU slice; the driver
writes the manifest, so a Ray run resumes like any other. `EntityAnnotator` is
the actor for a Ray dataset of texts that you already have.
"""
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .annotate import (
    AnnotateSummary,
    ShardAnnotator,
    WorkerSettings,
    load_pipeline,
    pending_specs,
    plan,
    progress_bar,
    quiet_loading,
)
from .shards import AnnotateError, PathLike, ShardResult, ShardSpec


class EntityAnnotator:
    """A Ray Data actor that runs a pipeline over batches of texts.

    Use it on a dataset that you already have (one model per actor):

        ds.map_batches(EntityAnnotator, fn_constructor_kwargs={"pipeline": "model-best"},
                       batch_size=64, concurrency=4, num_gpus=1)

    pipeline (str): A pipeline folder or package, readable on every node.
    device (Optional[str]): Where the cllmfs_ner models go; None: "cuda" if the
        actor was given a GPU, else "cpu".
    text_column (str): The column holding the texts; an "ents" column is added with
        the entities of each text as [{"start", "end", "label"}] (character offsets).
    """

    def __init__(self, pipeline: str, device: Optional[str] = None, text_column: str = "text",
                 batch_size: int = 64) -> None:
        quiet_loading()
        device = device or _ray_device()
        self.nlp = load_pipeline(pipeline, device)
        self.text_column = text_column
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        texts = [str(text) for text in batch[self.text_column]]
        ents = [
            [{"start": e.start_char, "end": e.end_char, "label": e.label_} for e in doc.ents]
            for doc in self.nlp.pipe(texts, batch_size=self.batch_size)
        ]
        return {**batch, "ents": ents}


def _ray_device() -> str:
    try:
        import ray

        return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:  # not inside a Ray worker
        return "cpu"


class _RayShardWriter:
    """The actor of `annotate_ray`: a ShardAnnotator per actor, one shard per call."""

    def __init__(self, settings: WorkerSettings, device: Optional[str], threads: Optional[int]) -> None:
        quiet_loading()
        self.annotator = ShardAnnotator(settings, device or _ray_device(), threads)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {"result": [self.annotator(ShardSpec.from_json(str(spec))).to_json() for spec in batch["spec"]]}


def annotate_ray(
    pipeline: str,
    input_path: PathLike,
    output_dir: PathLike,
    *,
    address: Optional[str] = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    input_format: str = "auto",
    output_format: str = "spacy",
    shard_size: int = 1000,
    batch_size: int = 64,
    max_chars: int = 1_000_000,
    overwrite: bool = False,
    progress: bool = True,
) -> AnnotateSummary:
    """Annotate a corpus on a Ray cluster: the same shards and manifest as `annotate`.

    The shards still to do become a Ray dataset; `map_batches` runs them on a pool of
    `actors` actors, each holding the pipeline on its GPU (`gpus_per_actor`) or CPU
    slice (`cpus_per_actor` cores). Actors read their lines from `input_path` and
    write their shards into `output_dir` themselves, so both must be reachable at
    the same path on every node (a shared filesystem); the driver writes the manifest.

    address (Optional[str]): The cluster: "auto" (the one this node belongs to),
        "ray://HOST:10001", or None to use a running `ray.init()` or start a local one.
    Other settings as in `annotate`.
    """
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise AnnotateError(
            "Ray is not installed. Fix: pip install 'spacy-cllmfs[ray]' (or 'ray[data]>=2.9')."
        ) from err
    if actors < 1:
        raise AnnotateError(f"The number of Ray actors must be >= 1, got {actors}.")
    begin = time.perf_counter()
    todo = plan(
        pipeline, input_path, output_dir, input_format=input_format, output_format=output_format,
        shard_size=shard_size, batch_size=batch_size, max_chars=max_chars, overwrite=overwrite,
    )
    shards_before = len(todo.manifest.finished)
    if todo.pending:
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        rows = [{"spec": spec.to_json()} for spec in pending_specs(todo)]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4096))
        threads = max(1, int(cpus_per_actor)) if not gpus_per_actor else None
        results = dataset.map_batches(
            _RayShardWriter,
            fn_constructor_kwargs={"settings": todo.settings, "device": None, "threads": threads},
            batch_size=1,
            concurrency=actors,
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
        by_index = {spec.index: spec for spec in todo.pending}
        bar = progress_bar(todo, progress, actors)
        try:
            for row in results.iter_rows():
                result = ShardResult.from_dict(json.loads(row["result"]))
                todo.manifest.commit(result)
                bar.update(by_index[result.shard].n_docs)
        finally:
            bar.close()
    todo.manifest.write_errors()
    return AnnotateSummary(
        Path(output_dir), len(todo.manifest.finished), shards_before, todo.manifest.n_docs,
        todo.manifest.n_errors, time.perf_counter() - begin,
    )


__all__ = ["EntityAnnotator", "annotate_ray"]
