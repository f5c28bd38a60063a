"""Streaming merge of slices into a full checkpoint: OUT = BASE + sum of the slices' deltas, one tensor at a time.

BASE is a single safetensors file (original Wan / ComfyUI keys with or without `model.diffusion_model.`, or diffusers
keys) or a diffusers transformer folder (sharded with its index, or one file). OUT is always one safetensors file with
BASE's key names: for a folder that means diffusers keys in one file (rename it `diffusion_pytorch_model.safetensors`
next to the folder's `config.json` to load it with `from_pretrained`). OUT keeps BASE's header metadata and adds
`slice_ft.merged_slices`: every merged slice's config, layout fingerprint and concept (the ledger, see `ledger`),
appended to BASE's own list when BASE is itself a merge (stacking).

The one merge path of the project: `scripts/merge_slices.py` and the trainer's `--save_merged` both end here. It
works on the files' bytes with numpy (`dtypes` rounds as torch does), without importing torch, so the command starts
in a fraction of a second.

Speed and memory: once every check has passed and OUT's header is written, a background thread copies every tensor
that keeps its dtype byte for byte, in a few large copies inside the kernel (`os.copy_file_range`; through a fixed
buffer where that is not possible), while the caller's thread works out the touched tensors' new bytes from BASE: a
tensor whose selected weights are sparse is patched (only the byte ranges holding them are read, updated and written
back), a small or densely touched one is read whole into a buffer reused for every tensor. Either way only the
selected weights are gathered, updated in float32 and rounded once to the output dtype. The copying thread writes
these new bytes over its copy once it has passed them (a queue of a few MB between the threads). Peak memory is about
the largest tensor (twice that when casting) plus that queue, never the checkpoint. The copying thread also starts
the disk's writeback of each finished part as it goes, so the one fsync at the end, before the rename, waits for little.
"""

from __future__ import annotations

from contextlib import ExitStack
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import dtypes
from .safetensors_stream import (Checkpoint, StreamWriter, TensorEntry, TensorReader, open_checkpoint, pread_into,
                                read_stored, refuse_overwriting_inputs, tensor_bytes)
from .deltas import SliceDeltas, check_layout_matches, iter_touched, planned_overlap, prior_plan, read_slice
from .wan2gp import check_wan2gp_filename, infer_wan2gp_architecture, wan2gp_definition, write_wan2gp_definition
from .adapter_folder import slice_files
from .keys import detect_key_format, diffusers_to_wan, wan_to_diffusers
from .ledger import LEDGER_KEY, encode_records, metadata_records, slice_record
from .report import format_bytes
from ..selection import overlap_count

PROVENANCE_KEY = LEDGER_KEY


@dataclass
class MergeResult:
    """What a merge wrote."""

    output: Path
    key_format: str
    key_prefix: str
    dtype: str  # the output's dominant floating dtype (bf16/fp16/fp32)
    tensors: int
    touched_tensors: int
    changed_weights: int
    slices: list[dict] = field(default_factory=list)
    wan2gp_json: Optional[Path] = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class _Names:
    """BASE key <-> diffusers parameter name."""

    def __init__(self, ckpt: Checkpoint):
        try:
            self.fmt, self.prefix = detect_key_format(ckpt.entries)
        except ValueError as err:
            raise ValueError(f"BASE {str(ckpt.source)!r}: {err}") from None
        to_d = (lambda n: n) if self.fmt == "diffusers" else wan_to_diffusers
        self.to_diffusers = {k: to_d(k[len(self.prefix):]) for k in ckpt.entries}
        self.to_base = {d: k for k, d in self.to_diffusers.items()}

    def show(self, diffusers_name: str) -> str:
        """A diffusers name as BASE would spell it."""
        if diffusers_name in self.to_base:
            return self.to_base[diffusers_name]
        try:
            return self.prefix + (diffusers_name if self.fmt == "diffusers" else diffusers_to_wan(diffusers_name))
        except ValueError:
            return self.prefix + diffusers_name


def _as_list(slices) -> list:
    if isinstance(slices, (str, Path)):
        return [slices]
    return list(slices or [])


def _check_output(output: Path, ckpt: Checkpoint, overwrite: bool) -> None:
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file path, got {str(output)!r}")
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory: pass a file path ending in .safetensors")
    resolved = output.resolve()
    if resolved == ckpt.source.resolve() or resolved in {f.resolve() for f in ckpt.files}:
        raise ValueError(f"output {str(output)!r} is BASE itself: write the merge to a new file (BASE is read while "
                         "OUT is written, and must stay intact)")
    if output.exists() and not overwrite:
        raise ValueError(f"output {str(output)!r} already exists: pass overwrite=True (--overwrite) or another path")


def _prior_records(ckpt: Checkpoint) -> list[dict]:
    return metadata_records(ckpt.metadata)


def _check_overlaps(slices: list[SliceDeltas], prior: list[dict], allow_overlap: bool) -> None:
    if allow_overlap:
        return
    for i, a in enumerate(slices):
        for b in slices[i + 1:]:
            shared = planned_overlap(a, b)
            if shared:
                raise ValueError(f"slices {a.label} and {b.label} share {shared} weights: both deltas would be added "
                                 "to them. Merge disjoint slices (same fraction and seed, different slice_id), or pass "
                                 "allow_overlap=True (--allow-overlap) to add both")
        for record in prior:
            plan = prior_plan(a, record)
            shared = overlap_count(plan, a.plan) if plan is not None else 0
            if shared:
                raise ValueError(f"slice {a.label} shares {shared} weights with the slice (fraction "
                                 f"{record['fraction']}, slice_id {record['slice_id']}, seed {record.get('seed', 0)}) "
                                 "already merged into BASE (see its slice_ft.merged_slices metadata): merging it would "
                                 "change that slice's weights again. Use a disjoint slice, or pass allow_overlap=True "
                                 "(--allow-overlap)")


def _free_space(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def merge_slices(
    base,
    slices: Union[str, Path, Sequence],
    output,
    *,
    dtype=None,
    overwrite: bool = False,
    allow_overlap: bool = False,
    wan2gp_json=None,
    wan2gp_architecture: Optional[str] = None,
    wan2gp_phase: Optional[str] = None,
    wan2gp_name: Optional[str] = None,
    wan2gp_description: Optional[str] = None,
    wan2gp_url: Optional[str] = None,
    progress: bool = True,
) -> MergeResult:
    """Merge slice folders into BASE, streaming, and write OUT (plus, optionally, a Wan2GP finetune definition).

    Touched weights become round(BASE + sum of deltas) computed in float32 and rounded once to the output dtype
    (`dtype` None: each tensor keeps BASE's dtype; bf16/fp16/fp32: every floating tensor is cast to it). Untouched
    tensors are copied bit for bit when their dtype is unchanged. Every check runs before anything is written:
    unreadable or truncated inputs, a slice whose recorded layout does not match BASE, overlapping slices (also with
    slices BASE's provenance says are already merged) unless `allow_overlap`, OUT equal to BASE, an existing OUT
    without `overwrite`, a Wan2GP definition that cannot be made. OUT is written to a temp file renamed into place,
    so a failure leaves any earlier OUT intact.
    """
    paths = _as_list(slices)
    if not paths:
        raise ValueError("no slice given: pass at least one slice adapter folder (--slice DIR)")
    out_dtype = dtypes.parse_code(dtype)
    output = Path(output)
    ckpt = open_checkpoint(base)
    _check_output(output, ckpt, overwrite)
    names = _Names(ckpt)
    shapes = {names.to_diffusers[k]: e.shape for k, e in ckpt.entries.items()}
    loaded = [read_slice(p) for p in paths]
    inputs = [f for s in loaded for f in slice_files(s.path)]
    refuse_overwriting_inputs(output, inputs)
    for s in loaded:
        check_layout_matches(s, shapes, what=f"BASE {str(ckpt.source)!r}", display_name=names.show)
    prior = _prior_records(ckpt)
    _check_overlaps(loaded, prior, allow_overlap)

    touched = iter_touched(loaded)
    for dname in touched:
        entry = ckpt.entries[names.to_base[dname]]
        if not entry.is_floating_point:
            raise ValueError(f"BASE tensor {entry.name!r} is {entry.dtype}, not floating point: a slice cannot "
                             "change it")

    def target_dtype(e):
        return out_dtype if out_dtype is not None and e.is_floating_point else e.dtype

    plan = [(k, target_dtype(e), e.shape) for k, e in ckpt.entries.items()]  # dtypes as safetensors codes
    float_bytes: dict = {}
    for (_, dt, shape), e in zip(plan, ckpt.entries.values()):
        if dt in dtypes.FLOATING:
            float_bytes[dt] = float_bytes.get(dt, 0) + e.numel * dtypes.ITEMSIZE[dt]
    out_label = dtypes.label(max(float_bytes, key=float_bytes.get)) if float_bytes else "none"

    wan2gp_args = None
    if wan2gp_json is not None:
        wan2gp_json = Path(wan2gp_json)
        if wan2gp_json.exists() and not overwrite:
            raise ValueError(f"{str(wan2gp_json)!r} already exists: pass overwrite=True (--overwrite) or another path")
        refuse_overwriting_inputs(wan2gp_json, inputs + [ckpt.source, *ckpt.files, output], "the Wan2GP definition")
        if wan2gp_json.suffix != ".json":
            raise ValueError(f"the Wan2GP definition path must end in .json, got {str(wan2gp_json)!r}")
        architecture = infer_wan2gp_architecture(shapes, wan2gp_architecture)
        check_wan2gp_filename(wan2gp_url or output, out_label)
        description = wan2gp_description or (
            "Slice fine-tune merged by slice-ft: " + ", ".join(
                f"fraction {s.config.fraction} slice {s.config.slice_id} (seed {s.config.seed})" for s in loaded))
        wan2gp_args = dict(architecture=architecture, phase=wan2gp_phase, name=wan2gp_name or output.stem,
                           description=description, url=wan2gp_url)
        wan2gp_definition(output, **wan2gp_args, file_dtype=out_label)  # validates phase and name before writing

    records = prior + [slice_record(s) for s in loaded]
    metadata = dict(ckpt.metadata)
    metadata.setdefault("format", "pt")
    metadata[PROVENANCE_KEY] = encode_records(records)

    _check_space(output, plan)
    with StreamWriter(output, plan, metadata) as writer:
        changed = _stream(ckpt, names, plan, touched, loaded, writer, progress, disjoint=not allow_overlap)
        writer.commit()

    result = MergeResult(output=output, key_format=names.fmt, key_prefix=names.prefix, dtype=out_label,
                         tensors=len(plan), touched_tensors=len(touched), changed_weights=changed,
                         slices=[s.provenance() for s in loaded])
    if wan2gp_args is not None:
        write_wan2gp_definition(wan2gp_json, output, **wan2gp_args, overwrite=overwrite, file_dtype=out_label)
        result.wan2gp_json = wan2gp_json
    return result


# A touched tensor whose selected weights are sparse is copied in the kernel with the rest, then patched: its selected
# weights are read in byte ranges (those closer than PATCH_GAP_BYTES merged into one), updated and written back in
# place. Each range costs a read and a write call, counted as PATCH_RANGE_COST bytes of copying through user space;
# the patch is used when that cost is below the tensor's size, for tensors of PATCH_MIN_BYTES or more.
PATCH_GAP_BYTES = 4096
PATCH_RANGE_COST = 4096
PATCH_MIN_BYTES = 1 << 20


@dataclass
class _Patch:
    """The byte ranges of a tensor to patch, in tiles of `width` weights: [starts, starts + lengths), packed one after
    the other from tile `packed`."""

    width: int
    starts: np.ndarray
    lengths: np.ndarray
    packed: np.ndarray
    total: int  # weights in all ranges
    tiles: list  # each slice's tile indices (numpy int64, sorted)

    def remap(self, tiles: np.ndarray) -> np.ndarray:
        """A slice's tiles -> flat indices of their weights in the packed ranges, in value order."""
        r = np.searchsorted(self.starts, tiles, side="right") - 1
        first = (tiles - self.starts[r] + self.packed[r]) * self.width
        if self.width == 1:
            return first
        return (first[:, None] + np.arange(self.width, dtype=np.int64)[None, :]).reshape(-1)


def _patch_plan(entry: TensorEntry, name: str, slices: list[SliceDeltas]) -> Optional[_Patch]:
    """How to patch `entry` in place, or None where reading it whole is cheaper. Works on the slices' tiles (runs of
    `tile_width` weights: the values' order is the tiles' order), not on each weight."""
    if entry.nbytes < PATCH_MIN_BYTES or not entry.numel:
        return None
    itemsize = entry.nbytes // entry.numel
    tiles = [s.plan.tiles[name] for s in slices]
    width = slices[0].plan.layouts[name].tile_width
    if any(s.plan.layouts[name].tile_width != width for s in slices):
        return None
    flat = tiles[0]
    if len(tiles) > 1:
        flat = np.sort(np.concatenate(tiles))
        flat = flat[np.concatenate([[True], np.diff(flat) != 0])]
    if not len(flat):
        return None
    gap = PATCH_GAP_BYTES // (itemsize * width)
    cut = np.flatnonzero(np.diff(flat) > gap + 1)
    starts = np.concatenate([flat[:1], flat[cut + 1]])
    lengths = np.concatenate([flat[cut], flat[-1:]]) + 1 - starts
    total = int(lengths.sum()) * width
    if len(starts) * PATCH_RANGE_COST + 2 * total * itemsize >= entry.nbytes:
        return None
    packed = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return _Patch(width, starts, lengths, packed, total, tiles)


def _stream(ckpt: Checkpoint, names: _Names, plan, touched, loaded, writer: StreamWriter, progress: bool,
            disjoint: bool = False) -> int:
    """Write every tensor of BASE: copied raw, merged, or cast. Returns how many weights changed.

    Every tensor that keeps its dtype is copied unchanged in a few large kernel copies, run by the writer's background
    thread from the start, while this thread computes the touched tensors' new bytes from BASE in file order and hands
    them to the writer, which writes them over the copy once it has passed them (a sparse patch, or the whole tensor):
    the copy and the arithmetic overlap. Tensors that change dtype are read into one reused buffer, merged or cast, and
    written at their place. `disjoint`: the slices share no weight (checked before), so each one's deltas go straight
    into the tensor."""
    items = list(ckpt.entries.items())
    codes = [dt for _, dt, _ in plan]
    dnames = [names.to_diffusers[k] for k, _ in items]
    keep = [codes[i] == e.dtype for i, (_, e) in enumerate(items)]
    capacity = max((e.nbytes for i, (_, e) in enumerate(items) if not keep[i] or dnames[i] in touched), default=0)
    spans: list = []  # runs of kept tensors lying back to back in one file: one kernel copy each
    for i, (_, e) in enumerate(items):
        if not keep[i]:
            continue
        if i and keep[i - 1] and spans[-1][-1].path == e.path and spans[-1][-1].end == e.start:
            spans[-1].append(e)
        else:
            spans.append([e])
    changed = 0
    value_handles = {}
    stack = ExitStack()  # the slices' open values files
    bar = _progress(len(items), progress, writer.path)
    try:
        with TensorReader(ckpt.files, capacity) as reader:
            for s in loaded:
                value_handles[id(s)] = stack.enter_context(s.open_values())
            writer.copy_in_background(spans, reader)
            for i, (key, entry) in enumerate(items):
                dt, dname = codes[i], dnames[i]
                if keep[i] and dname not in touched:  # the background copy writes it
                    bar.update(1)
                    continue
                if keep[i]:
                    patch = _patch_plan(entry, dname, touched[dname])
                    if patch is not None:
                        changed += _patch_tensor(reader, writer, key, entry, dname, touched[dname], value_handles,
                                                 disjoint, patch)
                        bar.update(1)
                        continue
                base = read_stored(reader, entry)  # a view of the reader's buffer, valid until its next read
                if dname in touched:
                    merged, count = _merged_tensor(base, entry.dtype, dt, dname, touched[dname], value_handles,
                                                   disjoint)
                    changed += count
                else:
                    merged = dtypes.cast(base, entry.dtype, dt)
                if keep[i]:  # copied too: overwritten whole
                    data = tensor_bytes(merged)
                    writer.patch(key, [(0, 0, data.nbytes)], data)
                else:
                    writer.write_at(key, merged)
                del merged, base
                bar.update(1)
    finally:
        bar.close()
        stack.close()
    return changed


def _patch_tensor(reader: TensorReader, writer: StreamWriter, key: str, entry: TensorEntry, name: str,
                  slices: list[SliceDeltas], handles, disjoint: bool, patch: _Patch) -> int:
    """Merge the slices into `entry`, already copied unchanged to the output: read the byte ranges holding its selected
    weights from BASE, update them, write them over the copy. Returns how many weights changed."""
    itemsize = entry.nbytes // entry.numel
    buf = reader.buffer(patch.total * itemsize)
    view = memoryview(buf)
    fd = reader.fd(entry.path)
    step = patch.width * itemsize
    spans = [(s * step, p * step, (p + ln) * step)
             for s, ln, p in zip(patch.starts.tolist(), patch.lengths.tolist(), patch.packed.tolist())]
    for at, lo, hi in spans:
        pread_into(fd, view[lo:hi], entry.start + at, entry)
    packed = dtypes.stored(buf, entry.dtype)
    parts = [(patch.remap(tiles), s.values(name, handles[id(s)])) for s, tiles in zip(slices, patch.tiles)]
    changed = _apply(packed, packed, entry.dtype, entry.dtype, parts, disjoint)
    writer.patch(key, spans, view)  # every range in one call
    return changed


def _merged_tensor(base: np.ndarray, code: str, out_code: str, name: str, slices: list[SliceDeltas], handles,
                   disjoint: bool = False):
    """(BASE + the slices' deltas, number of weights changed), as `out_code`'s numpy storage. `base` is stored as
    `code`. Only the selected weights are gathered, summed in float32 (float64 for a float64 BASE) in slice order and
    rounded once into the output. When the dtype does not change, `base` itself is updated in place and returned (no
    other full-size array exists); else the cast copy."""
    flat = base.reshape(-1)
    out = flat if out_code == code else dtypes.cast(flat, code, out_code)
    parts = [(s.indices(name), s.values(name, handles[id(s)])) for s in slices]
    return out.reshape(base.shape), _apply(flat, out, code, out_code, parts, disjoint)


def _apply(flat: np.ndarray, out: np.ndarray, code: str, out_code: str, parts, disjoint: bool) -> int:
    """out[i] = round(flat[i] + sum of the deltas at i), for every index i of `parts` ([(indices, float32 deltas)] in
    slice order; indices sorted and unique within a part); `flat` is stored as `code`, `out` as `out_code` and may be
    `flat`. Returns how many weights changed."""
    if len(parts) == 1 or disjoint:
        # each weight gets one slice's delta: gather, add, round once, scatter, slice by slice (no weight is read
        # after another slice wrote it, so the order does not matter)
        for idx, v in parts:
            acc = dtypes.to_float(flat.take(idx), code)
            out[idx] = dtypes.from_float(acc + v.astype(acc.dtype, copy=False), out_code)
        return sum(len(idx) for idx, _ in parts)
    # Overlapping slices: one accumulator slot per distinct weight.
    idx = np.unique(np.concatenate([i for i, _ in parts]))
    acc = dtypes.to_float(flat.take(idx), code)
    for i, v in parts:  # in slice order: ((BASE + d1) + d2) where slices overlap; unique indices within a part
        acc[np.searchsorted(idx, i)] += v.astype(acc.dtype, copy=False)
    out[idx] = dtypes.from_float(acc, out_code)
    return len(idx)


def _check_space(output: Path, plan) -> None:
    need = sum(dtypes.ITEMSIZE[dt] * math.prod(shape) for _, dt, shape in plan)
    free = _free_space(output.parent)
    if need > free:
        raise ValueError(f"not enough free disk space for {str(output)!r}: it needs {format_bytes(need)}, {format_bytes(free)} "
                         "are free; free space or write elsewhere")


def _progress(total: int, enabled: bool, output: Path):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"merging into {output.name}", unit="tensor", disable=not enabled)
