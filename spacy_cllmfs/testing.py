"""A tiny random Llama-style model and byte-level BPE tokenizer, built offline.

Tests and benchmarks use it to exercise the whole pipeline in seconds on a CPU,
with no download: the tokenizer is trained on a few sentences, the weights are
random (seeded).
"""
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
TRAINING_TEXT = [
    "Please extract the entity of person in the input sentence given below, the entity "
    "of person refers to names of people, real or fictional.",
    "Input sentence: Barack Obama visited Paris with Angela Merkel in 2009.",
    "I can extract entities for you, the extracted entities are <<< Barack Obama >>> <<< Paris >>>",
    "The European Union and the United Nations met in New York and Geneva.",
    "Marie Curie won the Nobel Prize in Physics and Chemistry.",
    "The Labour Party won the 1997 general election in the United Kingdom.",
    "location organisation politician politicalparty country misc event election",
    "system user assistant Instruction Response ### 0123456789 .,;:!?'\"()[]{}-",
]


def build_tiny_model(path: Path, seed: int = 0, layers: int = 4) -> Path:
    """Write a tiny random Llama model and BPE tokenizer to `path`.

    path (Path): The folder to write (created if missing).
    seed (int): Seed of the random weights.
    layers (int): Number of transformer layers.
    RETURNS (Path): `path`, loadable as `[components.cllmfs_ner.model] name`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
