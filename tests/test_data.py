"""slice_ft.corpus + slice_ft.data: synthetic corpus, caption sources, buckets, decoding,
robustness, determinism, sharding and exact resume."""

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from slice_ft.corpus import FAMILIES, generate_corpus, write_corrupt_file, write_video
from slice_ft.data import (
    Bucket,
    BucketConfig,
    BucketedLoader,
    build_dataset,
    frame_indices,
    load_clip,
    load_local_corpus,
    probe_media,
)

BUCKETS = BucketConfig([(48, 32), (32, 32)], [1, 5, 9])
# Mixed sizes and lengths: 7 frames -> F=5, 3 frames -> F=1 (largest allowed <= available).
CORPUS_KW = dict(num_images=8, num_videos=8, size=[(48, 32), (32, 32)], num_frames=[9, 7, 5, 3], seed=0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, generate_corpus(root, **CORPUS_KW)


def _loader(path, **kw):
    kw.setdefault("batch_size", 2)
    return BucketedLoader(build_dataset(path), BUCKETS, **kw)


def _sources(batches):
    return [os.path.basename(s) for b in batches for s in b["sources"]]


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_captioned(tmp_path, corpus):
    root, records = corpus
    again = generate_corpus(tmp_path / "again", **CORPUS_KW)
    assert again == records
    for r in records:
        a, b = (root / r["file_name"]).read_bytes(), (tmp_path / "again" / r["file_name"]).read_bytes()
        assert hashlib.sha1(a).digest() == hashlib.sha1(b).digest(), r["file_name"]
        fam = FAMILIES[r["family"]]
        assert r["text"].startswith(fam.trigger + " ")
        info = probe_media(str(root / r["file_name"]), None, r["media_type"])
        assert (info.width, info.height, info.num_frames) == (r["width"], r["height"], r["num_frames"])
    meta = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in meta] == [r["text"] for r in records]
    other = generate_corpus(tmp_path / "other", **{**CORPUS_KW, "seed": 1})
    assert (tmp_path / "other" / other[0]["file_name"]).read_bytes() != (root / records[0]["file_name"]).read_bytes()
    assert len({r["family"] for r in records}) == 3


def test_corpus_families_look_different(tmp_path):
    recs = generate_corpus(tmp_path, num_images=3, num_videos=0, seed=3, use_triggers=False)
    means = {}
    for r in recs:
        x = load_clip(str(tmp_path / r["file_name"]), None, "image", Bucket(48, 32, 1))
        means[r["family"]] = x.mean(dim=(1, 2, 3))  # per-channel mean
        assert not r["text"].startswith("sks_")
    assert means["red_circles"][0] > means["red_circles"][1]  # red dominates green
    assert means["blue_stripes"][2] > means["blue_stripes"][0]
    assert means["green_noise"][1] > means["green_noise"][0] and means["green_noise"][1] > means["green_noise"][2]


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_caption_sources_load(tmp_path, fmt):
    recs = generate_corpus(tmp_path, num_images=3, num_videos=3, num_frames=5, seed=2, caption_format=fmt)
    assert (tmp_path / {"jsonl": "metadata.jsonl", "csv": "metadata.csv", "txt": "img_0000_red_circles.txt"}[fmt]).exists()
    rows = list(load_local_corpus(tmp_path))
    got = {os.path.basename(r["media_path"]): (r["caption"], r["media_type"]) for r in rows}
    assert got == {r["file_name"]: (r["text"], r["media_type"]) for r in recs}


def test_metadata_without_caption_column_errors(tmp_path):
    generate_corpus(tmp_path, num_images=2, num_videos=0, seed=0, caption_format="none")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "img_0000_red_circles.png", "label": "x"}\n')
    with pytest.raises(ValueError, match="caption_column"):
        load_local_corpus(tmp_path)
    rows = list(load_local_corpus(tmp_path, caption_column="label"))
    assert {r["caption"] for r in rows} == {"x", None}  # the unlisted image has no caption


# ----------------------------------------------------------------------------- buckets + decoding


def test_batches_match_buckets_and_range(corpus):
    root, records = corpus
    by_name = {r["file_name"]: r for r in records}
    loader = _loader(root, seed=0)
    batches = list(loader)
    assert sorted(_sources(batches)) == sorted(by_name)  # every file exactly once
    for b in batches:
        bucket, x = b["bucket"], b["pixel_values"]
        assert x.dtype == torch.float32 and x.shape == (len(b["captions"]), 3, bucket.num_frames, bucket.height, bucket.width)
        assert (bucket.num_frames - 1) % 4 == 0 and bucket.num_frames in BUCKETS.frame_counts
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.5 and x.min() < -0.5
        for src, cap, cid, kind in zip(b["sources"], b["captions"], b["ids"], b["media_types"]):
            r = by_name[os.path.basename(src)]
            assert cap == r["text"] and kind == r["media_type"]
            assert cid == hashlib.sha1((root / r["file_name"]).read_bytes()).hexdigest()
            assert (bucket.width, bucket.height) == (r["width"], r["height"])
            expected_f = {1: 1, 3: 1, 5: 5, 7: 5, 9: 9}[r["num_frames"]]
            assert bucket.num_frames == expected_f
    assert loader.stats.yielded_items == len(records) and not loader.skipped


def test_frame_sampling_picks_expected_frames(tmp_path):
    n = 13
    frames = np.stack([np.full((32, 32, 3), 15 * t + 10, np.uint8) for t in range(n)])  # brightness encodes t
    path = str(tmp_path / "ramp.mp4")
    write_video(path, frames)
    assert frame_indices(13, 5) == [0, 3, 6, 9, 12]
    assert frame_indices(13, 5, frame_stride=2) == [2, 4, 6, 8, 10]  # centered window
    assert frame_indices(13, 1) == [6]
    for stride, idx in [(None, [0, 3, 6, 9, 12]), (2, [2, 4, 6, 8, 10])]:
        x = load_clip(path, None, "video", Bucket(32, 32, 5), frame_stride=stride)
        levels = ((x.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
        np.testing.assert_allclose(levels, [15 * t + 10 for t in idx], atol=3)
    # bytes input decodes the same as the path
    with open(path, "rb") as fh:
        assert torch.equal(load_clip(None, fh.read(), "video", Bucket(32, 32, 5)),
                           load_clip(path, None, "video", Bucket(32, 32, 5)))
    # With a stride, F must fit its span (F-1)*s+1 in the 13 frames: s=4 -> 17 > 13, so F falls to 1.
    assert BucketConfig([(32, 32)], [1, 5, 9]).assign(32, 32, 13, frame_stride=4) == Bucket(32, 32, 1)
    assert BucketConfig([(32, 32)], [1, 5, 9]).assign(32, 32, 13, frame_stride=3) == Bucket(32, 32, 5)


def test_resize_center_crop_and_aspect_assignment(tmp_path):
    from PIL import Image

    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 48:] = 255  # left half black, right half white
    Image.fromarray(arr).save(tmp_path / "wide.png")
    cfg = BucketConfig([(32, 32), (64, 32), (32, 64)], [1])
    assert cfg.assign(96, 32, 1) == Bucket(64, 32, 1)  # 3:1 is nearest to 2:1
    assert cfg.assign(30, 70, 1) == Bucket(32, 64, 1)
    x = load_clip(str(tmp_path / "wide.png"), None, "image", Bucket(32, 32, 1))  # crops x in [32, 64)
    assert x.shape == (3, 1, 32, 32)
    assert (x[:, :, :, :14] == -1).all() and (x[:, :, :, 18:] == 1).all()
    y = load_clip(str(tmp_path / "wide.png"), None, "image", Bucket(32, 64, 1))  # upscale to cover, crop
    assert y.shape == (3, 1, 64, 32) and y[:, :, :, :12].max() < -0.9 and y[:, :, :, 20:].min() > 0.9


@pytest.mark.parametrize("bucket", [Bucket(96, 64, 5), Bucket(48, 48, 5), Bucket(128, 96, 5)],
                         ids=["same_size", "crop_downscale", "crop_upscale"])
def test_video_frames_match_pil_reference_pixel_for_pixel(tmp_path, bucket):
    """load_clip's frame conversion (rgb24 array, PIL only when the size changes) gives exactly the pixels of
    PyAV's to_image() + ImageOps.fit(bicubic, centered); for a same-size bucket that fit is an identity."""
    import av
    from PIL import Image, ImageOps

    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 96, 3), dtype=np.uint8)  # texture: any drift shows
    path = str(tmp_path / "noise.mp4")
    write_video(path, frames)
    with av.open(path) as container:
        images = [f.to_image() for f in container.decode(video=0)]
    idx = frame_indices(len(images), bucket.num_frames)
    fit = [np.asarray(ImageOps.fit(images[i], bucket[:2], Image.BICUBIC, centering=(0.5, 0.5))) for i in idx]
    if bucket[:2] == images[0].size:  # the claim load_clip's skip of PIL rests on
        assert all(np.array_equal(a, np.asarray(images[i])) for a, i in zip(fit, idx))
    x = load_clip(path, None, "video", bucket)
    assert x.shape == (3, bucket.num_frames, bucket.height, bucket.width)
    got = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(got, np.stack(fit))


# ----------------------------------------------------------------------------- robustness


def test_corrupt_and_uncaptioned_files_are_skipped_and_counted(tmp_path, corpus, caplog):
    root, records = corpus
    shutil.copytree(root, tmp_path / "c")
    c = tmp_path / "c"
    for name in ("bad.mp4", "bad.png"):  # truncated: mp4 fails to open, png opens then fails to load
        write_corrupt_file(c / name)
        (c / name).with_suffix(".txt").write_text("a caption")
    write_corrupt_file(c / "junk.jpg", kind="garbage")
    (c / "junk.txt").write_text("junk caption")
    shutil.copy(root / records[0]["file_name"], c / "nocap.png")  # valid, but no caption anywhere
    with caplog.at_level(logging.WARNING, logger="slice_ft.data"):
        loader = _loader(c, seed=0, batch_size=3)
        batches = list(loader)
    assert sorted(_sources(batches)) == sorted(r["file_name"] for r in records)
    assert dict(loader.skipped) == {"unreadable": 2, "decode_error": 1, "no_caption": 1}
    assert loader.stats.seen == len(records) + 4
    logged = caplog.text
    for name in ("bad.mp4", "bad.png", "junk.jpg", "nocap.png"):
        assert name in logged


# ----------------------------------------------------------------------------- order, shards, resume


def test_same_seed_same_order_and_epochs_reshuffle(corpus):
    root, _ = corpus
    a = _sources(_loader(root, seed=7))
    b = _sources(_loader(root, seed=7, decode_threads=2))
    c = _sources(_loader(root, seed=8))
    assert a == b and sorted(a) == sorted(c) and a != c
    loader = _loader(root, seed=7)
    e0 = _sources(loader)
    assert _sources(loader) == e0  # re-iterating the same epoch repeats it
    loader.set_epoch(1)
    e1 = _sources(loader)
    assert sorted(e1) == sorted(e0) and e1 != e0


@pytest.mark.parametrize("num_shards", [16, 5])  # shard-wise and example-wise splitting
def test_split_by_node_gives_disjoint_covering_shards(corpus, num_shards):
    root, records = corpus
    parts = []
    for rank in range(2):
        ds = load_local_corpus(root, num_shards=num_shards)
        loader = BucketedLoader(ds, BUCKETS, batch_size=2, seed=3, rank=rank, world_size=2)
        loader.set_epoch(1)
        parts.append(_sources(loader))
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(r["file_name"] for r in records)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-decode-workers"])
def test_resume_yields_identical_batches(corpus, workers):
    """Also with DataLoader workers decoding ahead: the checkpoint counts the batches handed out, not the ones
    the workers have prefetched, so the resumed run continues exactly where the interrupted one stopped."""
    root, _ = corpus
    full = _loader(root, seed=5, num_workers=workers)
    full.set_epoch(2)
    ref = list(full)
    assert len(ref) >= 6

    first = _loader(root, seed=5, num_workers=workers)  # interrupted run: 3 batches, then checkpoint
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints round-trip through JSON
    assert state["epoch"] == 2 and state["batches_yielded"] == 3

    resumed = _loader(root, seed=5, num_workers=workers)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop calls this again: must keep the skip
    rest = list(resumed)
    assert [b["sources"] for b in seen + rest] == [b["sources"] for b in ref]
    for got, want in zip(seen + rest, ref):
        assert got["bucket"] == want["bucket"] and torch.equal(got["pixel_values"], want["pixel_values"])
    assert resumed.state_dict()["batches_yielded"] == len(ref)

    manual = _loader(root, seed=5)
    manual.set_epoch(2)
    manual.skip_batches(4)
    assert [b["ids"] for b in manual] == [b["ids"] for b in ref[4:]]
    manual.set_epoch(3)
    assert len(list(manual)) == len(ref)  # skip applied once only

    with pytest.raises(ValueError, match="batch_size"):
        _loader(root, seed=5, batch_size=3).load_state_dict(state)


# ----------------------------------------------------------------------------- load_dataset path


def test_build_dataset_through_load_dataset(tmp_path, corpus):
    """The non-folder path: datasets.load_dataset builders (as for hub names), undecoded."""
    root, records = corpus
    ds = build_dataset("videofolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    rows = list(ds)
    assert {os.path.basename(r["media_path"]): (r["media_type"], r["caption"]) for r in rows} == \
        {r["file_name"]: (r["media_type"], r["text"]) for r in records}

    # Byte columns (webdataset-like): one row per clip, media as raw bytes, caption in "txt".
    import datasets

    vids = [r for r in records if r["media_type"] == "video"][:3]
    datasets.Dataset.from_dict({
        "mp4": [(root / r["file_name"]).read_bytes() for r in vids],
        "txt": [r["text"] for r in vids],
    }).to_parquet(str(tmp_path / "clips.parquet"))
    ds = build_dataset("parquet", data_files=str(tmp_path / "clips.parquet"), video_column="mp4",
                       caption_column="txt", cache_dir=str(tmp_path / "cache"))
    batches = list(BucketedLoader(ds, BUCKETS, batch_size=1, shuffle=False))
    assert [b["captions"][0] for b in batches] == [r["text"] for r in vids]
    assert [b["ids"][0] for b in batches] == [hashlib.sha1((root / r["file_name"]).read_bytes()).hexdigest() for r in vids]
    assert all(b["pixel_values"].shape[2] > 1 for b in batches)
    with pytest.raises(ValueError, match="image_column"):
        build_dataset("parquet", data_files=str(tmp_path / "clips.parquet"), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(resolutions=[(48, 32)], frame_counts=[1, 4]), r"4k\+1"),
    (dict(resolutions=[(48, 32)], frame_counts=[0]), r"4k\+1"),
    (dict(resolutions=[(50, 32)], frame_counts=[1]), "divisible by 16"),
    (dict(resolutions=[], frame_counts=[1]), "non-empty"),
    (dict(resolutions=[(48, 32)], frame_counts=[]), "non-empty"),
    (dict(resolutions=[(48,)], frame_counts=[1]), "width, height"),
])
def test_bad_bucket_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketConfig(**kwargs)


def test_bucket_config_parsing_and_loader_args(corpus):
    cfg = BucketConfig.from_strings("832x480, 480x832", "17,1,5,5")
    assert cfg.resolutions == ((832, 480), (480, 832)) and cfg.frame_counts == (1, 5, 17)
    with pytest.raises(ValueError, match="4k\\+1"):
        BucketConfig.from_strings("832x480", "1,16")
    ds = build_dataset(corpus[0])
    for bad, match in [(dict(batch_size=0), "batch_size"), (dict(frame_stride=0), "frame_stride"),
                       (dict(rank=2, world_size=2), "rank")]:
        with pytest.raises(ValueError, match=match):
            BucketedLoader(ds, BUCKETS, **bad)


def test_skip_decode_leaves_cached_batches_undecoded_and_decodes_mixed_batches_whole(corpus, monkeypatch):
    import slice_ft.data as data

    root, _ = corpus
    full = list(_loader(root, shuffle=False))
    ids = [i for b in full for i in b["ids"]]
    cached = {i for b in full[::2] for i in b["ids"]} | {full[1]["ids"][0]}  # whole batches, and one mixed batch
    assert len(full[1]["ids"]) == 2
    asked = []

    def skip(cid, bucket):
        asked.append((cid, bucket))
        return cid in cached

    decoded = []
    real_load_clip = data.load_clip
    monkeypatch.setattr(data, "load_clip", lambda *a, **k: decoded.append(a[0]) or real_load_clip(*a, **k))
    batches = list(_loader(root, shuffle=False, skip_decode=skip))
    assert [b["ids"] for b in batches] == [b["ids"] for b in full]  # same order and membership
    assert {cid for cid, _ in asked} == set(ids) and all(isinstance(b, Bucket) for _, b in asked)
    for got, want in zip(batches, full):
        if set(got["ids"]) <= cached:
            assert got["pixel_values"] is None
        else:  # mixed or uncached: decoded whole, as without skip_decode
            assert torch.equal(got["pixel_values"], want["pixel_values"])
    n_undecoded = sum(len(b["ids"]) for b in batches if b["pixel_values"] is None)
    assert n_undecoded > 0 and len(decoded) == len(ids) - n_undecoded

    # everything cached: nothing is decoded at all; items come with no pixels
    decoded.clear()
    items = list(_loader(root, shuffle=False, skip_decode=lambda cid, b: True).iter_items())
    assert decoded == [] and len(items) == len(ids) and all(it.pixel_values is None for it in items)


def test_count_batches_probes_without_decoding(corpus, monkeypatch):
    import slice_ft.data as data

    root, _ = corpus
    expected = len(list(_loader(root, seed=4)))
    monkeypatch.setattr(data, "load_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    assert _loader(root, seed=4).count_batches() == expected


def test_several_datasets_are_used_together(tmp_path, corpus):
    root, records = corpus
    extra = generate_corpus(tmp_path / "replay", num_images=3, num_videos=1, size=[(48, 32)], num_frames=5, seed=9)
    both = BucketedLoader(build_dataset([root, tmp_path / "replay"]), BUCKETS, batch_size=1, shuffle=False)
    sources = {os.path.basename(os.path.dirname(s)) + "/" + os.path.basename(s) for b in both for s in b["sources"]}
    assert len(sources) == len(records) + len(extra)
    assert {s.split("/")[0] for s in sources} == {root.name, "replay"}
    alone = BucketedLoader(build_dataset([root]), BUCKETS, batch_size=1, shuffle=False)
    assert sum(1 for _ in alone) == len(records)  # a one-item list is that dataset
    with pytest.raises(ValueError, match="empty list"):
        build_dataset([])


def _numbered_video(path, num_frames=40, gop=4, size=(32, 48)):
    """A video whose frame k is a flat gray level 6k (tells frames apart after lossy coding), a keyframe every
    `gop` frames so that a seek lands mid-clip."""
    import av

    from slice_ft.corpus import pick_video_codec

    with av.open(str(path), "w") as out:
        stream = out.add_stream(pick_video_codec(), rate=8)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 6 * k, np.uint8), format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def test_seeking_decodes_the_same_frames_as_decoding_from_frame_0(tmp_path, monkeypatch):
    import av

    from slice_ft import data as data_mod
    from slice_ft.data import Bucket, _frames_from, load_clip

    path = _numbered_video(tmp_path / "numbered.mp4")
    with av.open(path) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(path) as container:  # the seek lands on a keyframe after frame 0, at or before the wanted frame
        index, frame = next(_frames_from(container, container.streams.video[0], 29))
    assert 0 < index <= 29 and np.array_equal(frame.to_ndarray(format="rgb24"), every[index])

    bucket = Bucket(48, 32, 5)
    seeking = load_clip(path, None, "video", bucket, frame_stride=3)  # frames 14, 17, ..., 26: mid-clip
    full_decode = lambda container, stream, first: enumerate(container.decode(stream))  # noqa: E731
    monkeypatch.setattr(data_mod, "_frames_from", full_decode)
    assert torch.equal(seeking, load_clip(path, None, "video", bucket, frame_stride=3))
    levels = seeking.mean(dim=(0, 2, 3))
    assert torch.all(levels[1:] > levels[:-1] + 0.05)  # five different frames, in order
