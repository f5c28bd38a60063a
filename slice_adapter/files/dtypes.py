"""Safetensors dtype codes ("BF16", "F32", ...) without torch: item sizes, labels, and conversion to and from float32.

The merge works on a checkpoint's bytes with numpy alone, so `scripts/merge_slices.py` starts in a fraction of a
second instead of the ~2 s an import of torch takes (more than copying a 1.3B checkpoint). bf16 and fp8 are
ml_dtypes' numpy types (JAX's); conversions round as torch's `.to(dtype)` does, bit for bit (tests/test_merge_fast.py).
"""

from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# each code's numpy dtype
STORAGE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# torch's names (`torch.<name>`), which are also the labels of the codes without a short one
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool"}
_CODE_OF_TORCH_NAME = {name: code for code, name in TORCH_NAMES.items()}
LABELS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
ALIASES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
           "fp32": "F32", "float32": "F32", "float": "F32"}


def parse_code(dtype) -> Optional[str]:
    """None, a torch dtype, or one of bf16/fp16/fp32 (and their long names) -> safetensors code or None."""
    if dtype is None:
        return None
    key = str(dtype).lower().removeprefix("torch.")
    if type(dtype).__name__ == "dtype" and key in _CODE_OF_TORCH_NAME:  # a torch (or numpy) dtype
        return _CODE_OF_TORCH_NAME[key]
    if key not in ALIASES:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32 (or None to keep the base's own), got {dtype!r}")
    return ALIASES[key]


def code_of(dtype) -> str:
    """A safetensors code, or a torch dtype -> its safetensors code."""
    if isinstance(dtype, str) and dtype in ITEMSIZE:
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _CODE_OF_TORCH_NAME:
        raise ValueError(f"dtype {dtype!r} cannot be stored in safetensors by this tool (supported: "
                         f"{', '.join(TORCH_NAMES.values())})")
    return _CODE_OF_TORCH_NAME[name]


def label(code: str) -> str:
    """bf16 / fp16 / fp32, else torch's name (float64, float8_e4m3fn, int64, ...)."""
    return LABELS.get(code, TORCH_NAMES[code])


def torch_dtype(code: str):
    import torch

    return getattr(torch, TORCH_NAMES[code])


def stored(raw: np.ndarray, code: str) -> np.ndarray:
    """Bytes (a uint8 array) viewed as `code`'s numpy dtype, without a copy."""
    return raw.view(STORAGE[code])


def to_float(values: np.ndarray, code: str) -> np.ndarray:
    """`code`'s values as float32 (float64 for F64), exactly; a float32 or float64 input is returned as it is."""
    if code not in FLOATING:
        raise ValueError(f"{code} is not a floating dtype")
    return values if code in ("F32", "F64") else values.astype(np.float32)


_E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def from_float(values: np.ndarray, code: str) -> np.ndarray:
    """float32/float64 values rounded once to `code` (to nearest even), as torch's `.to(dtype)` rounds them."""
    if code not in FLOATING:
        raise ValueError(f"{code} is not a floating dtype")
    if code == "F64":
        return values.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):  # overflow gives infinity, as in torch
        # a float64 goes through float32 first (as torch's conversions of float64 do): a direct cast would round once
        # where torch rounds twice
        values = values.astype(np.float32, copy=False)
        if code == "F8_E4M3":  # no infinity: torch saturates at +-448 where ml_dtypes would give NaN
            values = np.clip(values, -_E4M3_MAX, _E4M3_MAX)
        return values.astype(STORAGE[code], copy=False)
