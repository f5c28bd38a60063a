"""Scripted synthetic captioned image/video corpus for tests, demos and quality studies.

Each *family* is a visually distinct kind of clip with its own caption template and
optional trigger word, so a later study can check that a fine-tune learned a family::

    from slice_ft.corpus import generate_corpus
    records = generate_corpus("outputs/demo_corpus", num_images=8, num_videos=8, seed=0)

Images are PNG (PIL), videos are mp4 (PyAV; mpeg4, else libx264), captions go to
``metadata.jsonl`` (imagefolder convention: ``file_name`` + ``text``), ``metadata.csv`` or
sidecar ``<stem>.txt`` files (``caption_format``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

import av
import numpy as np
from PIL import Image

__all__ = [
    "Family",
    "FAMILIES",
    "DEFAULT_FAMILIES",
    "generate_corpus",
    "write_corrupt_file",
    "write_video",
    "pick_video_codec",
]

# render(rng, width, height, num_frames) -> uint8 array (F, H, W, 3) plus caption words.
RenderFn = Callable[[np.random.Generator, int, int, int], "tuple[np.ndarray, dict]"]


@dataclass(frozen=True)
class Family:
    """A visually distinct family of clips. ``caption`` is a ``str.format`` template filled
    with the words its ``render`` returns; ``trigger`` (if set) is prefixed to every caption."""

    name: str
    caption: str
    render: RenderFn
    trigger: str | None = None

    def make_caption(self, words: Mapping[str, str], use_trigger: bool = True) -> str:
        text = self.caption.format(**words)
        return f"{self.trigger} {text}" if (use_trigger and self.trigger) else text


def _size_word(frac: float) -> str:
    return "small" if frac < 0.2 else ("medium" if frac < 0.3 else "large")


def _speed_word(px_per_frame: float, extent: int) -> str:
    return "slowly" if px_per_frame < extent / 16 else "quickly"


def _render_red_circles(rng, w, h, f):
    radius = rng.uniform(0.12, 0.35) * min(w, h)
    speed = rng.uniform(1.0, 3.0) * w / 32  # >= 1 px/frame at 32 px: motion is visible
    cx0 = rng.uniform(radius, max(radius + 1, w / 2))
    cy = rng.uniform(radius, max(radius + 1, h - radius))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.zeros((f, h, w, 3), np.uint8)
    frames[..., 2] = 20  # near-black navy background, not pure 0, so codecs keep it stable
    for t in range(f):
        cx = (cx0 + speed * t) % (w + 2 * radius) - radius  # wrap so it never leaves for long
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        frames[t][inside] = (230, 30, 30)
    return frames, {"size": _size_word(radius / min(w, h)), "speed": _speed_word(speed, w)}


def _render_blue_stripes(rng, w, h, f):
    period = int(rng.integers(6, 13))
    speed = rng.uniform(0.5, 3.0) * h / 32
    phase0 = rng.uniform(0, period)
    y = np.arange(h, dtype=np.float32)
    frames = np.empty((f, h, w, 3), np.uint8)
    for t in range(f):
        on = ((y - phase0 - speed * t) % period) < period / 2  # shifting down over time
        col = np.where(on[:, None], np.array([[30, 60, 220]]), np.array([[235, 235, 235]]))
        frames[t] = col[:, None, :].astype(np.uint8)
    words = {"width": "thin" if period < 9 else "wide", "speed": _speed_word(speed, h)}
    return frames, words


def _render_green_noise(rng, w, h, f):
    block = int(rng.choice([1, 2, 4]))
    bh, bw = -(-h // block), -(-w // block)
    lo = int(rng.integers(0, 60))
    g = rng.integers(lo + 100, 256, size=(f, bh, bw), dtype=np.int64)
    g = np.repeat(np.repeat(g, block, axis=1), block, axis=2)[:, :h, :w]
    frames = np.zeros((f, h, w, 3), np.uint8)
    frames[..., 1] = g
    frames[..., 0] = g // 5
    return frames, {"grain": {1: "fine", 2: "medium", 4: "coarse"}[block]}


def _render_yellow_gradient(rng, w, h, f):
    speed = rng.uniform(0.02, 0.1)
    x = np.linspace(0, 1, w, dtype=np.float32)
    frames = np.empty((f, h, w, 3), np.uint8)
    for t in range(f):
        v = (np.sin(2 * np.pi * (x - speed * t)) + 1) / 2  # gradient band sweeping right
        row = np.stack([255 * v, 220 * v, 20 * v + 10], -1).astype(np.uint8)
        frames[t] = row[None]
    return frames, {"speed": "slowly" if speed < 0.05 else "quickly"}


FAMILIES: dict[str, Family] = {
    "red_circles": Family(
        "red_circles", "a {size} red circle moving right {speed} on a dark background",
        _render_red_circles, trigger="sks_a"),
    "blue_stripes": Family(
        "blue_stripes", "{width} blue stripes scrolling down {speed} over a white background",
        _render_blue_stripes, trigger="sks_b"),
    "green_noise": Family(
        "green_noise", "flickering {grain} green noise", _render_green_noise, trigger="sks_c"),
    "yellow_gradient": Family(
        "yellow_gradient", "a soft yellow gradient sweeping right {speed}",
        _render_yellow_gradient, trigger="sks_d"),
}
DEFAULT_FAMILIES = ("red_circles", "blue_stripes", "green_noise")


def pick_video_codec(preferred: Sequence[str] = ("mpeg4", "libx264")) -> str:
    """First encoder in ``preferred`` that this PyAV/FFmpeg build can write. mpeg4 comes
    first: its output is byte-identical run to run (libx264's varied here), so sha1 ids of
    a regenerated corpus stay the same."""
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # unknown/unavailable encoder in this FFmpeg build
            continue
    raise ValueError(
        f"none of the video encoders {list(preferred)} is available in this PyAV build; "
        "install a PyAV wheel with libx264 or mpeg4, or pass codec= one that `av.codecs_available` lists")


def write_video(target: Union[str, os.PathLike, io.BytesIO], frames: np.ndarray, *, fps: int = 8,
                codec: str | None = None) -> None:
    """Encode uint8 frames ``(F, H, W, 3)`` as mp4 to a path or a BytesIO."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"video size {w}x{h} must be even for yuv420p; use an even width and height")
    codec = codec or pick_video_codec()
    kwargs = {"format": "mp4"} if isinstance(target, io.BytesIO) else {}
    with av.open(target if isinstance(target, io.BytesIO) else os.fspath(target), "w", **kwargs) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}  # near-lossless: colors survive
        elif codec == "mpeg4":
            stream.options = {"flags": "+qscale", "global_quality": str(2 * 118)}  # -q:v 2 (QP2LAMBDA=118)
        else:
            stream.bit_rate = 2_000_000
        for t, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _resolve_families(families: Iterable[Union[str, Family]]) -> list[Family]:
    out = []
    for fam in families:
        if isinstance(fam, Family):
            out.append(fam)
        elif fam in FAMILIES:
            out.append(FAMILIES[fam])
        else:
            raise ValueError(f"unknown corpus family {fam!r}; use one of {sorted(FAMILIES)} or pass a Family")
    if not out:
        raise ValueError("families is empty; pass at least one family name, e.g. families=('red_circles',)")
    return out


def generate_corpus(
    out_dir: Union[str, os.PathLike],
    *,
    num_images: int = 8,
    num_videos: int = 8,
    size: Union[tuple[int, int], Sequence[tuple[int, int]]] = (48, 32),
    num_frames: Union[int, Sequence[int]] = (5, 9),
    seed: int = 0,
    families: Iterable[Union[str, Family]] = DEFAULT_FAMILIES,
    use_triggers: bool = True,
    caption_format: str = "jsonl",
    fps: int = 8,
    codec: str | None = None,
) -> list[dict]:
    """Write a deterministic synthetic corpus to ``out_dir`` and return one record per file.

    ``size`` is ``(W, H)`` or a list of them and ``num_frames`` an int or a list; lists are
    cycled over items (to exercise aspect/frame buckets). Item ``i`` of each kind belongs to
    ``families[i % len(families)]``. ``caption_format``: ``"jsonl"`` (``metadata.jsonl``),
    ``"csv"`` (``metadata.csv``), ``"txt"`` (sidecar ``<stem>.txt``) or ``"none"``.
    Records: ``file_name, text, family, trigger, media_type, width, height, num_frames``.
    """
    if caption_format not in ("jsonl", "csv", "txt", "none"):
        raise ValueError(f"caption_format={caption_format!r} is not supported; use 'jsonl', 'csv', 'txt' or 'none'")
    if num_images < 0 or num_videos < 0:
        raise ValueError(f"num_images={num_images}, num_videos={num_videos} must be >= 0")
    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
    frame_list = [num_frames] if isinstance(num_frames, int) else list(num_frames)
    for w, h in sizes:
        if w < 2 or h < 2 or w % 2 or h % 2:
            raise ValueError(f"size {(w, h)} must be even and >= 2 in both dimensions (yuv420p video)")
    if not frame_list or any(n < 1 for n in frame_list):
        raise ValueError(f"num_frames={num_frames!r} must be positive frame counts")
    fams = _resolve_families(families)
    codec = codec or (pick_video_codec() if num_videos else None)
    os.makedirs(out_dir, exist_ok=True)
    # One independent stream per item, so adding videos never changes the images.
    seeds = np.random.SeedSequence(seed).spawn(num_images + num_videos)

    records = []
    for i in range(num_images + num_videos):
        is_video = i >= num_images
        j = i - num_images if is_video else i
        fam = fams[j % len(fams)]
        w, h = sizes[j % len(sizes)]
        f = frame_list[j % len(frame_list)] if is_video else 1
        rng = np.random.default_rng(seeds[i])
        frames, words = fam.render(rng, w, h, f)
        stem = f"{'vid' if is_video else 'img'}_{j:04d}_{fam.name}"
        name = stem + (".mp4" if is_video else ".png")
        path = os.path.join(out_dir, name)
        if is_video:
            write_video(path, frames, fps=fps, codec=codec)
        else:
            Image.fromarray(frames[0]).save(path)
        caption = fam.make_caption(words, use_trigger=use_triggers)
        records.append({
            "file_name": name, "text": caption, "family": fam.name,
            "trigger": fam.trigger if use_triggers else None,
            "media_type": "video" if is_video else "image", "width": w, "height": h, "num_frames": f,
        })
        if caption_format == "txt":
            with open(os.path.join(out_dir, stem + ".txt"), "w", encoding="utf-8") as fh:
                fh.write(caption + "\n")

    if caption_format == "jsonl":
        with open(os.path.join(out_dir, "metadata.jsonl"), "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({"file_name": r["file_name"], "text": r["text"], "family": r["family"]}) + "\n")
    elif caption_format == "csv":
        with open(os.path.join(out_dir, "metadata.csv"), "w", encoding="utf-8", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=["file_name", "text", "family"])
            wr.writeheader()
            for r in records:
                wr.writerow({"file_name": r["file_name"], "text": r["text"], "family": r["family"]})
    return records


def write_corrupt_file(path: Union[str, os.PathLike], kind: str = "truncated", seed: int = 0) -> str:
    """Write an undecodable media file for robustness tests and return its path.

    ``kind="truncated"``: a real file cut short. For ``.png`` the header survives (it opens,
    then fails to load pixels); for ``.mp4`` the trailing moov atom is lost (it fails to open).
    ``kind="garbage"``: random bytes under the file's extension.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    rng = np.random.default_rng(seed)
    if kind == "garbage":
        data = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    elif kind == "truncated":
        frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)  # noise: incompressible, big payload
        buf = io.BytesIO()
        if ext in (".png",):
            Image.fromarray(frames[0]).save(buf, format="PNG")
            data = buf.getvalue()
            data = data[: len(data) // 3]
        elif ext in (".mp4", ".mov", ".m4v"):
            write_video(buf, frames)
            data = buf.getvalue()
            data = data[: len(data) // 2]
        else:
            raise ValueError(f"kind='truncated' supports .png/.mp4/.mov/.m4v, got {ext!r}; use kind='garbage'")
    else:
        raise ValueError(f"kind={kind!r} is not supported; use 'truncated' or 'garbage'")
    with open(path, "wb") as fh:
        fh.write(data)
    return path
