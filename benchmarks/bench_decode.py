"""Video decoding for the loader: PyAV (load_clip's decoder) against torchcodec (`datasets`' Video feature's), per clip.

One 832x480 training clip of 81 frames decoded to uint8 RGB by each. Two test videos are written with PyAV (libx264,
yuv420p, 30 fps, libx264's default keyframe interval of 250): an 81-frame clip decoded whole, and a 600-frame video
from which frames 300..380 are taken (the seek path: both decoders seek to the keyframe before frame 300 and decode
from there). Every frame carries its index as a block code, so each
decoder's frames are checked to be the right ones, and torchcodec's are compared with PyAV's pixel by pixel.

*PyAV*: `slice_ft.data.rgb_frames`, load_clip's decode (its seek and frame counting, and
`frame.to_ndarray(format="rgb24", threads=1)` per wanted frame), without the resize (the bucket size is the video's).
*torchcodec*: `VideoDecoder(path, device="cpu", dimension_order="NHWC", seek_mode=..., num_ffmpeg_threads=...)
.get_frames_in_range(start, stop)`, seek modes "exact" (scans the file first) and "approximate". Each call opens the
file afresh, as a loader does per clip. Both decode with `--decoder-threads` FFmpeg threads (default 1); *PyAV,
FFmpeg's threads* is load_clip exactly as it runs (the decoder's thread count left to FFmpeg). Rounds are interleaved,
the order rotated each round; medians over rounds.

torchcodec's PyPI wheel needs FFmpeg's shared libraries (4-8) on the system and a torch build matching its own (the
wheel links torch's CUDA libraries): where it cannot be imported the reason is recorded and PyAV is still measured.

    /tmp/tcvenv/bin/python benchmarks/bench_decode.py --output benchmarks/results/cpu/decode.json
    python benchmarks/bench_decode.py --smoke --output /tmp/decode_smoke.json

(the venv: `python -m venv /tmp/tcvenv && /tmp/tcvenv/bin/pip install torch torchcodec && /tmp/tcvenv/bin/pip install
-e .`, on a machine with FFmpeg's shared libraries, e.g. `apt-get install ffmpeg`)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FPS = 30
BITS = 10  # frame-index code: BITS blocks along the top-left edge, white = 1
# cases: (name, frames in the video, first and last frame decoded); gop None = libx264's default (250)
FULL = dict(width=832, height=480, gop=None, repeats=7,
            cases=(("81-frame clip, whole", 81, 0, 80), ("600-frame video, frames 300-380 (seek)", 600, 300, 380)))
SMOKE = dict(width=160, height=96, gop=8, repeats=2,
             cases=(("9-frame clip, whole", 9, 0, 8), ("40-frame video, frames 20-28 (seek)", 40, 20, 28)))
METHODS = ("pyav", "pyav_ffmpeg_threads", "torchcodec_exact", "torchcodec_approximate")


# -- test videos --------------------------------------------------------------------------------------------------
def _block(width: int) -> int:
    return min(32, width // BITS)


def make_frame(i: int, width: int, height: int):
    """A textured moving frame (gradients, a moving disc, fixed-seed grain: work for the encoder) with index `i`
    written as a block code in its top-left corner."""
    import numpy as np

    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    t = i / FPS
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 127 + 100 * np.sin(2 * np.pi * (x / 160 + t * 0.7))
    img[..., 1] = 127 + 100 * np.sin(2 * np.pi * (y / 90 - t * 0.5) + x / 300)
    img[..., 2] = 127 + 100 * np.sin(2 * np.pi * ((x + y) / 220 + t * 0.3))
    cx, cy = width / 2 + 0.36 * width * np.sin(t), height / 2 + 0.3 * height * np.cos(1.3 * t)
    img[((x - cx) ** 2 + (y - cy) ** 2) < (0.07 * width) ** 2] = (240, 240, 40)
    img += np.random.default_rng(i).normal(0, 6, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    b = _block(width)
    for k in range(BITS):
        img[:b, k * b:(k + 1) * b] = 255 if (i >> k) & 1 else 0
    return img


def read_index(rgb) -> int:
    """The index a decoded frame carries (the mean of each block's inner half)."""
    b = _block(rgb.shape[1])
    q = b // 4
    return sum(1 << k for k in range(BITS) if rgb[q:b - q, k * b + q:(k + 1) * b - q].mean() > 127)


def make_video(path: str, frames: int, width: int, height: int, gop: int | None) -> dict:
    """Encode `frames` frames with libx264 (yuv420p, 30 fps); returns what the container says about it."""
    import av

    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.options = {"g": str(gop)}
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(make_frame(i, width, height), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        keyframes = sorted(round(float((p.pts - start) * base * rate)) for p in container.demux(stream)
                           if p.is_keyframe and p.pts is not None)
        return {"frames": stream.frames, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "fps": str(stream.average_rate), "keyframes": keyframes, "bytes": os.path.getsize(path)}


# -- decoders -----------------------------------------------------------------------------------------------------
def pyav_clip(path: str, first: int, last: int, threads: int | None):
    """load_clip's video decode up to uint8 RGB: its stream settings and `slice_ft.data.rgb_frames`.
    `threads` sets the decoder's FFmpeg thread count; None leaves it as load_clip does (FFmpeg chooses)."""
    import av
    import numpy as np

    from slice_ft.data import rgb_frames

    wanted = list(range(first, last + 1))
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as load_clip
        if threads is not None:
            stream.codec_context.thread_count = threads
        for rgb, count in rgb_frames(container, stream, wanted):
            frames.extend([rgb] * count)
    if len(frames) != len(wanted):
        raise RuntimeError(f"PyAV decoded {len(frames)} of {len(wanted)} frames of {path}")
    return np.stack(frames)


def torchcodec_clip(path: str, first: int, last: int, threads: int, seek_mode: str):
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, device="cpu", dimension_order="NHWC", seek_mode=seek_mode,
                           num_ffmpeg_threads=threads)
    return decoder.get_frames_in_range(first, last + 1).data.numpy()


def import_torchcodec() -> tuple[dict, str | None]:
    """(torchcodec's and its FFmpeg's versions, None), or ({}, why it cannot be imported: the error's first line)."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads torchcodec's core and FFmpeg libraries)
    except Exception as e:  # ImportError, or RuntimeError/OSError from loading its shared libraries
        return {}, _first_line(e)
    versions = {"torchcodec": torchcodec.__version__}
    try:
        from torchcodec import _core

        if hasattr(_core, "get_ffmpeg_library_versions"):
            versions["torchcodec_ffmpeg"] = dict(_core.get_ffmpeg_library_versions())
    except Exception as e:
        versions["torchcodec_ffmpeg"] = f"unknown ({_first_line(e)})"
    return versions, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def loaded_libavcodec() -> list[str]:
    """The libavcodec files mapped into this process (PyAV's bundled one, torchcodec's system one)."""
    try:
        with open("/proc/self/maps") as fh:
            return sorted({os.path.basename(line.split()[-1]) for line in fh if "libavcodec" in line})
    except OSError:
        return []


def versions() -> dict:
    import av
    import numpy as np
    import torch

    return {"torch": torch.__version__, "numpy": np.__version__, "av": av.__version__,
            "av_ffmpeg": getattr(av, "ffmpeg_version_info", None),
            "av_libraries": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}}


# -- checks and timing --------------------------------------------------------------------------------------------
def check(frames, reference, first: int, last: int) -> dict:
    """Shape, pixel difference to PyAV's frames, and whether each frame carries the index it should."""
    import numpy as np

    out = {"shape": list(frames.shape),
           "indices_ok": [read_index(f) for f in frames] == [i % (1 << BITS) for i in range(first, last + 1)]}
    if reference is not None:
        same_shape = frames.shape == reference.shape
        diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16)) if same_shape else None
        out.update(shape_equal=same_shape, max_abs_diff=None if diff is None else int(diff.max()),
                   mean_abs_diff=None if diff is None else float(diff.mean()))
    return out


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0], rows=False)
    parser.add_argument("--decoder-threads", type=int, default=1,
                        help="FFmpeg decoder threads for PyAV and torchcodec alike (0: FFmpeg chooses).")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    repeats = args.repeats or size["repeats"]
    import torch

    torch_threads = torch.get_num_threads()  # restored at the end: run_all's smoke runs benchmarks in one process
    torch.set_num_threads(args.threads)
    try:
        _run(args, size, repeats)
    finally:
        torch.set_num_threads(torch_threads)


def _run(args, size: dict, repeats: int) -> None:
    tc_versions, tc_error = import_torchcodec()
    if tc_error:
        print(f"decode: torchcodec not measured: {tc_error}", flush=True)
    threads = args.decoder_threads
    methods = {
        "pyav": lambda p, a, b: pyav_clip(p, a, b, threads),
        "pyav_ffmpeg_threads": lambda p, a, b: pyav_clip(p, a, b, None),
        "torchcodec_exact": lambda p, a, b: torchcodec_clip(p, a, b, threads, "exact"),
        "torchcodec_approximate": lambda p, a, b: torchcodec_clip(p, a, b, threads, "approximate"),
    }
    if tc_error:
        methods = {k: v for k, v in methods.items() if not k.startswith("torchcodec")}
    errors = {}
    cases = []
    with tempfile.TemporaryDirectory(prefix="slice_ft_bench_decode_") as tmp:
        for k, (name, n_frames, first, last) in enumerate(size["cases"]):
            path = os.path.join(tmp, f"video{k}_{n_frames}.mp4")
            t0 = time.perf_counter()
            video = make_video(path, n_frames, size["width"], size["height"], size["gop"])
            seek_from = max((f for f in video["keyframes"] if f <= first), default=0)
            print(f"decode: {name}: {video['frames']} frames, keyframes {video['keyframes']}, "
                  f"{video['bytes'] / 1e6:.2f} MB (written in {time.perf_counter() - t0:.1f} s)", flush=True)
            reference = methods["pyav"](path, first, last)  # also the warm-up call
            checks = {"pyav": check(reference, None, first, last)}
            live = {}
            for m, fn in methods.items():
                try:
                    frames = reference if m == "pyav" else fn(path, first, last)  # warm-up and check
                except Exception as e:  # e.g. torchcodec imports but cannot open a decoder
                    errors[m] = _first_line(e)
                    print(f"decode: {m} failed: {errors[m]}", flush=True)
                    continue
                if m != "pyav":
                    checks[m] = check(frames, reference, first, last)
                live[m] = fn
            names = list(live)
            times = {m: [] for m in names}
            for r in range(repeats):
                for m in names[r % len(names):] + names[:r % len(names)]:  # order rotated each round
                    t0 = time.perf_counter()
                    live[m](path, first, last)
                    times[m].append(time.perf_counter() - t0)
                print(f"decode: {name}: round {r + 1}/{repeats}: "
                      + ", ".join(f"{m} {times[m][-1] * 1e3:.0f} ms" for m in names), flush=True)
            base = times["pyav"]
            results = {}
            for m in names:
                results[m] = {"s_per_clip": common.Summary.of(times[m]).as_dict(),
                              "x_pyav": common.Summary.of([t / b for t, b in zip(times[m], base)]).as_dict(),
                              "times_s": times[m], "check": checks[m]}
            cases.append({"name": name, "video": video, "first": first, "last": last, "frames": last - first + 1,
                          "seek_keyframe": seek_from, "results": results})
    common.write_result(
        args.output, "decode", args.smoke,
        setup={"width": size["width"], "height": size["height"], "fps": FPS, "gop": size["gop"] or 250,
               "encoder": "libx264 yuv420p (PyAV)", "repeats": repeats, "decoder_threads": threads,
               "torch_threads": args.threads, "methods": list(METHODS)},
        versions={**versions(), **tc_versions, "libavcodec_loaded": loaded_libavcodec()},
        torchcodec_error=tc_error, method_errors=errors, cases=cases,
    )
    print(f"decode: wrote {args.output}", flush=True)


if __name__ == "__main__":
    main()
