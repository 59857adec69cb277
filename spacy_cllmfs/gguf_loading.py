"""Load a GGUF checkpoint into a transformers causal LM one tensor at a time.

Why: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` dequantizes
every tensor of the file into one state dict before it fills the model, so the
whole model is in memory twice for a while, and the state dict is float32
whatever dtype was asked for in older transformers releases (issue 8: loading
Qwen2.5-Coder-1.5B in bfloat16 peaked at 18.8 GB RSS, against 9.1 GB in
float32). Here the model is built on the meta device (no weights), and each GGUF
tensor is dequantized, transformed, cast and put in place before the next one is
read, so the peak is the weights in the target dtype plus one tensor's worth of
float32 conversion. The pages of the memory-mapped file are released as they
are used, and the parsed GGUF metadata (a numpy view per vocabulary entry, more
than a small model's weights) is dropped before the weights are loaded.

The conversion itself is transformers' own, called per tensor: the config comes
from `AutoConfig.from_pretrained(..., gguf_file=...)`, the GGUF -> transformers
name map from `get_gguf_hf_weights_map`, and the per-tensor transforms (such as
the reverse permutation of Llama's q/k projections) from the architecture's
`TensorProcessor`. Architectures whose processor or loading needs more than one
tensor at a time (MoE expert merging, transformers' newer packed GGUF path,
checkpoint conversion mappings) are loaded by transformers' full loader instead.
"""
import logging
import mmap
import os
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Set, Tuple, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("spacy_cllmfs")

# The TensorProcessors whose `process` maps one tensor to one tensor under its own
# name, without stashing results in `parsed_parameters`: these can be streamed.
STREAMABLE_PROCESSORS = (
    "TensorProcessor",
    "LlamaTensorProcessor",
    "BloomTensorProcessor",
    "MambaTensorProcessor",
    "NemotronTensorProcessor",
    "Gemma2TensorProcessor",
)
DEQUANTIZE_CHUNK_BYTES = 16 << 20  # float32 output per gguf.quants.dequantize call
# from_pretrained keyword arguments this loader handles; any other one (device_map,
# quantization_config, ...) is left to transformers.
HUB_KWARGS = ("local_files_only", "revision", "token", "cache_dir", "subfolder")
SUPPORTED_KWARGS = HUB_KWARGS + ("attn_implementation",)


class StreamingUnsupported(Exception):
    """The streaming path cannot load this checkpoint exactly like transformers."""


def load_gguf_model(
    name_or_path: str,
    gguf_file: str,
    dtype: Any = torch.float32,
    device: Union[str, torch.device, None] = None,
    **kwargs: Any,
) -> "PreTrainedModel":
    """Load a causal LM from a GGUF file, one tensor at a time.

    Falls back to `AutoModelForCausalLM.from_pretrained` (logged at INFO) for
    checkpoints the streaming path does not support.

    name_or_path (str): The folder (or hub repo) holding the GGUF file.
    gguf_file (str): The GGUF file's name in that folder.
    dtype (torch.dtype): The dtype of the model's weights.
    device (Union[str, torch.device, None]): Where the weights go (default: CPU).
    **kwargs: Further `from_pretrained` arguments (local_files_only, attn_implementation, ...).
    RETURNS (transformers.PreTrainedModel): The model in eval mode, on `device`.
    """
    device = torch.device(device if device is not None else "cpu")
    try:
        return stream_gguf_model(name_or_path, gguf_file, dtype, device, **kwargs)
    except StreamingUnsupported as reason:
        logger.info(
            "Loading %s with transformers' own GGUF loader (needs more memory): %s", gguf_file, reason
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, dtype=dtype, **kwargs)
    return model if "device_map" in kwargs else model.to(device)


def stream_gguf_model(
    name_or_path: str, gguf_file: str, dtype: Any, device: torch.device, **kwargs: Any
) -> "PreTrainedModel":
    """Build the model on the meta device and fill it from the GGUF file tensor by tensor.

    RETURNS (transformers.PreTrainedModel): The model in eval mode, on `device`.
    RAISES (StreamingUnsupported): If the checkpoint needs transformers' full loader;
        nothing heavy has been loaded then.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    unknown = sorted(set(kwargs) - set(SUPPORTED_KWARGS))
    if unknown:
        raise StreamingUnsupported(f"options {unknown} are passed")
    if not isinstance(dtype, torch.dtype):
        raise StreamingUnsupported(f"dtype {dtype!r} is not a torch.dtype")
    hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    path = _resolve_file(name_or_path, gguf_file, hub_kwargs)
    architecture, metadata_keys, tensors, mapped = _read_gguf(path)
    if _has_packed_path(architecture):
        raise StreamingUnsupported(f"transformers loads '{architecture}' GGUFs with its packed path")
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class.__name__ not in STREAMABLE_PROCESSORS:
        raise StreamingUnsupported(f"{processor_class.__name__} needs several tensors at once")

    config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, **hub_kwargs)
    model_kwargs = {"dtype": dtype}
    if kwargs.get("attn_implementation"):
        model_kwargs["attn_implementation"] = kwargs["attn_implementation"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **model_kwargs)
    _check_model(model, dtype)
    processor = processor_class(config=_processor_config(config, metadata_keys, architecture))
    name_map = get_gguf_hf_weights_map(model, processor)
    slots = _slots(model)
    _check_coverage(slots, {name_map[t.name] for t in tensors if t.name in name_map})
    buffers = _fresh_buffers(model)  # built before any weight, so a failure costs nothing

    _stream_tensors(tensors, mapped, processor, name_map, slots, device)
    for (module, attr), value in buffers.items():
        module._buffers[attr] = value.to(device)
    model.tie_weights()
    left = [name for name, t in _named_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"GGUF loading left {len(left)} tensors on the meta device, e.g. {left[:3]}.")
    return model.eval()


def _stream_tensors(
    tensors: List["FileTensor"],
    mapped: np.memmap,
    processor: Any,
    name_map: Dict[str, str],
    slots: Dict[str, List[Tuple[torch.nn.Module, str]]],
    device: torch.device,
) -> None:
    """Dequantize, transform, cast and assign the file's tensors one at a time."""
    parsed: Dict[str, Dict[str, Any]] = {"tensors": {}}
    page = mmap.PAGESIZE
    for tensor in tensors:
        weights = _dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=parsed
        )
        del weights
        if parsed["tensors"]:  # a streamable processor never stashes tensors
            raise RuntimeError(f"{type(processor).__name__} kept tensors aside for {tensor.name}.")
        if result.name in name_map:
            _assign(slots[name_map[result.name]], name_map[result.name], result.weights, device)
        del result
        # The file's pages are read through the memory map and would stay in this
        # process's RSS until the end; they are page cache, so drop them as we go.
        start = tensor.offset // page * page
        _drop_pages(mapped, start, tensor.offset + tensor.n_bytes - start)


class FileTensor(NamedTuple):
    """One tensor of the GGUF file: its raw data is a view of the memory map."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray
    offset: int
    n_bytes: int


def _read_gguf(path: str) -> Tuple[str, Set[str], List[FileTensor], np.memmap]:
    """Read the GGUF file's architecture, metadata keys and tensor table with
    `gguf.GGUFReader`, and let go of the rest: the parsed metadata (a numpy view
    per vocabulary entry) takes more memory than a small model's weights.

    RETURNS (Tuple[str, Set[str], List[FileTensor], np.memmap]): The architecture,
        the metadata keys, the tensors and the file's memory map.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = GGUFReader(path)
    architecture = str(read_field(reader, "general.architecture")[0])
    tensors = [
        FileTensor(t.name, t.tensor_type, t.data, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]
    return architecture, set(reader.fields), tensors, reader.data


def _dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """`gguf.quants.dequantize`, a slice of rows at a time into one float32 array.

    gguf dequantizes small groups of rows and concatenates them, which holds the
    float32 result twice; quantization blocks never span rows, so this is the same.
    """
    from gguf.quants import dequantize

    if data.dtype != np.uint8 or data.ndim < 2:  # plain floats: a view or a cast
        return dequantize(data, qtype)
    rows = data.reshape(-1, data.shape[-1])
    first = dequantize(rows[:1], qtype)
    step = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, first.nbytes))
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=first.dtype)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], qtype)
    return out.reshape(*data.shape[:-1], first.shape[-1])


def _assign(
    owners: List[Tuple[torch.nn.Module, str]], name: str, weights: np.ndarray, device: torch.device
) -> None:
    """Put one converted tensor in place of its meta placeholder (and its tied copies)."""
    module, attr = owners[0]
    placeholder = getattr(module, attr)
    if tuple(weights.shape) != tuple(placeholder.shape):
        raise ValueError(
            f"GGUF tensor for '{name}' has shape {tuple(weights.shape)}, the model expects "
            f"{tuple(placeholder.shape)}."
        )
    array = weights if weights.flags.writeable else np.copy(weights)
    value = torch.from_numpy(array).to(
        device=device, dtype=placeholder.dtype, memory_format=torch.contiguous_format
    )
    if isinstance(placeholder, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=placeholder.requires_grad)
    for module, attr in owners:
        if isinstance(value, torch.nn.Parameter):
            module._parameters[attr] = value
        else:
            module._buffers[attr] = value


def _resolve_file(name_or_path: str, gguf_file: str, hub_kwargs: Dict[str, Any]) -> str:
    """RETURNS (str): The local path of the GGUF file (downloaded if it is on the hub)."""
    if os.path.isfile(gguf_file):
        return gguf_file
    local = os.path.join(name_or_path, hub_kwargs.get("subfolder") or "", gguf_file)
    if os.path.isfile(local):
        return local
    from transformers.utils import cached_file

    return cached_file(name_or_path, gguf_file, **hub_kwargs)


def _has_packed_path(architecture: str) -> bool:
    """RETURNS (bool): Whether transformers loads this architecture with its newer
    GGUF path (weights kept packed and read lazily), which is left alone."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return bool(is_gguf_arch_supported(architecture))


def _check_model(model: Any, dtype: torch.dtype) -> None:
    """RAISES (StreamingUnsupported): If from_pretrained would rename, fuse or
    upcast weights in ways that the per-tensor path does not reproduce."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # older transformers: no conversions at load time
        conversions: List[Any] = []
    else:
        try:
            conversions = get_model_conversion_mapping(model, add_legacy=False)
        except TypeError as err:
            raise StreamingUnsupported(f"cannot list the checkpoint conversions ({err})") from err
    if conversions:
        raise StreamingUnsupported(f"{type(model).__name__} has checkpoint conversions")
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    loose = getattr(model, "_keep_in_fp32_modules", None)
    if (strict and dtype in (torch.float16, torch.bfloat16)) or (loose and dtype == torch.float16):
        raise StreamingUnsupported(f"{type(model).__name__} keeps some modules in float32")


def _processor_config(config: Any, metadata_keys: Set[str], architecture: str) -> Dict[str, Any]:
    """The config dict that `load_gguf_checkpoint` hands the TensorProcessor: the
    values of the keys that the GGUF metadata sets. Read from `config` (which was
    built from them) rather than by parsing the metadata once more; a key the file
    lacks stays absent, as the Llama processor checks for that.
    """
    from transformers.integrations import GGUF_CONFIG_MAPPING

    renames = GGUF_CONFIG_MAPPING.get(config.model_type) or GGUF_CONFIG_MAPPING.get(architecture) or {}
    prefix = f"{architecture}."
    present = (renames.get(key[len(prefix):]) for key in metadata_keys if key.startswith(prefix))
    return {key: getattr(config, key) for key in present if isinstance(key, str) and hasattr(config, key)}


def _named_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def _slots(model: torch.nn.Module) -> Dict[str, List[Tuple[torch.nn.Module, str]]]:
    """RETURNS (Dict[str, List[Tuple[Module, str]]]): For each state-dict key, the
    (module, attribute) places holding that tensor: several when weights are tied."""
    places: Dict[int, List[Tuple[torch.nn.Module, str]]] = {}
    keys: Dict[str, int] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        persistent = {
            name: t for name, t in module._buffers.items() if name not in module._non_persistent_buffers_set
        }
        for attr, tensor in {**module._parameters, **persistent}.items():
            if tensor is None:
                continue
            group = places.setdefault(id(tensor), [])
            if (module, attr) not in group:
                group.append((module, attr))
            keys[prefix + attr] = id(tensor)
    return {key: places[ident] for key, ident in keys.items()}


def _check_coverage(slots: Dict[str, List[Tuple[torch.nn.Module, str]]], loaded: Set[str]) -> None:
    """RAISES (StreamingUnsupported): If a weight is not in the file (transformers would
    initialize it randomly), or tied weights are both in it (transformers compares them)."""
    groups: Dict[int, List[str]] = {}
    for key, owners in slots.items():
        groups.setdefault(id(owners), []).append(key)
    for keys in groups.values():
        found = [key for key in keys if key in loaded]
        if not found:
            raise StreamingUnsupported(f"the file has no tensor for {keys[0]}")
        if len(found) > 1:
            raise StreamingUnsupported(f"the file has separate tensors for the tied weights {found}")


def _fresh_buffers(model: torch.nn.Module) -> Dict[Tuple[torch.nn.Module, str], torch.Tensor]:
    """Recompute the non-persistent buffers (e.g. rotary `inv_freq`) that the meta
    device left empty, by building a new instance of their module on the CPU (its
    own init code computes them from the config), cast to the dtype the model gave
    them.

    RAISES (StreamingUnsupported): If such a module has weights or cannot be rebuilt
        from its config.
    """
    fresh: Dict[Tuple[torch.nn.Module, str], torch.Tensor] = {}
    for module_name, module in model.named_modules():
        names = [
            name
            for name, buf in module._buffers.items()
            if buf is not None and buf.is_meta and name in module._non_persistent_buffers_set
        ]
        if not names:
            continue
        if any(True for _ in module.parameters()) or not hasattr(module, "config"):
            raise StreamingUnsupported(f"cannot recompute the buffers of '{module_name}'")
        try:
            with torch.device("cpu"):
                rebuilt = type(module)(config=module.config)
        except Exception as err:  # any constructor failure means: let transformers do it
            raise StreamingUnsupported(f"cannot rebuild '{module_name}' ({err})") from err
        for name in names:
            value = rebuilt._buffers.get(name)
            if value is None or value.shape != module._buffers[name].shape:
                raise StreamingUnsupported(f"rebuilding '{module_name}' gave no buffer '{name}'")
            fresh[(module, name)] = value.to(module._buffers[name].dtype)
    return fresh


def _drop_pages(data: np.memmap, start: int, length: int) -> None:
    """Tell the kernel that this process is done with a range of the mapped file."""
    mapped = getattr(data, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mapped is None or advice is None or length <= 0:
        return
    try:
        mapped.madvise(advice, start, min(length, len(mapped) - start))
    except (OSError, ValueError):
        pass
