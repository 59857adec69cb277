"""spacy-cllmfs: few-shot NER for spaCy with a LoRA-tuned causal LLM.

Importing the package registers the `cllmfs_ner` factory and the
`spacy_cllmfs.*` config functions.
"""
from .about import __version__
from .callbacks import checkpoint_v1
from .component import CLLMFSNer, make_cllmfs_ner
from .llm_tuning import GeneralMix, TuningSettings, tune_llm, tune_llm_general, tune_llm_mixed
from .models import HFCausalLM, LoRASettings, hf_causal_lm_v1, lora_v1
from .prompts import PromptTemplate, prompt_v1
from .spacy_llm import SpacyLLMModel, embed_in_pipeline, ner_v3_examples, spacy_llm_model_v1, write_ner_v3_examples
from .training import TrainingSettings, training_v1, training_v2

__all__ = [
    "CLLMFSNer",
    "GeneralMix",
    "HFCausalLM",
    "LoRASettings",
    "PromptTemplate",
    "SpacyLLMModel",
    "TrainingSettings",
    "TuningSettings",
    "__version__",
    "checkpoint_v1",
    "embed_in_pipeline",
    "hf_causal_lm_v1",
    "lora_v1",
    "make_cllmfs_ner",
    "ner_v3_examples",
    "spacy_llm_model_v1",
    "write_ner_v3_examples",
    "prompt_v1",
    "training_v1",
    "training_v2",
    "tune_llm",
    "tune_llm_general",
    "tune_llm_mixed",
]
