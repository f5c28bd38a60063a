"""What importing slice_adapter costs and when the SLICE type reaches PEFT, each case in a fresh interpreter.

The checkpoint tools must start without PEFT or diffusers; whatever the import order, PEFT must know the SLICE type
once both are imported, and diffusers models must have `load_adapter` once diffusers is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
    "slice = [k for k in PEFT_TYPE_TO_CONFIG_MAPPING if getattr(k, 'value', k) == 'SLICE']\n"
    "assert slice and PEFT_TYPE_TO_TUNER_MAPPING[slice[0]].__name__ == 'SliceModel', 'SLICE is not registered'\n"
)

CASES = {
    # the command-line tools' imports: no PEFT, no diffusers
    "tools": (
        "import sys\n"
        "import slice_adapter, slice_adapter.merge, slice_adapter.export, slice_adapter.report, slice_adapter.deltas\n"
        "loaded = sorted(m for m in ('peft', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not loaded, f'the checkpoint tools imported {loaded}'\n"
    ),
    # a bare import, then PEFT on its own: a saved slice folder loads through PEFT's own API
    "bare then peft": (
        "import sys, tempfile\n"
        "import slice_adapter\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import PeftConfig\n" + REGISTERED +
        "folder = tempfile.mkdtemp()\n"
        "open(folder + '/adapter_config.json', 'w').write('{\"peft_type\": \"SLICE\", \"fraction\": 0.01, "
        "\"slice_id\": 3}')\n"
        "cfg = PeftConfig.from_pretrained(folder)\n"
        "assert type(cfg).__name__ == 'SliceConfig' and cfg.slice_id == 3, cfg\n"
    ),
    "peft first": "import peft\nimport slice_adapter\n" + REGISTERED,
    # each module that imports PEFT, imported first (PEFT's import hook fires while it is still importing)
    "registry first": "import slice_adapter.registry\n" + REGISTERED,
    "config first": "from slice_adapter.config import SliceConfig\n" + REGISTERED,
    "layer first": "import slice_adapter.layer\n" + REGISTERED,
    "model first": "import slice_adapter.model\n" + REGISTERED,
    "public name": "from slice_adapter import load_adapter, SliceConfig\n" + REGISTERED,
    "diffusers later": (
        "import slice_adapter\nimport diffusers\n"
        "from diffusers import ModelMixin\n"
        "assert hasattr(ModelMixin, 'load_adapter'), 'diffusers models have no load_adapter'\n" + REGISTERED
    ),
}


def test_import_orders_in_fresh_interpreters():
    # All cases at once: each is a separate interpreter, and most of their time is importing torch and PEFT.
    procs = {name: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, code in CASES.items()}
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
    assert not failures, failures


def test_unknown_attribute_is_an_attribute_error():
    import slice_adapter

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        slice_adapter.no_such_name
    assert {"SliceConfig", "load_adapter", "merge_adapters"} <= set(dir(slice_adapter))
