from pathlib import Path

from setuptools import find_packages, setup

about: dict = {}
exec((Path(__file__).parent / "spacy_cllmfs" / "about.py").read_text(), about)

setup(
    name=about["__title__"],
    version=about["__version__"],
    description="Few-shot named entity recognition for spaCy with a LoRA-tuned causal LLM "
    "and contrastive learning (CLLMFS)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["spacy_cllmfs", "spacy_cllmfs.*"]),
    install_requires=[
        "spacy>=3.8,<3.9",
        "spacy-llm>=0.7.2,<0.8",
        "thinc>=8.3,<8.4",
        "torch>=2.2",
        "transformers>=4.56",
        "peft>=0.13",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.100"],
        "ray": ["ray[data]>=2.9"],  # annotate --ray: Ray Data actors on a cluster
    },
    entry_points={
        "spacy_factories": ["cllmfs_ner = spacy_cllmfs.component:make_cllmfs_ner"],
        "spacy_misc": [
            "spacy_cllmfs.HFCausalLM.v1 = spacy_cllmfs.models:hf_causal_lm_v1",
            "spacy_cllmfs.LoRA.v1 = spacy_cllmfs.models:lora_v1",
            "spacy_cllmfs.prompt.v1 = spacy_cllmfs.prompts:prompt_v1",
            "spacy_cllmfs.prompt.v2 = spacy_cllmfs.prompts:prompt_v2",
            "spacy_cllmfs.prompt.v3 = spacy_cllmfs.prompts:prompt_v3",
            "spacy_cllmfs.training.v1 = spacy_cllmfs.training:training_v1",
            "spacy_cllmfs.training.v2 = spacy_cllmfs.training:training_v2",
        ],
        "spacy_callbacks": ["spacy_cllmfs.checkpoint.v1 = spacy_cllmfs.callbacks:checkpoint_v1"],
        "thinc_llm_models": ["spacy_cllmfs.SpacyLLMModel.v1 = spacy_cllmfs.spacy_llm:spacy_llm_model_v1"],
    },
)
