"""LoRA adapter weights in memory, on disk (peft's folder format) and as bytes."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import srsly
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")


class AdapterError(ValueError):
    """An adapter folder or blob that cannot be read."""


@dataclass
class AdapterState:
    """A LoRA adapter detached from any model: its peft config and its weights.

    config (Dict[str, Any]): The peft `LoraConfig` as a JSON-serializable dict.
    weights (Dict[str, torch.Tensor]): The adapter's state dict, in peft's key format
        (as returned by `peft.get_peft_model_state_dict`), on the CPU.
    """

    config: Dict[str, Any]
    weights: Dict[str, torch.Tensor]

    def to_disk(self, path: Union[str, Path]) -> None:
        """Write the adapter as a peft folder (`PeftModel.from_pretrained` reads it)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        srsly.write_json(path / CONFIG_FILE, self.config)
        save_file(_contiguous(self.weights), str(path / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_disk(cls, path: Union[str, Path]) -> "AdapterState":
        """Read a peft adapter folder written by `to_disk` or `PeftModel.save_pretrained`.

        RAISES (AdapterError): If the folder is missing, incomplete or corrupt.
        """
        path = Path(path)
        fix = (
            "Fix: point `adapter` at a folder written by `nlp.to_disk` (its "
            "`cllmfs_ner/adapter` subfolder) or by peft's `save_pretrained`, or set it to null."
        )
        if not path.is_dir():
            raise AdapterError(f"LoRA adapter folder '{path}' does not exist. {fix}")
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not weights_path.exists() and any((path / name).exists() for name in PICKLE_FILES):
            raise AdapterError(
                f"LoRA adapter folder '{path}' holds pickled weights ({', '.join(PICKLE_FILES)}), which are "
                f"never loaded: unpickling can run arbitrary code. Fix: where you trust the file, save it "
                f"again with peft's `save_pretrained(folder, safe_serialization=True)` to get '{WEIGHTS_FILE}'."
            )
        for required in (config_path, weights_path):
            if not required.exists():
                raise AdapterError(
                    f"LoRA adapter folder '{path}' has no '{required.name}' (a partial copy?). {fix}"
                )
        try:
            config = srsly.read_json(config_path)
        except ValueError as err:
            raise AdapterError(f"'{config_path}' is not valid JSON ({err}). {fix}") from err
        try:
            weights = load_file(str(weights_path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise AdapterError(f"'{weights_path}' cannot be read ({err}). {fix}") from err
        return cls.checked(config, weights, source=str(path))

    def to_bytes(self) -> bytes:
        """Serialize the adapter to a bytestring."""
        return srsly.msgpack_dumps(
            {"config": json.dumps(self.config), "weights": save(_contiguous(self.weights))}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "AdapterState":
        """Load an adapter serialized by `to_bytes`."""
        msg = srsly.msgpack_loads(data)
        weights = load_safetensors_bytes(msg["weights"])
        return cls.checked(json.loads(msg["config"]), weights, source="bytes")

    @classmethod
    def checked(cls, config: Any, weights: Dict[str, torch.Tensor], source: str) -> "AdapterState":
        """Build an AdapterState after checking that it is a LoRA adapter."""
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            raise AdapterError(
                f"The adapter in {source} is not a LoRA adapter (peft_type="
                f"{config.get('peft_type') if isinstance(config, dict) else None!r}). "
                "Fix: use an adapter trained with spacy-cllmfs or peft's LoraConfig."
            )
        if not weights or not any("lora_" in key for key in weights):
            raise AdapterError(
                f"The adapter in {source} holds no LoRA weights. Fix: re-save it from a "
                "trained pipeline with `nlp.to_disk`."
            )
        _check_shapes(config, weights, source)
        return cls(config=config, weights=weights)


def _check_shapes(config: Dict[str, Any], weights: Dict[str, torch.Tensor], source: str) -> None:
    """Check the rank in the config against the LoRA matrices: A is (r, in), B is (out, r)."""
    fix = "Fix: re-save the adapter from the trained pipeline with `nlp.to_disk`."
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"The adapter config in {source} has r = {rank!r}, not a positive integer. {fix}")
    if config.get("rank_pattern"):
        return  # per-module ranks: peft checks the shapes against the model
    for key, tensor in weights.items():
        if "lora_A" not in key and "lora_B" not in key:
            continue
        if not tensor.is_floating_point():
            raise AdapterError(f"The adapter weight '{key}' in {source} is {tensor.dtype}, not floating point. {fix}")
        if tensor.dim() != 2 or tensor.shape[0 if "lora_A" in key else 1] != rank:
            raise AdapterError(
                f"The adapter weight '{key}' in {source} has shape {tuple(tensor.shape)}, which does not fit "
                f"its rank r = {rank}: the folder is corrupt or mixes two adapters. {fix}"
            )


def _contiguous(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in weights.items()}
