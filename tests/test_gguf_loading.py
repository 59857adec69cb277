"""The streaming GGUF loader gives exactly what transformers' own GGUF loader gives.

A tiny GGUF is written from the tiny random Llama (q/k permuted the way
llama.cpp's converter does it, some tensors quantized to Q8_0), so the
comparison runs in seconds; the embedded SmolLM2 GGUF is compared in
`integration` tests.
"""
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch

import spacy_cllmfs.gguf_loading as gguf_loading
from spacy_cllmfs.gguf_loading import StreamingUnsupported, load_gguf_model

QUANTIZED = ("attn_q", "ffn_up", "token_embd")  # stored as Q8_0, the rest as F32
INPUT_IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The q/k row permutation of llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(model: Any, path: Path) -> Path:
    """Write a Hugging Face Llama model as a llama-architecture GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if ".attn_q." in name:
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif ".attn_k." in name:
            data = _llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        if any(f"{part}." in name for part in QUANTIZED):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf_model(tiny_model_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_hf_model, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


def load_both(path: Path, dtype: torch.dtype) -> Tuple[Any, Any]:
    """RETURNS (Tuple[model, model]): The streamed model and transformers' model."""
    from transformers import AutoModelForCausalLM

    streamed = load_gguf_model(str(path.parent), path.name, dtype, "cpu")
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return streamed, reference


def assert_same_model(streamed: Any, reference: Any, input_ids: torch.Tensor) -> None:
    """Same keys, dtypes and values (state dict and buffers), no meta tensors, same logits."""
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype, key
        assert torch.equal(value.float(), theirs[key].float()), key
    ours_buffers, their_buffers = dict(streamed.named_buffers()), dict(reference.named_buffers())
    assert list(ours_buffers) == list(their_buffers)
    for key, value in ours_buffers.items():
        assert value.dtype == their_buffers[key].dtype and torch.equal(value, their_buffers[key]), key
    tensors = list(streamed.parameters()) + list(streamed.buffers())
    assert not any(t.is_meta for t in tensors)
    assert not streamed.training
    assert streamed.config.tie_word_embeddings == reference.config.tie_word_embeddings
    if streamed.config.tie_word_embeddings:
        assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(streamed(input_ids).logits, reference(input_ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_gguf_matches_transformers(tiny_gguf: Path, dtype: torch.dtype) -> None:
    streamed, reference = load_both(tiny_gguf, dtype)
    assert_same_model(streamed, reference, INPUT_IDS)


def test_tiny_gguf_round_trips_the_float_weights(tiny_gguf: Path, tiny_hf_model: Any) -> None:
    """The F32 tensors (attn_k among them: un-permuted) come back as they were written."""
    streamed = load_gguf_model(str(tiny_gguf.parent), tiny_gguf.name, torch.float32)
    original = tiny_hf_model.state_dict()
    checked = 0
    for key, value in streamed.state_dict().items():
        if not any(part in key for part in ("q_proj", "up_proj", "embed_tokens")):
            assert torch.equal(value, original[key]), key
            checked += 1
    assert checked > 0 and any("k_proj" in key for key in original)
    # Q8_0 is close to the original, and the logits with it too
    q_key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(streamed.state_dict()[q_key], original[q_key], atol=0.02)


def test_unsupported_options_fall_back_to_transformers(
    tiny_gguf: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    calls: Dict[str, Any] = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.update(kwargs)
        kwargs.pop("low_cpu_mem_usage")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    with caplog.at_level(logging.INFO, logger="spacy_cllmfs"):
        model = load_gguf_model(str(tiny_gguf.parent), tiny_gguf.name, torch.float32, low_cpu_mem_usage=True)
    assert calls["gguf_file"] == tiny_gguf.name and calls["dtype"] == torch.float32
    assert "transformers' own GGUF loader" in caplog.text and "low_cpu_mem_usage" in caplog.text
    assert not any(p.is_meta for p in model.parameters())


def test_chunked_dequantize_is_gguf_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType.Q8_0
    data = gguf.quants.quantize(np.random.default_rng(0).normal(size=(37, 64)).astype(np.float32), qtype)
    monkeypatch.setattr(gguf_loading, "DEQUANTIZE_CHUNK_BYTES", 5 * 64 * 4)  # 5 rows a call
    assert np.array_equal(gguf_loading._dequantize(data, qtype), gguf.quants.dequantize(data, qtype))


def test_coverage_check() -> None:
    embed, head = [(torch.nn.Module(), "weight")], [(torch.nn.Module(), "weight")]
    norm = [(torch.nn.Module(), "weight")]
    tied = embed  # the same list object: one tensor in two places
    slots = {"embed.weight": embed, "head.weight": tied, "norm.weight": norm}
    gguf_loading._check_coverage(slots, {"embed.weight", "norm.weight"})
    with pytest.raises(StreamingUnsupported, match="no tensor for norm.weight"):
        gguf_loading._check_coverage(slots, {"embed.weight"})
    with pytest.raises(StreamingUnsupported, match="tied weights"):
        gguf_loading._check_coverage(slots, {"embed.weight", "head.weight", "norm.weight"})
    with pytest.raises(StreamingUnsupported, match="no tensor for lm_head"):
        gguf_loading._check_coverage({"lm_head.weight": head}, set())


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedded_gguf_matches_transformers(dtype: torch.dtype) -> None:
    from spacy_cllmfs.embedded import embedded_model_path

    path = embedded_model_path()
    streamed, reference = load_both(path, dtype)
    assert streamed.config.tie_word_embeddings  # SmolLM2's GGUF has no output.weight
    assert_same_model(streamed, reference, torch.tensor([[1, 504, 3000, 42, 7, 99, 12, 28]]))


@pytest.mark.integration
def test_embedded_processor_config_is_the_gguf_config() -> None:
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from spacy_cllmfs.embedded import embedded_model_path

    path = embedded_model_path()
    architecture, keys, tensors, _ = gguf_loading._read_gguf(str(path))
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = gguf_loading._processor_config(config, keys, architecture)
    theirs = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    assert architecture == "llama" and len(tensors) == 272
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
        assert ours[key] == theirs[key]


@pytest.mark.integration
def test_hf_causal_lm_streams_gguf_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from spacy_cllmfs.models import HFCausalLM

    streamed = []
    original = gguf_loading.stream_gguf_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        streamed.append(model)
        return model

    monkeypatch.setattr(gguf_loading, "stream_gguf_model", spy)
    lm = HFCausalLM("embedded", device="cpu", dtype="bfloat16")
    assert lm.model is streamed[0] and lm.model.dtype == torch.bfloat16
    assert lm.tokenizer("Hello").input_ids
