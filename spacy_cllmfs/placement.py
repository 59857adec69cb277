"""Where the base model's weights go: one device, or a `device_map` over several.

A `device_map` (passed on to transformers' `from_pretrained`, which places the
layers with accelerate) spreads a model that is too big for one GPU over the
GPUs of a machine, and the CPU after them. It is checked when the config is
built, before any weights are loaded.
"""
import importlib.util
from typing import Any, Dict, Optional, Tuple, Union

import torch

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = Union[str, Dict[str, Union[int, str]]]
_FIX = (
    'Fix: set `[components.cllmfs_ner.model] device_map` to "auto" (spread over all GPUs, then the '
    'CPU), "balanced", "balanced_low_0", "sequential", or a table of module name -> device such '
    'as {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1} (a device is a GPU index, '
    '"cuda:N" or "cpu"), or to null for one device.'
)


def resolve_placement(device: str, device_map: Optional[Any]) -> Tuple[Optional[DeviceMap], torch.device]:
    """Check the config's `device` and `device_map` together.

    device (str): The config's `device` ("auto", "cpu", "cuda:N", ...).
    device_map (Optional[Any]): The config's `device_map`, or None.
    RETURNS (Tuple[Optional[DeviceMap], torch.device]): The checked device map (None
        without one), and the device that inputs go to (where the embeddings are
        expected; the model's actual input device is taken once it is loaded).
    RAISES (ValueError): If the map is malformed, names a device that is not there,
        comes with a concrete `device`, or accelerate is missing.
    """
    from .models import resolve_device

    if device_map is None:
        return None, resolve_device(device)
    if device != "auto":
        raise ValueError(
            f'`device_map` and `device = "{device}"` both place the model. Fix: keep `device = "auto"` '
            "when you set a device_map, or set `device_map = null` to put the whole model on "
            f'"{device}".'
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            hint = ""
            if _looks_like_device(device_map):
                hint = f' To put the whole model on one device, use `device = "{device_map}"` instead.'
            raise ValueError(f"Unknown device_map {device_map!r}.{hint} {_FIX}")
        checked: DeviceMap = device_map
        first = resolve_device("auto")
    elif isinstance(device_map, dict):
        if not device_map:
            raise ValueError(f"The device_map is empty. {_FIX}")
        placed: Dict[str, Union[int, str]] = {}
        for module, target in device_map.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map key {module!r} is not a module name. {_FIX}")
            placed[module] = _check_target(module, target, resolve_device)
        checked = placed
        first_target = placed.get("", next(iter(placed.values())))
        first = resolve_device(f"cuda:{first_target}" if isinstance(first_target, int) else first_target)
    else:
        raise ValueError(f"device_map must be a string or a table, got {type(device_map).__name__}. {_FIX}")
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("A device_map needs the accelerate package. Fix: pip install accelerate")
    return checked, first


def _check_target(module: str, target: Any, resolve_device: Any) -> Union[int, str]:
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise ValueError(f"device_map[{module!r}] = {target!r} is not a device. {_FIX}")
    if isinstance(target, int) and target < 0:
        raise ValueError(f"device_map[{module!r}] = {target} is not a GPU index. {_FIX}")
    if target == "disk":
        raise ValueError(f'device_map[{module!r}] = "disk": offloading to disk is not supported. {_FIX}')
    try:
        resolve_device(f"cuda:{target}" if isinstance(target, int) else target)
    except ValueError as err:
        problem = str(err).split(" Fix:")[0]
        raise ValueError(f"device_map[{module!r}]: {problem} {_FIX}") from None
    return target


def _looks_like_device(value: str) -> bool:
    return value.split(":")[0] in ("cpu", "cuda", "mps")
