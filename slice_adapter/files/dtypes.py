"""Safetensors dtype codes ("BF16", "F32", ...) without torch: item sizes, labels, and conversion to and from float32.

The merge works on a checkpoint's bytes with numpy alone, so `scripts/merge_slices.py` starts in a fraction of a
second instead of the ~2 s an import of torch takes (more than copying a 1.3B checkpoint). Conversions round as
torch's `.to(dtype)` does, bit for bit (tests/test_merge_fast.py). numpy has no bf16 or fp8: fp8 uses ml_dtypes'
types (JAX's), imported only when an fp8 tensor is met, and bf16, the common case, is held as its 16 bits (uint16)
and converted by hand in a few integer operations, because importing ml_dtypes takes 0.7-1 s (measured), a third of
a whole 1.3B merge.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# each code's numpy dtype: bf16 as its bits; fp8 from ml_dtypes, see `numpy_dtype`
STORAGE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # ml_dtypes' names
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


def numpy_dtype(code: str):
    """The numpy dtype holding `code`'s values (uint16 for bf16)."""
    if code in FP8:
        import ml_dtypes

        return getattr(ml_dtypes, FP8[code])
    return STORAGE[code]


def stored(raw: np.ndarray, code: str) -> np.ndarray:
    """Bytes (a uint8 array) viewed as `code`'s numpy dtype, without a copy."""
    return raw.view(numpy_dtype(code))


def to_float(values: np.ndarray, code: str) -> np.ndarray:
    """`code`'s values as float32 (float64 for F64), exactly; a float32 or float64 input is returned as it is."""
    if code not in FLOATING:
        raise ValueError(f"{code} is not a floating dtype")
    if code in ("F32", "F64"):
        return values
    if code == "BF16":  # the upper half of a float32
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values.astype(np.float32)


def from_float(values: np.ndarray, code: str) -> np.ndarray:
    """float32/float64 values rounded once to `code` (to nearest even), as torch's `.to(dtype)` rounds them."""
    if code not in FLOATING:
        raise ValueError(f"{code} is not a floating dtype")
    if code == "F64":
        return values.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):  # overflow gives infinity, as in torch
        # a float64 goes through float32 first, as torch's conversions of float64 do (a direct cast rounds once where
        # torch rounds twice)
        values = values.astype(np.float32, copy=False)
        if code == "BF16":
            return _bf16_bits(values)
        if code == "F8_E4M3":  # no infinity: torch saturates at +-448 where ml_dtypes would give NaN
            values = np.clip(values, -448.0, 448.0)
        return values.astype(numpy_dtype(code), copy=False)


def cast(values: np.ndarray, code: str, out_code: str) -> np.ndarray:
    """`code`'s values as `out_code`, rounded once (as torch's `.to(dtype)`)."""
    return from_float(to_float(values, code), out_code)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits: add 0x7fff, plus 1 when the kept half is odd, and keep the upper half (round to
    nearest, ties to even; overflow carries into the exponent: infinity). A NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(values).view(np.uint32)
    out = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out
