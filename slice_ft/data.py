"""Streaming captioned image/video data for slice-ft: aspect/frame buckets, decoding, batching.

Pipeline: ``build_dataset`` -> ``datasets.IterableDataset`` of *normalized rows*
(``media_path``, ``media_bytes``, ``media_type``, ``caption``), media left undecoded (datasets'
``Video`` feature needs torchcodec) -> ``BucketedLoader``: shuffle (``IterableDataset.shuffle``),
shard (``split_dataset_by_node``), probe each file's size/frame count, assign a bucket, and
when a bucket holds ``batch_size`` items decode them (PIL / PyAV) into ``(B, C, F, H, W)``
tensors in [-1, 1]::

    ds = build_dataset("path/or/hub-name")                    # metadata.jsonl/csv or <stem>.txt
    loader = BucketedLoader(ds, BucketConfig([(832, 480), (480, 832)], [1, 17, 33]), batch_size=1,
                            seed=0, rank=accelerator.process_index, world_size=accelerator.num_processes)
    for epoch in range(start_epoch, epochs): loader.set_epoch(epoch); [step(b) for b in loader]

Frame sampling: with ``frame_stride=None`` the bucket's F frames are spread evenly over the
whole clip (the effective fps depends on clip length); with ``frame_stride=s`` F frames ``s``
apart are taken from the middle of the clip (fixed fps; F is the largest allowed count whose
span ``(F-1)*s+1`` fits).

Resume: batch membership depends only on probing (cheap: header + frame count), so
``skip_batches(n)`` / ``load_state_dict`` replay the first ``n`` batches of an epoch without
decoding them and then yield exactly what an uninterrupted run would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import av
import numpy as np
import torch
from PIL import Image, ImageOps

import datasets
from datasets.distributed import split_dataset_by_node

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "CAPTION_COLUMNS",
    "NORMALIZED_FEATURES",
    "Bucket",
    "BucketConfig",
    "MediaInfo",
    "Item",
    "DataStats",
    "load_local_corpus",
    "build_dataset",
    "probe_media",
    "frame_indices",
    "load_clip",
    "content_id",
    "BucketedLoader",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif"})
# Caption column tried in this order when none is given (imagefolder/diffusers use "text").
CAPTION_COLUMNS = ("caption", "text", "prompt")
# Wan: VAE downsamples space by 8, the transformer patchifies by 2 -> sizes must be /16.
SIZE_MULTIPLE = 16

NORMALIZED_FEATURES = datasets.Features({
    "media_path": datasets.Value("string"),
    "media_bytes": datasets.Value("binary"),
    "media_type": datasets.Value("string"),
    "caption": datasets.Value("string"),
})


# ----------------------------------------------------------------------------- buckets


class Bucket(NamedTuple):
    width: int
    height: int
    num_frames: int


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets ``resolutions`` = [(width, height), ...] (each divisible by 16) and
    allowed ``frame_counts`` (each 4k+1, Wan's VAE time compression). An item goes to the
    resolution with the nearest aspect ratio (log-ratio distance; ties -> first listed) and the
    largest allowed frame count <= its usable frames (images: 1 frame)."""

    resolutions: Sequence[tuple[int, int]]
    frame_counts: Sequence[int] = (1, 5, 9, 17)

    def __post_init__(self):
        res = []
        if isinstance(self.resolutions, (str, bytes)) or not len(self.resolutions):
            raise ValueError(f"resolutions={self.resolutions!r} must be a non-empty list of (width, height), "
                             "e.g. [(832, 480), (480, 832)]")
        for r in self.resolutions:
            if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(_is_int(v) for v in r)):
                raise ValueError(f"resolution {r!r} must be a (width, height) pair of ints, e.g. (832, 480)")
            w, h = int(r[0]), int(r[1])
            if w <= 0 or h <= 0 or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
                raise ValueError(
                    f"resolution {w}x{h} must be positive and divisible by {SIZE_MULTIPLE} "
                    f"(VAE x8 * patch x2); use e.g. {_round16(w)}x{_round16(h)}")
            if (w, h) not in res:
                res.append((w, h))
        if isinstance(self.frame_counts, (str, bytes)) or not len(self.frame_counts):
            raise ValueError(f"frame_counts={self.frame_counts!r} must be a non-empty list like [1, 5, 9, 17]")
        fcs = set()
        for f in self.frame_counts:
            if not _is_int(f) or int(f) < 1 or (int(f) - 1) % 4:
                near = max(1, 4 * round((int(f) - 1) / 4) + 1) if _is_int(f) else 1
                raise ValueError(
                    f"frame count {f!r} is not of the form 4k+1 (1, 5, 9, 13, 17, ...), which Wan's VAE "
                    f"(4x temporal compression) needs; use e.g. {near}")
            fcs.add(int(f))
        object.__setattr__(self, "resolutions", tuple(res))
        object.__setattr__(self, "frame_counts", tuple(sorted(fcs)))

    @classmethod
    def from_strings(cls, resolutions: str, frame_counts: str = "1,5,9,17") -> "BucketConfig":
        """CLI helper: ``"832x480,480x832"`` and ``"1,17,33"``."""
        try:
            res = [tuple(int(v) for v in r.lower().split("x")) for r in resolutions.split(",") if r.strip()]
            fcs = [int(f) for f in frame_counts.split(",") if f.strip()]
        except ValueError:
            raise ValueError(f"could not parse resolutions={resolutions!r} / frame_counts={frame_counts!r}; "
                             "use 'WxH,WxH' and '1,5,9'") from None
        return cls(res, fcs)

    def resolution_for(self, width: int, height: int) -> tuple[int, int]:
        ar = math.log(width / height)
        return min(self.resolutions, key=lambda r: abs(math.log(r[0] / r[1]) - ar))

    def frames_for(self, num_frames: int, frame_stride: Optional[int] = None) -> Optional[int]:
        """Largest allowed count that fits ``num_frames`` (with stride s, span (F-1)*s+1)."""
        s = frame_stride or 1
        fits = [f for f in self.frame_counts if (f - 1) * s + 1 <= num_frames]
        return fits[-1] if fits else None

    def assign(self, width: int, height: int, num_frames: int, frame_stride: Optional[int] = None
               ) -> Optional[Bucket]:
        """Bucket for a ``width``x``height`` item with ``num_frames`` frames, or None if too short."""
        f = self.frames_for(num_frames, frame_stride)
        if f is None:
            return None
        return Bucket(*self.resolution_for(width, height), f)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _round16(v: int) -> int:
    return max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(v / SIZE_MULTIPLE))


# ----------------------------------------------------------------------------- datasets


def _media_type(name: str) -> Optional[str]:
    ext = os.path.splitext(name)[1].lower()
    return "image" if ext in IMAGE_EXTENSIONS else ("video" if ext in VIDEO_EXTENSIONS else None)


def _clean_caption(value) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _read_text(path: str) -> str:
    """A caption file's text: UTF-8 with or without a BOM (Excel, Notepad). Bytes that are not UTF-8 are kept as
    lone surrogates (``surrogateescape``) so the rest of the file still reads; ``_decoded`` turns them away."""
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8-sig", errors="surrogateescape")


def _decoded(caption: Optional[str], where: str) -> Optional[str]:
    """``caption``, or None (the item is then skipped and counted as ``no_caption``) when it holds bytes that are not
    UTF-8, with a warning naming the file."""
    if caption is None:
        return None
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = caption[err.start].encode("utf-8", errors="surrogateescape")
        logger.warning("skipping the caption of %s: byte 0x%s at character %d is not UTF-8; re-save the captions as "
                       "UTF-8", where, bad.hex(), err.start)
        return None
    return caption


def _read_metadata(folder: str, caption_column: Optional[str]) -> dict[str, Optional[str]]:
    """{normalized abs path: caption} from metadata.jsonl / metadata.csv in ``folder`` (UTF-8, with or without a BOM;
    a caption with bytes that are not UTF-8 becomes None, with a warning)."""
    rows: list[tuple[dict, str]] = []  # (row, where it came from)
    src = None
    for name in ("metadata.csv", "metadata.jsonl"):  # jsonl read last: wins on conflicts
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        src = path
        text = _read_text(path)
        if name.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows.extend((r, f"{path}:{reader.line_num}") for r in reader)
        else:
            for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
                if line.strip():
                    try:
                        rows.append((json.loads(line), f"{path}:{lineno}"))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); "
                                         "write one JSON object per line") from None
    if not rows:
        return {}
    keys = set().union(*(r.keys() for r, _ in rows))
    if "file_name" not in keys:
        raise ValueError(f"{src} has no 'file_name' column (found {sorted(keys)}); "
                         "add file_name with paths relative to the metadata file")
    col = caption_column
    if col is None:
        col = next((c for c in CAPTION_COLUMNS if c in keys), None)
        if col is None:
            raise ValueError(f"{src} has no caption column among {list(CAPTION_COLUMNS)} (found {sorted(keys)}); "
                             "pass caption_column=<name>")
    elif col not in keys:
        raise ValueError(f"caption_column={col!r} not in {src} (found {sorted(keys)}); pass one of those")
    return {os.path.normpath(os.path.join(folder, str(r["file_name"]))):
            _decoded(_clean_caption(r.get(col)), f"{r['file_name']} ({where})")
            for r, where in rows if r.get("file_name")}


def _sidecar_caption(media_path: str) -> Optional[str]:
    txt = os.path.splitext(media_path)[0] + ".txt"
    if os.path.isfile(txt):
        return _decoded(_clean_caption(_read_text(txt)), txt)
    return None


def load_local_corpus(path: Union[str, os.PathLike], *, caption_column: Optional[str] = None,
                      num_shards: Optional[int] = None) -> datasets.IterableDataset:
    """Stream a local folder (recursive) of images/videos as normalized rows.

    Captions: ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` relative to that file's
    folder + a caption column, auto-detected from ``CAPTION_COLUMNS`` unless given), else a
    sidecar ``<stem>.txt`` (musubi-tuner style). Files without a caption keep ``caption=None``
    so the loader can skip and count them. ``num_shards`` (default ``min(files, 256)``) sets
    the datasets shards used for shuffling and ``split_dataset_by_node``.
    """
    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise ValueError(f"corpus path {root!r} is not a directory; pass a folder of images/videos")
    captions: dict[str, Optional[str]] = {}
    media: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        captions.update(_read_metadata(folder, caption_column))
        media.update(os.path.normpath(os.path.join(folder, f)) for f in files
                     if not f.startswith(".") and _media_type(f))
    media.update(p for p in captions if _media_type(p))  # listed but missing -> counted as unreadable later
    if not media:
        raise ValueError(f"no media files found under {root!r}; expected images {sorted(IMAGE_EXTENSIONS)} "
                         f"or videos {sorted(VIDEO_EXTENSIONS)}")
    rows = []
    for p in sorted(media, key=lambda p: os.path.relpath(p, root)):
        cap = captions.get(p)
        if cap is None:
            cap = _sidecar_caption(p)
        rows.append({"media_path": p, "media_bytes": None, "media_type": _media_type(p), "caption": cap})
    shards = max(1, min(len(rows), num_shards or 256))
    return datasets.Dataset.from_list(rows, features=NORMALIZED_FEATURES).to_iterable_dataset(num_shards=shards)


def _undecoded(feature):
    """datasets' Image/Video feature with decode=False (keeps {'bytes','path'}), else None."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    video = getattr(datasets, "Video", None)
    if video is not None and isinstance(feature, video):
        return video(decode=False)
    return None


def _as_source(value) -> tuple[Optional[str], Optional[bytes]]:
    if value is None:
        return None, None
    if isinstance(value, dict):  # undecoded Image/Video feature
        return value.get("path"), value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None, bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), None
    raise ValueError(f"media value of type {type(value).__name__} is not supported; "
                     "expected a path string, raw bytes or an undecoded {'bytes','path'} dict")


def build_dataset(
    dataset_name: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    image_column: str = "image",
    video_column: str = "video",
    caption_column: Optional[str] = None,
    streaming: bool = True,
    split: str = "train",
    num_shards: Optional[int] = None,
    **load_kwargs: Any,
) -> datasets.IterableDataset:
    """Normalized streaming dataset from a local folder or a ``datasets.load_dataset`` name.

    A directory goes to ``load_local_corpus``. Anything else is
    ``datasets.load_dataset(dataset_name, split=split, streaming=streaming, **load_kwargs)``
    (hub names, or builders like ``"imagefolder"`` with ``data_dir=``); its ``image_column``
    / ``video_column`` (path string, bytes, or Image/Video feature, cast to ``decode=False``)
    and ``caption_column`` (auto-detected from ``CAPTION_COLUMNS`` if None) are mapped to the
    normalized schema. ``streaming=False`` loads map-style and converts with
    ``to_iterable_dataset(num_shards)``. A list of names gives their datasets one after the other
    (``datasets.concatenate_datasets``; the loader's shuffle buffer mixes them).
    """
    if not isinstance(dataset_name, (str, os.PathLike)):
        names = list(dataset_name)
        if not names:
            raise ValueError("dataset_name is an empty list; give at least one folder or dataset name")
        parts = [build_dataset(n, image_column=image_column, video_column=video_column, caption_column=caption_column,
                               streaming=streaming, split=split, num_shards=num_shards, **load_kwargs) for n in names]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if os.path.isdir(os.fspath(dataset_name)):
        return load_local_corpus(dataset_name, caption_column=caption_column, num_shards=num_shards)
    try:
        ds = datasets.load_dataset(os.fspath(dataset_name), split=split, streaming=streaming, **load_kwargs)
    except (OSError, ValueError) as err:  # a mistyped local folder lands here too: say both what it is not
        raise ValueError(
            f"dataset {os.fspath(dataset_name)!r} is not a local folder (none at "
            f"{os.path.abspath(os.fspath(dataset_name))!r}) and could not be loaded as a `datasets` Hub dataset "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}); pass an existing "
            "folder of captioned images/videos, or a Hub dataset name such as user/dataset") from err
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), num_shards or 256)))
    feats = ds.features or {}
    for col in (image_column, video_column):
        if col in feats and _undecoded(feats[col]) is not None:
            ds = ds.cast_column(col, _undecoded(feats[col]))
    names = list(ds.column_names or feats.keys())
    if names:
        if image_column not in names and video_column not in names:
            raise ValueError(f"dataset {dataset_name!r} has neither image_column={image_column!r} nor "
                             f"video_column={video_column!r} (columns: {names}); pass the right column names")
        if caption_column is not None and caption_column not in names:
            raise ValueError(f"caption_column={caption_column!r} not in dataset {dataset_name!r} "
                             f"(columns: {names}); pass one of those")

    def normalize(row):
        kind, value = ("video", row.get(video_column)) if row.get(video_column) is not None \
            else ("image", row.get(image_column))
        path, data = _as_source(value)
        if value is None:
            kind = None
        elif path and _media_type(path):
            kind = _media_type(path)  # trust the extension when the column is ambiguous
        col = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
        return {"media_path": path, "media_bytes": data, "media_type": kind,
                "caption": _clean_caption(row.get(col)) if col else None}

    ds = ds.map(normalize, remove_columns=names or None, features=NORMALIZED_FEATURES)
    return ds.select_columns(list(NORMALIZED_FEATURES))


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    num_frames: int


def _open_source(path: Optional[str], data: Optional[bytes]):
    if data is not None:
        return io.BytesIO(data)
    if path:
        return path
    raise ValueError("row has neither media_bytes nor media_path; check image_column/video_column")


def _exif_swaps(img: Image.Image) -> bool:
    # EXIF orientations 5-8 rotate by 90 degrees: width and height swap after exif_transpose.
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def probe_media(path: Optional[str], data: Optional[bytes], media_type: str) -> MediaInfo:
    """Size and frame count from headers (no pixel decoding; videos without a frame count in
    the container are demuxed to count packets). Raises on unreadable files."""
    src = _open_source(path, data)
    if media_type == "image":
        with Image.open(src) as img:
            w, h = img.size
            return MediaInfo(*((h, w) if _exif_swaps(img) else (w, h)), 1)
    if media_type != "video":
        raise ValueError(f"media_type={media_type!r} must be 'image' or 'video'")
    with av.open(src) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        n = stream.frames
        if n <= 0:
            n = sum(1 for p in container.demux(stream) if p.size)
    if w <= 0 or h <= 0 or n <= 0:
        raise ValueError(f"invalid video header: {w}x{h}, {n} frames")
    return MediaInfo(w, h, n)


def frame_indices(available: int, num_frames: int, frame_stride: Optional[int] = None) -> list[int]:
    """Which of ``available`` frames to keep: evenly spread (stride None) or ``frame_stride``
    apart, centered in the clip."""
    if frame_stride is None:
        if num_frames == 1:
            return [(available - 1) // 2]
        return [int(round(i)) for i in np.linspace(0, available - 1, num_frames)]
    span = (num_frames - 1) * frame_stride + 1
    if span > available:
        raise ValueError(f"{num_frames} frames with frame_stride={frame_stride} need {span} frames, "
                         f"clip has {available}")
    start = (available - span) // 2
    return [start + i * frame_stride for i in range(num_frames)]


def _resize_crop(img: Union[Image.Image, np.ndarray], width: int, height: int) -> np.ndarray:
    """Resize so the image covers width x height (shorter side fits), then center-crop (PIL's ImageOps.fit).
    Takes a PIL image or a uint8 (H, W, 3) RGB array; an array already width x height is returned as is
    (ImageOps.fit is then an identity crop)."""
    if isinstance(img, np.ndarray):
        if img.shape[:2] == (height, width):
            return img
        img = Image.fromarray(img)
    return np.asarray(ImageOps.fit(img, (width, height), Image.BICUBIC, centering=(0.5, 0.5)), dtype=np.uint8)


def _frames_from(container, stream, first: int) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """(index, frame) from the keyframe at or before frame `first` on: a seek instead of decoding every frame
    from 0 (a --frame_stride clip from the middle of a long video). A frame's index is its position in decode
    order, as a full decode counts; it is derived from the keyframe's timestamp at the stream's constant frame rate,
    and where the stream cannot vouch for that (no rate or start time, a timestamp off the frame grid, a seek that
    overshoots) the file is decoded from frame 0 instead."""
    rate, base, start = stream.average_rate, stream.time_base, stream.start_time
    if first > 0 and rate and base and start is not None:
        container.seek(start + int(first / (rate * base)), stream=stream, backward=True, any_frame=False)
        decoded = container.decode(stream)
        head = next(decoded, None)
        if head is not None and head.pts is not None:
            position = float((head.pts - start) * base * rate)
            index = round(position)
            if abs(position - index) < 1e-3 and 0 <= index <= first:
                yield index, head
                for k, frame in enumerate(decoded, start=index + 1):
                    yield k, frame
                return
        container.seek(start, stream=stream, backward=True, any_frame=False)  # fall back: decode from frame 0
    yield from enumerate(container.decode(stream))


def rgb_frames(container, stream, wanted: list[int]) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 (H, W, 3) RGB frame, how many times `wanted` lists it) for the sorted frame indices `wanted` (even
    spreading of short clips may repeat one), decoding from the keyframe before the first."""
    need = Counter(wanted)
    for i, frame in _frames_from(container, stream, wanted[0]):
        if i in need:
            # threads=1: threaded RGB conversion was >10x slower on a busy CPU; DataLoader workers split clips
            yield frame.to_ndarray(format="rgb24", threads=1), need[i]
        if i >= wanted[-1]:
            break


def load_clip(path: Optional[str], data: Optional[bytes], media_type: str, bucket: Bucket, *,
              available_frames: Optional[int] = None, frame_stride: Optional[int] = None) -> torch.Tensor:
    """Decode, sample ``bucket.num_frames`` frames, resize/center-crop to the bucket size.
    Returns float32 ``(C, F, H, W)`` in [-1, 1] (``AutoencoderKLWan.encode`` input minus batch)."""
    src = _open_source(path, data)
    if media_type == "image":
        if bucket.num_frames != 1:
            raise ValueError(f"an image has 1 frame but bucket {bucket} wants {bucket.num_frames}")
        with Image.open(src) as img:
            frames = [_resize_crop(ImageOps.exif_transpose(img).convert("RGB"), bucket.width, bucket.height)]
    else:
        if available_frames is None:
            available_frames = probe_media(path, data, media_type).num_frames
            src = _open_source(path, data)
        wanted = frame_indices(available_frames, bucket.num_frames, frame_stride)
        frames = []
        with av.open(src) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for rgb, count in rgb_frames(container, stream, wanted):
                frames.extend([_resize_crop(rgb, bucket.width, bucket.height)] * count)
        if len(frames) != bucket.num_frames:
            raise ValueError(f"decoded {len(frames)} of {bucket.num_frames} frames "
                             f"(container reports {available_frames}); file is truncated or corrupt")
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (C, F, H, W) view of (F, H, W, C) uint8
    # one float tensor, written once in (C, F, H, W) order (`.float()` then `.contiguous()` made two clip-sized copies)
    return torch.empty(x.shape, dtype=torch.float32).copy_(x).div_(127.5).sub_(1.0)


def content_id(path: Optional[str], data: Optional[bytes]) -> str:
    """sha1 of the file bytes: a stable cache key that survives renames and moves."""
    if data is not None:
        return hashlib.sha1(data).hexdigest()
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- loader


@dataclass
class Item:
    pixel_values: Optional[torch.Tensor]  # (C, F, H, W) in [-1, 1]; None when skip_decode said so
    caption: str
    id: str                     # sha1 of the file bytes
    source: str                 # path (or a row label for byte rows), for logs
    media_type: str
    bucket: Bucket


@dataclass
class DataStats:
    """Counters since the loader was built. ``skipped`` reasons: ``no_caption``, ``no_media``,
    ``unreadable`` (header/probe failed), ``too_few_frames``, ``decode_error``."""

    seen: int = 0
    yielded_items: int = 0
    yielded_batches: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"seen": self.seen, "yielded_items": self.yielded_items,
                "yielded_batches": self.yielded_batches, "skipped": dict(self.skipped)}


@dataclass
class _Pending:
    path: Optional[str]
    data: Optional[bytes]
    media_type: str
    caption: str
    source: str
    info: MediaInfo


class BucketedLoader:
    """Deterministic, shardable, resumable iterator of same-bucket batches.

    Each batch is a dict: ``pixel_values`` float32 ``(B, C, F, H, W)`` in [-1, 1],
    ``captions``/``ids``/``sources``/``media_types`` lists, and ``bucket`` (``Bucket``).
    Order is fixed by ``seed`` and the epoch (``set_epoch``; call it every epoch like a
    ``DistributedSampler``). A batch is emitted when its bucket fills; at the end of the epoch
    partial batches are emitted in first-seen bucket order (dropped if ``drop_last``). Items
    failing to decode are dropped from their batch (it shrinks; an emptied batch is not
    yielded but still counts as a batch position for resume). Per-rank batch counts can
    differ: use a fixed step budget rather than relying on equal epoch lengths under DDP.

    ``skip_decode(content_id, bucket)``, when given, is asked before each item is decoded; when
    it is true for every item of a batch (e.g. their latents are cached), nothing is decoded and
    ``pixel_values`` is None.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        buckets: BucketConfig,
        *,
        batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        frame_stride: Optional[int] = None,
        drop_last: bool = False,
        decode_threads: int = 0,
        skip_decode: Optional[Callable[[str, Bucket], bool]] = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
    ):
        if not isinstance(buckets, BucketConfig):
            raise ValueError(f"buckets must be a BucketConfig, got {type(buckets).__name__}; "
                             "build one with BucketConfig([(W, H), ...], [1, 5, 9])")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if frame_stride is not None and (not _is_int(frame_stride) or frame_stride < 1):
            raise ValueError(f"frame_stride={frame_stride!r} must be None (spread evenly) or an int >= 1")
        if not (_is_int(world_size) and world_size >= 1 and _is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0 (0: decode in this process)")
        if not _is_int(prefetch_factor) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={prefetch_factor!r} must be an int >= 1")
        if shuffle and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (or shuffle=False)")
        self.buckets = buckets
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.frame_stride = frame_stride
        self.drop_last = bool(drop_last)
        self.decode_threads = int(decode_threads)
        self.skip_decode = skip_decode
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        ds = dataset.shuffle(seed=self.seed, buffer_size=shuffle_buffer) if self.shuffle else dataset
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        self.dataset = ds
        self.stats = DataStats()
        self.epoch = 0
        self._batches_yielded = 0  # batch positions consumed in self.epoch (incl. skipped ones)
        self._skip = 0             # positions to replay silently on the next __iter__

    # -- epochs and resume
    @property
    def skipped(self) -> Counter:
        return self.stats.skipped

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle; a no-op for the current epoch so a restored skip survives."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._batches_yielded = 0
            self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Make the next iteration of the current epoch start after its first ``n`` batches."""
        if not _is_int(n) or n < 0:
            raise ValueError(f"skip_batches(n={n!r}) needs an int >= 0")
        self._skip = int(n)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self._batches_yielded, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "frame_stride": self.frame_stride,
                "buckets": [list(map(list, self.buckets.resolutions)), list(self.buckets.frame_counts)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and position; the next ``__iter__`` resumes after the saved batch."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "world_size", "shuffle", "drop_last", "frame_stride", "buckets"):
            if key in state and _jsonish(state[key]) != _jsonish(mine[key]):
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this loader has {mine[key]!r}; "
                                 "the batch order would differ. Rebuild the loader with the saved settings")
        self.epoch = int(state["epoch"])
        self._batches_yielded = 0
        self._skip = int(state["batches_yielded"])

    # -- iteration
    def _probe(self, row: dict) -> Optional[_Pending]:
        self.stats.seen += 1
        try:
            path, data, kind, caption = row["media_path"], row["media_bytes"], row["media_type"], row["caption"]
        except KeyError as e:
            raise ValueError(f"row is missing {e}; build the dataset with build_dataset()/load_local_corpus() "
                             f"(columns {list(NORMALIZED_FEATURES)})") from None
        source = path or f"<{len(data) if data else 0} bytes, row {self.stats.seen}>"
        if kind not in ("image", "video") or (path is None and data is None):
            return self._skip_item("no_media", source, "no image/video in row")
        if caption is None:
            return self._skip_item("no_caption", source, "no caption (metadata or sidecar .txt)")
        try:
            info = probe_media(path, data, kind)
        except Exception as e:  # any reader failure means the file is unusable
            return self._skip_item("unreadable", source, f"{type(e).__name__}: {e}")
        return _Pending(path, data, kind, caption, source, info)

    def _skip_item(self, reason: str, source: str, detail: str) -> None:
        self.stats.skipped[reason] += 1
        logger.warning("skipping %s (%s): %s", source, reason, detail)
        return None

    def _decode(self, p: _Pending, bucket: Bucket, may_skip: bool = True) -> Optional[Item]:
        try:
            cid = content_id(p.path, p.data)
            if may_skip and self.skip_decode is not None and self.skip_decode(cid, bucket):
                return Item(None, p.caption, cid, p.source, p.media_type, bucket)
            x = load_clip(p.path, p.data, p.media_type, bucket,
                          available_frames=p.info.num_frames, frame_stride=self.frame_stride)
        except Exception as e:  # keep training alive on one bad file
            self._skip_item("decode_error", p.source, f"{type(e).__name__}: {e}")
            return None
        return Item(x, p.caption, cid, p.source, p.media_type, bucket)

    def _make_batch(self, bucket: Bucket, pending: list[_Pending]) -> Optional[dict]:
        if self.decode_threads > 1 and len(pending) > 1:
            with ThreadPoolExecutor(self.decode_threads) as pool:  # map keeps order: deterministic
                items = list(pool.map(lambda p: self._decode(p, bucket), pending))
        else:
            items = [self._decode(p, bucket) for p in pending]
        kept = [(p, it) for p, it in zip(pending, items) if it is not None]  # files that failed are dropped
        undecoded = [it.pixel_values is None for _, it in kept]
        if any(undecoded) and not all(undecoded):  # a batch is decoded whole or not at all
            kept = [(p, self._decode(p, bucket, may_skip=False) if skip else it)
                    for (p, it), skip in zip(kept, undecoded)]
        items = [it for _, it in kept if it is not None]
        if not items:
            return None
        pixels = None if items[0].pixel_values is None else torch.stack([it.pixel_values for it in items])
        return {"pixel_values": pixels,
                "captions": [it.caption for it in items], "ids": [it.id for it in items],
                "sources": [it.source for it in items], "media_types": [it.media_type for it in items],
                "bucket": bucket}

    def count_batches(self) -> int:
        """Batch positions in the current epoch, from probing the files only (nothing is decoded). Probing counts
        skipped files in `stats`, so count with a loader of its own."""
        return sum(1 for _ in self._positions())

    def _positions(self) -> Iterator[tuple[Bucket, list[_Pending]]]:
        """Batch positions (bucket, members) in order, from probing only."""
        self.dataset.set_epoch(self.epoch)
        pending: dict[Bucket, list[_Pending]] = {}
        for row in self.dataset:
            p = self._probe(row)
            if p is None:
                continue
            bucket = self.buckets.assign(p.info.width, p.info.height, p.info.num_frames, self.frame_stride)
            if bucket is None:
                self._skip_item("too_few_frames", p.source,
                                f"{p.info.num_frames} frames < smallest allowed {self.buckets.frame_counts[0]}"
                                + (f" at frame_stride={self.frame_stride}" if self.frame_stride else ""))
                continue
            group = pending.setdefault(bucket, [])
            group.append(p)
            if len(group) == self.batch_size:
                yield bucket, list(group)
                group.clear()
        if not self.drop_last:
            for bucket, group in pending.items():
                if group:
                    yield bucket, group

    def __iter__(self) -> Iterator[dict]:
        skip, self._skip = self._skip, 0
        self._batches_yielded = 0
        if self.num_workers:
            yield from self._iter_with_workers(skip)
            return
        for bucket, group in self._positions():
            self._batches_yielded += 1  # before yield: a checkpoint taken after this batch skips it
            if self._batches_yielded <= skip:
                continue
            batch = self._make_batch(bucket, group)
            if batch is not None:
                self.stats.yielded_batches += 1
                self.stats.yielded_items += len(batch["captions"])
                yield batch

    def _iter_with_workers(self, skip: int) -> Iterator[dict]:
        """Positions are probed here, in order; `num_workers` DataLoader workers decode them ahead (up to
        `num_workers * prefetch_factor` batches in flight) and the DataLoader hands them back in order.

        Why a plain torch DataLoader is enough for exact resume: all state (epoch, batch positions consumed) lives
        in this process and is counted when a batch is handed out, not when it is decoded; a decode is a pure
        function of its position, so a worker holds nothing a checkpoint would need.
        """
        from torch.utils.data import DataLoader

        jobs = ((n, bucket, group) for n, (bucket, group) in enumerate(self._positions(), start=1) if n > skip)
        loader = DataLoader(_DecodeJobs(self), sampler=jobs, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor, collate_fn=_identity)
        for position, batch, skipped in loader:
            self._batches_yielded = position  # a checkpoint taken after this batch skips it
            self.stats.skipped.update(skipped)  # decode failures counted in the worker
            if batch is not None:
                self.stats.yielded_batches += 1
                self.stats.yielded_items += len(batch["captions"])
                yield batch

    def iter_items(self) -> Iterator[Item]:
        """Single items in batch order (e.g. to precompute latents keyed by ``Item.id``)."""
        for batch in self:
            pixels = batch["pixel_values"]
            for i in range(len(batch["captions"])):
                yield Item(None if pixels is None else pixels[i], batch["captions"][i], batch["ids"][i],
                           batch["sources"][i], batch["media_types"][i], batch["bucket"])


class _DecodeJobs(torch.utils.data.Dataset):
    """A DataLoader dataset whose "index" is a whole job, (position, bucket, members): workers decode it with the
    loader's own `_make_batch` and return (position, batch, skip counts of this decode)."""

    def __init__(self, loader: "BucketedLoader"):
        self.loader = loader

    def __getitem__(self, job):
        position, bucket, group = job
        before = Counter(self.loader.stats.skipped)
        batch = self.loader._make_batch(bucket, group)
        return position, batch, self.loader.stats.skipped - before


def _identity(x):
    return x


def _jsonish(v):
    # Compare saved state (possibly JSON round-tripped: tuples -> lists) with live values.
    return json.loads(json.dumps(v))
