"""Training callbacks for `spacy train`: periodic checkpoints to resume from."""
from pathlib import Path
from typing import Any, Callable, Dict

from spacy.language import Language
from spacy.util import registry

from .component import CLLMFSNer


@registry.callbacks("spacy_cllmfs.checkpoint.v1")
def checkpoint_v1(
    path: str = "training/checkpoint", every: int = 50, offset: int = 0
) -> Callable[[Language, Dict[str, Any]], None]:
    """A `[training.before_update]` callback that saves every `cllmfs_ner` component's
    adapter and optimizer state every `every` steps, to `path/<component name>`.

    Resume with `[initialize.components.<name>] resume_from = "<path>/<name>"`; the
    checkpoint's `state.json` holds the number of completed steps, counted from
    `offset` (the steps a resumed run had already done).
    """
    if every < 1:
        raise ValueError(f"spacy_cllmfs.checkpoint.v1: `every` must be >= 1, got {every}.")

    def before_update(nlp: Language, info: Dict[str, Any]) -> None:
        step = int(info["step"])
        if step == 0 or step % every:
            return
        for name, proc in nlp.pipeline:
            if isinstance(proc, CLLMFSNer):
                proc.save_checkpoint(Path(path) / name, step=offset + step, epoch=int(info["epoch"]))

    return before_update
