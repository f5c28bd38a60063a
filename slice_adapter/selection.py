"""Which weights a slice owns: parameter layout -> tiles -> slice indices.

Pure and deterministic: depends only on the targeted parameters' names and shapes, the fraction, the slice id and
the seed. Integer and rational arithmetic only (no floats, no torch RNG), so it gives the same answer on any machine,
device, dtype, thread count or torch version, and works on meta-device models.

The design, in three steps:

1. Tiles. A 2-D `nn.Linear` weight (out, in) is cut into row segments ("tiles") of `w` weights, `w` the largest
   divisor of `in` that is at most 64, so every tile is full. Every other parameter (norm weights, biases,
   `scale_shift_table`, ...) is tiled element by element (`w` = 1, flattened).
2. Ranking. Each parameter's N tiles are ranked by a keyed pseudo-random permutation of [0, N) (a Feistel network
   keyed by blake2b(seed, parameter name), with cycle walking). The permutation is evaluated only at the ranks a slice
   needs, so planning the 14B model costs O(selected), not O(weights).
   Tile order "banded" (opt-in): a Linear's input columns are cut into up to 8 equal bands (`ParamLayout.bands`), and
   its ranks run band by band (the bands in a keyed order, the tiles of a band, over all rows, in a keyed
   permutation), so a small slice's tiles in one matrix read one band of its input. Why: the tiles' gradient reads
   the input columns they cover, which training must keep from forward to backward; a band keeps 1/8 of a 1.3B
   Linear's input instead of all of it (measured before the inputs a block's norms feed were recomputed,
   `recompute.py`: the step's activation memory 1.14x -> 1.06-1.08x the frozen base's; that recompute serves both
   orders, so a band now saves the first block's q/k/v input alone). Not the default: in the quality study a concept
   trained before another forgot about twice as much (+52 % against +25 % plain, +6.8 % against +3.3 % with distill
   preservation). "scattered" (default): one permutation over all tiles, also the order of slices saved before tile
   orders were recorded.
3. Windows. Slice k at fraction f takes the ranks [floor(k f N + u), floor((k+1) f N + u)) where u in [0, 1) is a
   per-parameter offset: a golden-ratio (Weyl) sequence over the block index plus a hash of the block-free name, so
   the rounding of f N to whole tiles evens out over the blocks.

Consequences:
- Slices 0 .. num_slices-1 (num_slices = floor(1/f)) at one fraction, seed and tile order are pairwise disjoint, and
  cover every targeted weight when 1/f is an integer.
- Nested fractions: the offset does not depend on f, so slices 2k and 2k+1 at f/2 are exactly the two halves of slice
  k at f (likewise for any integer divisor m: slice k at f/m lies inside slice floor(k/m) at f). Slices at unrelated
  fractions may share weights; `overlap()` counts them exactly.
- Different seeds give unrelated slices; so do different tile orders.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Optional, Sequence

import numpy as np

MAX_TILE_WIDTH = 64
MAX_BANDS = 8
TILE_ORDERS = ("banded", "scattered")
TILE_ORDER = "scattered"  # what new slices use (banded: opt-in, see below)
LEGACY_TILE_ORDER = "scattered"  # what a layout record without a tile order means (saved before orders existed)
_BLOCK_RE = re.compile(r"(^|\.)blocks\.(\d+)\.")
_PHI64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the Weyl step of the low-discrepancy offsets
_MASK64 = (1 << 64) - 1


def parse_fraction(fraction) -> Fraction:
    """The fraction as an exact rational (0.001 -> 1/1000), so nesting and boundaries are exact."""
    try:
        value = Fraction(repr(float(fraction))) if not isinstance(fraction, Fraction) else fraction
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0 < value <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}: use e.g. 0.001 for 0.1% of the weights")
    return value


def num_slices_for(fraction) -> int:
    """How many disjoint slice ids a fraction defines: floor(1 / fraction)."""
    return math.floor(1 / parse_fraction(fraction))


def tile_width_for(in_features: int) -> int:
    """Largest divisor of `in_features` not above MAX_TILE_WIDTH: tiles are always full."""
    for w in range(min(MAX_TILE_WIDTH, in_features), 0, -1):
        if in_features % w == 0:
            return w
    return 1


def check_tile_order(tile_order) -> str:
    if tile_order not in TILE_ORDERS:
        raise ValueError(f"tile_order must be one of {list(TILE_ORDERS)}, got {tile_order!r}: use {TILE_ORDER!r} for "
                         f"a new slice")
    return tile_order


def recorded_tile_order(layout_record: Optional[dict]) -> str:
    """The tile order a saved layout record names; records written before orders were recorded are "scattered"."""
    return check_tile_order((layout_record or {}).get("tile_order", LEGACY_TILE_ORDER))


def block_index(name: str) -> Optional[int]:
    """The transformer block a parameter belongs to (`blocks.<i>.`), or None."""
    m = _BLOCK_RE.search(name)
    return int(m.group(2)) if m else None


@dataclass(frozen=True)
class ParamLayout:
    """One targeted parameter: its name, shape and how it is tiled."""

    name: str
    shape: tuple
    tiled_rows: bool  # True: an nn.Linear weight cut into row tiles; False: element tiles

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def tile_width(self) -> int:
        return tile_width_for(self.shape[1]) if self.tiled_rows else 1

    @property
    def num_tiles(self) -> int:
        return self.numel // self.tile_width

    @property
    def segments_per_row(self) -> int:
        return self.shape[1] // self.tile_width if self.tiled_rows else 1

    @property
    def bands(self) -> int:
        """Input bands of a "banded" tile order: the largest divisor of the segments per row up to MAX_BANDS (equal
        bands of whole tiles; 1 for element tiles)."""
        segs = self.segments_per_row
        return max(d for d in range(1, min(MAX_BANDS, segs) + 1) if segs % d == 0)


def _hash64(*parts) -> int:
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer: a fast, well-mixed 64-bit integer hash (uint64 arithmetic wraps by design)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_permutation(ranks: np.ndarray, n: int, key: int) -> np.ndarray:
    """Evaluate a keyed bijection of [0, n) at `ranks` (4-round Feistel network with cycle walking)."""
    if n <= 1:
        return np.zeros_like(ranks, dtype=np.int64)
    shift, mask, round_keys = _feistel_keys(n, key)
    with np.errstate(over="ignore"):
        out = _feistel(np.asarray(ranks).astype(np.uint64), shift, mask, round_keys)
        pending = out >= np.uint64(n)
        while pending.any():  # cycle walking: the domain is < 4n, so this ends after a few rounds
            out[pending] = _feistel(out[pending], shift, mask, round_keys)
            pending = out >= np.uint64(n)
    return out.astype(np.int64)


def _feistel_keys(n: int, key: int) -> tuple[np.uint64, np.uint64, np.ndarray]:
    """The half width, its mask and the 4 round keys of `keyed_permutation(., n, key)`."""
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    return (np.uint64(half_bits), np.uint64((1 << half_bits) - 1),
            np.array([_hash64(key, r) for r in range(4)], dtype=np.uint64))


def _feistel(x: np.ndarray, shift, mask, round_keys) -> np.ndarray:
    """One pass of the network; `shift`, `mask` and each round key are scalars or one value per element of `x`."""
    left, right = x >> shift, x & mask
    for rk in round_keys:
        left, right = right, left ^ (_mix64(right ^ rk) & mask)
    return (left << shift) | right


def _keyed_permutations(ranks: np.ndarray, n: np.ndarray, shift: np.ndarray, mask: np.ndarray,
                        round_keys: np.ndarray) -> np.ndarray:
    """`keyed_permutation` elementwise, each element with its own n, shift, mask and round keys (round_keys[:, i]):
    one numpy evaluation for the small windows of many parameters, whose one-by-one evaluation costs mostly numpy's
    per-call overhead."""
    with np.errstate(over="ignore"):
        out = _feistel(ranks.astype(np.uint64), shift, mask, round_keys)
        pending = np.flatnonzero(out >= n)
        while len(pending):
            out[pending] = _feistel(out[pending], shift[pending], mask[pending], round_keys[:, pending])
            pending = pending[out[pending] >= n[pending]]
    return out.astype(np.int64)


def _offset(name: str, seed: int) -> Fraction:
    """u in [0, 1): a Weyl sequence over the block index, shifted by a hash of the block-free name."""
    idx = block_index(name)
    kind = _BLOCK_RE.sub(r"\1blocks.*.", name)
    u = ((idx or 0) * _PHI64 + _hash64("offset", seed, kind)) & _MASK64
    return Fraction(u, 1 << 64)


def rank_window(num_tiles: int, fraction: Fraction, slice_id: int, offset: Fraction) -> tuple[int, int]:
    """The ranks [lo, hi) slice `slice_id` owns among `num_tiles` tiles."""
    lo = math.floor(slice_id * fraction * num_tiles + offset)
    hi = math.floor((slice_id + 1) * fraction * num_tiles + offset)
    return lo, min(hi, num_tiles)


def select_tiles(layout: ParamLayout, fraction, slice_id: int, seed: int, tile_order: str = TILE_ORDER) -> np.ndarray:
    """Sorted tile indices of `layout` that slice `slice_id` owns."""
    return select_tiles_many([layout], fraction, slice_id, seed, tile_order)[layout.name]


BATCH_RANKS = 1 << 16  # windows smaller than this are permuted together, this many ranks at a time


def _band_order(layout: ParamLayout, seed: int) -> np.ndarray:
    """The bands of `layout` in rank order (a keyed shuffle of the few bands: sorted by a hash of each)."""
    return np.array(sorted(range(layout.bands), key=lambda j: _hash64("band", seed, layout.name, j)), dtype=np.int64)


def _permuted_domain(layout: ParamLayout, ranks: np.ndarray, tile_order: str):
    """(the positions to permute, the size of the permuted domain, each rank's band position or None: scattered)."""
    if tile_order == "scattered" or layout.bands == 1:
        return ranks, layout.num_tiles, None
    band_tiles = layout.num_tiles // layout.bands  # rows x segments of one band
    return ranks % band_tiles, band_tiles, ranks // band_tiles


def _band_tiles(layout: ParamLayout, within: np.ndarray, band_pos: np.ndarray, seed: int) -> np.ndarray:
    """Tiles of permuted positions inside bands (row-major over the band's segments) at their bands' positions."""
    width = layout.segments_per_row // layout.bands  # segments per row in one band
    return within // width * layout.segments_per_row + _band_order(layout, seed)[band_pos] * width + within % width


def select_tiles_many(layouts: Sequence[ParamLayout], fraction, slice_id: int, seed: int,
                      tile_order: str = TILE_ORDER) -> dict[str, np.ndarray]:
    """{name: `select_tiles` of it} for every layout; small windows are permuted in batches (same tiles, faster)."""
    frac = parse_fraction(fraction)
    check_tile_order(tile_order)
    out: dict[str, np.ndarray] = {}
    batch: list = []  # (layout, positions, n, key, band positions) of small windows waiting
    waiting = 0  # their ranks

    def finish(lay, permuted, band_pos):
        out[lay.name] = np.sort(permuted if band_pos is None else _band_tiles(lay, permuted, band_pos, seed))

    def permute_batch():
        if not batch:
            return
        sizes = [len(r) for _, r, _, _, _ in batch]
        keys = [_feistel_keys(n, key) for _, _, n, key, _ in batch]
        per_element = lambda values: np.repeat(np.array(values, dtype=np.uint64), sizes)  # noqa: E731
        tiles = _keyed_permutations(np.concatenate([r for _, r, _, _, _ in batch]),
                                    per_element([n for _, _, n, _, _ in batch]), per_element([k[0] for k in keys]),
                                    per_element([k[1] for k in keys]),
                                    np.repeat(np.stack([k[2] for k in keys], axis=1), sizes, axis=1))
        for (lay, _, _, _, band_pos), part in zip(batch, np.split(tiles, np.cumsum(sizes)[:-1])):
            finish(lay, part, band_pos)
        batch.clear()

    for lay in layouts:
        lo, hi = rank_window(lay.num_tiles, frac, slice_id, _offset(lay.name, seed))
        ranks = np.arange(lo, max(hi, lo), dtype=np.int64)
        positions, n, band_pos = _permuted_domain(lay, ranks, tile_order)
        key = _hash64("rank", seed, lay.name)
        if n <= 1 or len(ranks) >= BATCH_RANKS or not len(ranks):
            finish(lay, keyed_permutation(positions, n, key), band_pos)
            continue
        batch.append((lay, positions, n, key, band_pos))
        waiting += len(ranks)
        if waiting >= BATCH_RANKS:
            permute_batch()
            waiting = 0
    permute_batch()
    return {lay.name: out[lay.name] for lay in layouts}


def flat_indices(layout: ParamLayout, tiles: np.ndarray) -> np.ndarray:
    """Flat (row-major) indices of every weight in `tiles`, in value order (sorted)."""
    w = layout.tile_width
    return (tiles[:, None] * w + np.arange(w, dtype=np.int64)[None, :]).reshape(-1)


@dataclass
class SlicePlan:
    """The weights one slice owns in one model.

    `selected`/`targeted` count weights; `per_block` maps a block index to (selected, targeted); `tiles` maps each
    targeted parameter name to its sorted tile indices (empty arrays are dropped: such parameters get no adapter).
    """

    layouts: dict[str, ParamLayout]
    tiles: dict[str, np.ndarray]
    fraction: Fraction
    slice_id: int
    seed: int
    tile_order: str = TILE_ORDER
    selected: int = 0
    targeted: int = 0
    per_block: dict[int, tuple[int, int]] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)  # every parameter of the planned model (for `mask`)

    def __post_init__(self):
        self.targeted = sum(lay.numel for lay in self.layouts.values())
        self.selected = sum(len(t) * self.layouts[n].tile_width for n, t in self.tiles.items())
        per_block: dict[int, list[int]] = {}
        for name, lay in self.layouts.items():
            idx = block_index(name)
            if idx is None:
                continue
            entry = per_block.setdefault(idx, [0, 0])
            entry[1] += lay.numel
            entry[0] += len(self.tiles.get(name, ())) * lay.tile_width
        self.per_block = {k: tuple(v) for k, v in sorted(per_block.items())}

    def selected_in(self, name: str) -> int:
        return len(self.tiles.get(name, ())) * self.layouts[name].tile_width if name in self.layouts else 0

    def flat_indices(self, name: str) -> np.ndarray:
        """Flat indices of the selected weights of parameter `name` (empty if none)."""
        if name not in self.tiles:
            return np.zeros(0, dtype=np.int64)
        return flat_indices(self.layouts[name], self.tiles[name])

    def mask(self, name: str, shape: Optional[Sequence[int]] = None):
        """A CPU bool tensor shaped like parameter `name`, True where this slice owns the weight (all False for a
        parameter of the planned model that is not targeted; `shape` is needed only for names the plan never saw)."""
        import torch

        if name in self.layouts:
            shape = self.layouts[name].shape
        elif shape is None and name in self.shapes:
            shape = self.shapes[name]
        elif shape is None:
            raise ValueError(f"{name!r} is not a parameter of the planned model; pass its shape to get an all-False "
                             "mask")
        out = torch.zeros(math.prod(shape), dtype=torch.bool)
        idx = self.flat_indices(name)
        if len(idx):
            out[torch.from_numpy(idx)] = True
        return out.view(tuple(shape))


def plan_layouts(layouts: Iterable[ParamLayout], fraction, slice_id: int, seed: int = 0,
                 tile_order: str = TILE_ORDER) -> SlicePlan:
    """Plan a slice over explicit parameter layouts (no model needed)."""
    frac = parse_fraction(fraction)
    validate_slice_id(slice_id, frac)
    by_name = {lay.name: lay for lay in layouts}
    selected = select_tiles_many(list(by_name.values()), frac, slice_id, seed, tile_order)
    tiles = {name: t for name, t in selected.items() if len(t)}
    return SlicePlan(layouts=by_name, tiles=tiles, fraction=frac, slice_id=slice_id, seed=seed, tile_order=tile_order)


def smallest_fraction(layouts: Iterable[ParamLayout], seed: int = 0) -> Optional[Fraction]:
    """The smallest fraction at which slice 0 (with `seed`) selects at least one weight of `layouts`: a parameter's
    window [floor(u), floor(f N + u)) holds a tile once f >= (1 - u) / N. None when nothing is targeted."""
    bounds = [(1 - _offset(lay.name, seed)) / lay.num_tiles for lay in layouts if lay.num_tiles]
    return min(bounds) if bounds else None


def validate_slice_id(slice_id, fraction) -> None:
    n = num_slices_for(fraction)
    if isinstance(slice_id, bool) or not isinstance(slice_id, (int, np.integer)) or not (0 <= slice_id < n):
        raise ValueError(
            f"slice_id must be an integer in [0, {n - 1}] (fraction {fraction} defines {n} disjoint slices), "
            f"got {slice_id!r}"
        )


def check_slice_fields(fraction, slice_id, seed) -> None:
    """ValueErrors naming the field and the value, for a config's fraction, slice id and seed."""
    parse_fraction(fraction)
    validate_slice_id(slice_id, fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def overlap_count(plan_a: SlicePlan, plan_b: SlicePlan) -> int:
    """Exact number of weights both plans select."""
    total = 0
    for name in plan_a.tiles.keys() & plan_b.tiles.keys():
        width = plan_a.layouts[name].tile_width
        if plan_b.layouts[name].tile_width == width:  # the same tiles: compare them, not each of their weights
            total += width * len(np.intersect1d(plan_a.tiles[name], plan_b.tiles[name], assume_unique=True))
        else:
            total += len(np.intersect1d(plan_a.flat_indices(name), plan_b.flat_indices(name), assume_unique=True))
    return total


def layout_fingerprint(layouts: Iterable[ParamLayout]) -> str:
    """A short hash of the targeted names, shapes and tilings: equal fingerprints mean equal slices."""
    payload = json.dumps([[lay.name, list(lay.shape), lay.tiled_rows] for lay in sorted(layouts, key=lambda l: l.name)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The child a tuner attaches to a module owning raw targeted parameters; it must not contain the prefix "slice_",
# or PEFT's delete_adapter skips it.
ADAPTER_CHILD = "sliced_params"


def canonical_name(name: str) -> str:
    """A parameter or module name as the bare model has it (PEFT wrappers' `.base_layer` removed)."""
    return name.replace(".base_layer", "")


def _is_adapter_name(name: str) -> bool:
    return any(part.startswith("slice_") for part in name.split("."))


def _matches(patterns, module_name: str, param_name: str) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return bool(re.fullmatch(patterns, module_name) or re.fullmatch(patterns, param_name))
    for p in patterns:
        for candidate in (module_name, param_name):
            if candidate == p or candidate.endswith("." + p):
                return True
    return False


def is_targeted(module_name: str, param_name: str, target_modules=None, exclude_modules=None) -> bool:
    """Whether a parameter is sliced under `target_modules`/`exclude_modules` (rules: see `model_layouts`)."""
    if target_modules is None:
        targeted = block_index(param_name) is not None
    else:
        targeted = _matches(target_modules, module_name, param_name)
    return targeted and not _matches(exclude_modules, module_name, param_name)


def model_layouts(model, target_modules=None, exclude_modules=None) -> list[ParamLayout]:
    """The targeted parameters of `model` (any device, meta included), in the model's own order.

    `target_modules=None` targets every parameter of the transformer blocks (`blocks.<i>.`). A list matches a module
    name or a parameter name exactly or by `.`-suffix (`"to_q"`, `"ffn.net.2"`, `"scale_shift_table"`,
    `"norm2.weight"`); a string is a regex that must fully match a module or parameter name.
    `exclude_modules` removes matches the same way.
    """
    import torch.nn as nn

    layouts = []
    for module_name, module in model.named_modules():
        if _is_adapter_name(module_name) or module_name.endswith("base_layer"):
            continue
        base = module
        while hasattr(base, "base_layer"):
            base = base.base_layer
        canon_module = canonical_name(module_name)
        for pname, param in base.named_parameters(recurse=False):
            if _is_adapter_name(pname):
                continue
            full = f"{canon_module}.{pname}" if canon_module else pname
            if not is_targeted(canon_module, full, target_modules, exclude_modules):
                continue
            rows = isinstance(base, nn.Linear) and pname == "weight" and param.dim() == 2
            layouts.append(ParamLayout(full, tuple(param.shape), rows))
    return layouts
