"""PEFT's own generic tuner tests (its TestPeftCustomModel, unmodified, from the installed peft release's sdist: see
tests/peft_tests.py) with SliceConfig cases, the way PEFT's repository adds a method: rows of (name, model id, config
class, config kwargs) run through every test that PEFT parametrizes over its TEST_CASES. Only that class runs, so CI
stays fast."""

import types

import pytest
import torch
from torch import nn

from slice_adapter import SliceConfig

from peft_tests import load_custom_models

try:
    upstream, fetch_error = load_custom_models(), None
except RuntimeError as error:
    fetch_error = str(error)
if fetch_error:  # no network and no cached copy: fail (never skip), saying what to run
    pytest.fail(fetch_error, pytrace=False)

CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"


class ScaledBlock(upstream.Block):
    """PEFT's test Block holding a raw parameter next to its children, like a Wan block's `scale_shift_table`."""

    def __init__(self):
        super().__init__(size=10)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 10))

    def forward(self, X):  # Block.forward casts to float32, which a float16 model cannot take
        return self.lin1(self.drop(self.relu(self.lin0(X)))) * self.scale


class MLPWithRawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ScaledBlock()
        self.out = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.out(self.block(X.to(self.out.weight.dtype))))


class Models(upstream.MockTransformerWrapper):
    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id != "MLPWithRawParameter":
            return super().from_pretrained(model_id, dtype=dtype)
        torch.manual_seed(0)
        return MLPWithRawParameter().to(dtype or torch.float32)


SLICE_TEST_CASES = [
    ("Vanilla MLP 1 Slice", "MLP", SliceConfig, {"fraction": 0.5, "slice_id": 1, "target_modules": ["lin0"]}),
    ("Vanilla MLP 2 Slice", "MLP", SliceConfig, {"fraction": 0.25, "slice_id": 2, "target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 3 Slice bias only", "MLP", SliceConfig,
     {"fraction": 0.5, "slice_id": 0, "target_modules": ["lin0.bias", "lin1.weight"]}),
    ("LayerNorm Slice", "MLP_LayerNorm", SliceConfig,
     {"fraction": 0.5, "slice_id": 0, "target_modules": ["layernorm0", "lin1"]}),
    ("Raw parameter Slice", "MLPWithRawParameter", SliceConfig,
     {"fraction": 0.5, "slice_id": 1, "target_modules": ["block.scale", "block.lin0"]}),
]


def _with_slice_cases(func):
    """A copy of one of PEFT's tests, parametrized over SLICE_TEST_CASES instead of PEFT's TEST_CASES."""
    copy = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__dict__.update(func.__dict__)
    copy.pytestmark = [pytest.mark.parametrize(CASE_ARGS, SLICE_TEST_CASES) if _is_case_mark(m) else m
                       for m in func.pytestmark]
    return copy


def _is_case_mark(mark) -> bool:
    return mark.name == "parametrize" and mark.args[0].replace(" ", "") == CASE_ARGS.replace(" ", "")


class TestSliceWithPeftGenericTests(upstream.TestPeftCustomModel):
    transformers_class = Models


# Every test PEFT runs over TEST_CASES; its tests written for one other method (GLoRA, LoRA, ...) are left out.
for _name, _func in list(vars(upstream.TestPeftCustomModel).items()):
    if _name.startswith("test_") and any(_is_case_mark(m) for m in getattr(_func, "pytestmark", [])):
        setattr(TestSliceWithPeftGenericTests, _name, _with_slice_cases(_func))
    elif _name.startswith("test_"):
        setattr(TestSliceWithPeftGenericTests, _name, None)  # not collected
