"""Tiny, randomly initialised Wan components built offline from configs (for tests and smoke runs)."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .choices import TINY_MAX_SEQUENCE_LENGTH  # noqa: F401 (tiny's text length, re-exported)

# Special tokens follow T5/UMT5 ids: pad=0, eos=1, unk=2.
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"

# Words our generated captions and test prompts use; anything else maps to <unk>.
TINY_VOCAB_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and with on in at to from over under into onto is are moving moves move slowly quickly fast slow
    left right up down around across toward away circle circles square squares triangle triangles disk disks ball
    balls dot dots box boxes line lines stripe stripes shape shapes object objects background foreground scene video
    clip frame frames camera pans zooms static still bouncing bounces rotating rotates spinning spins sliding slides
    falling falls rising rises growing grows shrinking shrinks blinking fading appears disappears
    red green blue yellow white black gray grey orange purple pink cyan magenta brown dark light bright colored
    small large big tiny medium one two three four five many single pair
    cat dog person car bird tree sky sea water sun moon house road city forest
    photo style cinematic high quality low blurry noisy sharp detailed
    scrolling scrolls thin wide thick flickering flickers fine coarse noise soft hard gradient gradients sweeping sweeps
    sks sks_a sks_b sks_c sks_d sks_e sks_f 0 1 2 3 4 5 6 7 8 9
    , . ! ? - ' "
    """.split()
)

TINY_TEXT_DIM = 32
TINY_Z_DIM = 4

TINY_TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=TINY_Z_DIM,
    out_channels=TINY_Z_DIM,
    text_dim=TINY_TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

TINY_VAE_CONFIG: dict = dict(
    base_dim=8,
    z_dim=TINY_Z_DIM,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    # Non-trivial so latent (de)normalisation is actually exercised.
    latents_mean=[0.25, -0.5, 0.75, -0.125],
    latents_std=[1.5, 0.5, 2.0, 0.8],
)

TINY_UMT5_CONFIG: dict = dict(
    d_model=TINY_TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

TINY_SCHEDULER_CONFIG: dict = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    num_train_timesteps=1000,
)


def build_tiny_transformer(seed: int = 0, **overrides):
    """A tiny `WanTransformer3DModel`; `overrides` replace entries of `TINY_TRANSFORMER_CONFIG`."""
    from diffusers import WanTransformer3DModel

    config = dict(TINY_TRANSFORMER_CONFIG, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    return model.eval()


def build_tiny_vae(seed: int = 0):
    """A tiny `AutoencoderKLWan` (z_dim 4, 8x spatial / 4x temporal compression like the real one)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    return vae.eval()


def build_tiny_tokenizer():
    """A word-level UMT5-compatible fast tokenizer built offline with `tokenizers` (appends </s> like T5)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    for word in TINY_VOCAB_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Words (\w keeps trigger tokens like "sks_a" whole) or single punctuation marks.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=512,
        padding_side="right",
    )


def build_tiny_text_encoder(seed: int = 0):
    """A tiny `UMT5EncoderModel` and its tokenizer (vocab size = tokenizer length)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return model.eval(), tokenizer


def build_tiny_scheduler():
    """The scheduler diffusers' Wan pipelines ship with (UniPC in flow mode, shift 3)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG)


def build_tiny_components(seed: int = 0) -> dict:
    """transformer, vae, text_encoder, tokenizer, scheduler, all deterministic in `seed`."""
    text_encoder, tokenizer = build_tiny_text_encoder(seed)
    return dict(
        transformer=build_tiny_transformer(seed),
        vae=build_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_tiny_scheduler(),
    )


def build_tiny_pipeline(seed: int = 0):
    """A tiny `WanPipeline` (text-to-video); render with e.g. num_frames=5, height=width=32."""
    from diffusers import WanPipeline

    return WanPipeline(**build_tiny_components(seed))


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a diffusers pipeline folder loadable offline with `WanPipeline.from_pretrained(path)`.

    Written to a sibling temp folder and renamed into place so a half-written pipeline is never seen.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"save_tiny_pipeline: {path!r} exists and is not an empty folder; pass a new or empty path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny_wan_", dir=parent)
    try:
        build_tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        if os.path.isdir(path):
            os.rmdir(path)  # empty; os.replace cannot overwrite a directory
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
