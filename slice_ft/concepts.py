"""The trainer's side of stacking concepts: prompt flags, the base's concept ledger, `--ffid auto`, and the concept
record a run writes into its slice folder (`slice_adapter.ledger`).

Everything here reads flags and checkpoint headers only, so its errors come before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Optional

from slice_adapter.files import ledger

from .choices import TINY

PROMPT_FILE_SUFFIXES = (".txt", ".prompts")


def slice_id_arg(value) -> int | str:
    """`--ffid`: a slice id (int >= 0) or `auto`."""
    if isinstance(value, int) or str(value).strip().lower() != "auto":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer slice id or 'auto', got {value!r}") from None
    return "auto"


def read_prompts(values, flag: str) -> Optional[list[str]]:
    """A prompt flag's prompts: one existing text file (one prompt per line, blank lines skipped) or inline prompts."""
    if not values:
        return None
    values = [str(v) for v in values]
    if len(values) == 1 and (os.path.isfile(values[0]) or values[0].endswith(PROMPT_FILE_SUFFIXES)):
        path = values[0]
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path!r}: no such prompts file; pass a text file with one prompt per line, or "
                             "the prompts themselves in quotes")
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise ValueError(f"{flag} {path!r} holds no prompt (empty or blank lines only); write one prompt per line")
        return prompts
    prompts = [v.strip() for v in values]
    if not all(prompts):
        raise ValueError(f"{flag} got an empty prompt ({values!r}); drop it or write the prompt")
    return prompts


def base_checkpoint(args) -> Optional[Path]:
    """The transformer weights on disk a run starts from (a file, or a diffusers transformer folder); None for the
    tiny random model."""
    if args.transformer_file:
        return Path(args.transformer_file)
    if args.pretrained_model_name_or_path == TINY:
        return None
    from .components import expert_subfolder

    root = Path(args.pretrained_model_name_or_path)
    sub = root / expert_subfolder(args.expert)
    return sub if sub.is_dir() else root


def base_ledger(args) -> list[dict]:
    """The ledger records of the base the run trains on ([] for the tiny model or a base without one)."""
    base = base_checkpoint(args)
    if base is None or not base.exists():  # a missing file is reported by the model loader
        return []
    return ledger.read_ledger(base)


def preservation_requested(args) -> bool:
    return bool(args.preserve_prompts or args.preserve_dataset or args.preserve_previous)


def check_concept_args(args) -> None:
    """Parse and check the concept/preservation flags, read the base's ledger and resolve `--ffid auto`.

    Sets `args.concept_prompt_list`, `args.preserve_prompt_list` (every prompt to generate preservation clips for),
    `args.base_ledger`, `args.slice_tile_order` (the order of the slices merged into the base, so ids stay disjoint
    from theirs) and `args.slice_id_auto`; raises a ValueError naming the flag, the value and the fix.
    """
    args.concept_prompt_list = read_prompts(args.concept_prompts, "--concept_prompts")
    prompts = read_prompts(args.preserve_prompts, "--preserve_prompts") or []
    requested = preservation_requested(args)
    if requested and args.preserve_samples < 1:
        raise ValueError(f"--preserve_samples must be >= 1 with preservation on, got {args.preserve_samples}; e.g. "
                         "32 (or drop --preserve_prompts/--preserve_previous/--preserve_dataset)")
    if args.preserve_batch_size is not None and args.preserve_batch_size < 1:
        raise ValueError(f"--preserve_batch_size must be >= 1, got {args.preserve_batch_size}; e.g. "
                         "--train_batch_size's value")
    if requested and not args.preserve_weight > 0:
        raise ValueError(f"--preserve_weight must be > 0 with preservation on, got {args.preserve_weight}; e.g. 1.0")
    if args.preserve_num_inference_steps < 1:
        raise ValueError(f"--preserve_num_inference_steps must be >= 1, got {args.preserve_num_inference_steps}; "
                         "e.g. 20")

    needs_ledger = args.preserve_previous or args.slice_id == "auto"
    try:
        args.base_ledger = base_ledger(args)
    except ValueError:
        if needs_ledger:
            raise
        args.base_ledger = []  # only the tile order was asked: the model loader reports an unreadable base itself
    args.slice_tile_order = ledger.ledger_tile_order(args.base_ledger)
    if args.preserve_previous:
        previous = ledger.ledger_prompts(args.base_ledger)
        if not previous:
            base = base_checkpoint(args)
            what = ("the tiny random model" if base is None else repr(str(base)))
            why = ("has no concept ledger (no slice-ft slice is recorded as merged into it)" if not args.base_ledger
                   else f"records {len(args.base_ledger)} merged slice(s) but no concept prompts (merged before the "
                        "ledger existed)")
            raise ValueError(f"--preserve_previous: the base {what} {why}, so there is nothing to preserve; name the "
                             "earlier concepts with --preserve_prompts FILE_OR_PROMPTS (or --preserve_dataset with "
                             "their clips)")
        prompts = list(dict.fromkeys(previous + prompts))
    args.preserve_prompt_list = prompts or None

    args.slice_id_auto = args.slice_id == "auto"
    if args.slice_id_auto:
        base = base_checkpoint(args)
        if base is None or not base.exists() or not args.base_ledger:
            args.slice_id = 0
        else:
            args.slice_id, _ = ledger.free_slice_id(base, args.slice_fraction, args.slice_seed,
                                                    tile_order=args.slice_tile_order)


def describe_auto_id(args) -> Optional[str]:
    """The log line of a resolved `--ffid auto` (None when the id was given)."""
    if not getattr(args, "slice_id_auto", False):
        return None
    taken = [f"{r.get('fraction')}/{r.get('slice_id')}" for r in args.base_ledger]
    return (f"--ffid auto: slice {args.slice_id} at fraction {args.slice_fraction} (seed {args.slice_seed}) overlaps "
            f"none of the {len(taken)} slice(s) merged into the base" + (f" (fraction/id {', '.join(taken)})" if taken
                                                                         else ""))


def training_captions(dataset, limit: int = ledger.MAX_CAPTION_PROMPTS, seed: int = 0,
                      max_rows: int = 100_000) -> list[str]:
    """A deterministic sample of up to `limit` distinct captions of a (normalized) dataset, read without decoding
    media (at most `max_rows` rows)."""
    captions: dict[str, None] = {}
    for i, row in enumerate(dataset.select_columns(["caption"])):
        if i >= max_rows:
            break
        if row.get("caption"):
            captions.setdefault(row["caption"], None)
    ordered = sorted(captions)
    if len(ordered) <= limit:
        return ordered
    return sorted(random.Random(seed).sample(ordered, limit))


def concept_of_run(args, dataset) -> dict:
    """The concept record this run writes into its slice folder."""
    if args.concept_prompt_list:
        return ledger.concept_record(args.concept_prompt_list, "concept_prompts")
    captions = training_captions(dataset, seed=args.seed)
    if not captions:
        raise ValueError("the training data has no caption to record as the slice's concept; pass --concept_prompts")
    return ledger.concept_record(captions, "training_captions")
