"""spacy-cllmfs: few-shot NER for spaCy with a LoRA-tuned causal LLM.

Importing the package registers the `cllmfs_ner` factory and the
`spacy_cllmfs.*` config functions.
"""
from .about import __version__
from .callbacks import checkpoint_v1
from .component import CLLMFSNer, make_cllmfs_ner
from .models import HFCausalLM, LoRASettings, hf_causal_lm_v1, lora_v1
from .prompts import PromptTemplate, prompt_v1
from .training import TrainingSettings, training_v1

__all__ = [
    "CLLMFSNer",
    "HFCausalLM",
    "LoRASettings",
    "PromptTemplate",
    "TrainingSettings",
    "__version__",
    "checkpoint_v1",
    "hf_causal_lm_v1",
    "lora_v1",
    "make_cllmfs_ner",
    "prompt_v1",
    "training_v1",
]
