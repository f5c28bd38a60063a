"""Tiny offline Wan components, Wan <-> diffusers key names, and transformer loading/saving."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open
from transformers import UMT5EncoderModel

from slice_adapter.keys import (
    PREFIXES,
    detect_key_format,
    diffusers_to_wan,
    from_diffusers_state_dict,
    to_diffusers_state_dict,
    wan_to_diffusers,
)
from slice_adapter.wan_configs import WAN_CONFIGS, build_meta_transformer
from slice_ft.models import load_transformer, save_transformer_state_dict
from slice_ft.tiny import (
    TINY_MAX_SEQUENCE_LENGTH,
    build_tiny_components,
    build_tiny_pipeline,
    build_tiny_transformer,
    save_tiny_pipeline,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER = dict(num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np",
              max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, negative_prompt="blurry")
# Weights loaded from safetensors are mmap'd at other alignments than freshly built ones, and CPU matmul kernels
# pick their reduction order by alignment: outputs then differ by ~1e-7 although every weight is bit-identical.
ATOL = 1e-5


def render(pipe, prompt="a small red circle moving right slowly on a dark background", seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **RENDER).frames


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: extra intra-op threads only spin, and are very slow when other processes share the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(seed=0)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- tiny components


def test_tiny_components_are_consistent_and_seeded():
    c = build_tiny_components(seed=0)
    tr, vae, te, tok = c["transformer"], c["vae"], c["text_encoder"], c["tokenizer"]
    assert isinstance(tr, WanTransformer3DModel) and isinstance(vae, AutoencoderKLWan)
    assert isinstance(te, UMT5EncoderModel) and isinstance(c["scheduler"], UniPCMultistepScheduler)
    assert c["scheduler"].config.prediction_type == "flow_prediction" and c["scheduler"].config.use_flow_sigmas
    assert tr.config.in_channels == tr.config.out_channels == vae.config.z_dim
    assert tr.config.text_dim == te.config.d_model
    assert tr.config.num_attention_heads * tr.config.attention_head_dim == 32
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.z_dim
    assert set(vae.config.latents_mean) != {0.0} and set(vae.config.latents_std) != {1.0}
    assert (tok.pad_token_id, tok.eos_token_id) == (te.config.pad_token_id, te.config.eos_token_id)
    assert te.config.vocab_size == len(tok)
    # Same call as WanPipeline._get_t5_prompt_embeds.
    enc = tok(["sks_a a red circle, zebra"], padding="max_length", max_length=10, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids = enc.input_ids[0].tolist()
    assert tok.convert_ids_to_tokens(ids[:7]) == ["sks_a", "a", "red", "circle", ",", "<unk>", "</s>"]
    assert ids[7:] == [tok.pad_token_id] * 3 and enc.attention_mask[0].tolist() == [1] * 7 + [0] * 3
    assert_same_weights(tr, build_tiny_transformer(seed=0))
    other = build_tiny_transformer(seed=1).state_dict()
    assert not torch.equal(tr.state_dict()["blocks.0.attn1.to_q.weight"], other["blocks.0.attn1.to_q.weight"])
    assert build_tiny_transformer(num_layers=1).config.num_layers == 1


def test_tiny_pipeline_renders_fast_and_uses_the_prompt(tiny_pipe):
    render(tiny_pipe)  # warm-up
    # CPU time, not wall time: other test processes may share the cores. ~0.1-0.3 s when unloaded.
    t0 = time.process_time()
    a = render(tiny_pipe)
    assert time.process_time() - t0 < 10.0
    assert a.shape == (1, 5, 32, 32, 3) and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, render(tiny_pipe))
    assert np.abs(a - render(tiny_pipe, prompt="wide blue stripes scrolling down")).max() > 1e-4
    assert np.abs(a - render(tiny_pipe, seed=1)).max() > 1e-4


def test_saved_pipeline_reloads_offline_with_same_outputs(tiny_dir, tiny_pipe):
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_dir, sub)), sub
    index = json.load(open(os.path.join(tiny_dir, "model_index.json")))
    assert index["_class_name"] == "WanPipeline"
    loaded = WanPipeline.from_pretrained(tiny_dir, local_files_only=True)
    for name in ("transformer", "vae", "text_encoder"):
        assert_same_weights(getattr(tiny_pipe, name), getattr(loaded, name))
    caption = "sks_b thin blue stripes scrolling down quickly over a white background"
    kw = dict(padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(tiny_pipe.tokenizer(caption, **kw).input_ids, loaded.tokenizer(caption, **kw).input_ids)
    np.testing.assert_allclose(render(loaded), render(tiny_pipe), atol=ATOL, rtol=0)


def test_save_tiny_pipeline_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        save_tiny_pipeline(tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_make_tiny_wan_cli(tmp_path):
    script = os.path.join(REPO, "scripts", "make_tiny_wan.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--seed" in out and "DIR" in out
    import runpy

    main = runpy.run_path(script)["main"]
    assert main([str(tmp_path / "p"), "--seed", "1"]) == 0
    tr = WanTransformer3DModel.from_pretrained(tmp_path / "p", subfolder="transformer")
    assert_same_weights(tr, build_tiny_transformer(seed=1))


# ---------------------------------------------------------------- key names

_CONFIGS = dict(WAN_CONFIGS)
# FLF2V (2.1 first-last-frame) adds the image position embedding `img_emb.emb_pos`.
_CONFIGS["wan2.1-flf2v-14b"] = dict(WAN_CONFIGS["wan2.1-i2v-14b"], pos_embed_seq_len=257 * 2)


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_key_mapping_is_a_bijection_matching_diffusers(name):
    sd = build_meta_transformer(_CONFIGS[name]).state_dict()
    names = list(sd)
    wan = [diffusers_to_wan(n) for n in names]
    assert len(set(wan)) == len(names)
    assert [wan_to_diffusers(w) for w in wan] == names
    # Every name changes format except the patch embedding, so detection is unambiguous.
    assert {n for n, w in zip(names, wan) if n == w} == {"patch_embedding.weight", "patch_embedding.bias"}
    for n, w in zip(names, wan):
        if n != w:  # neither format's names pass as the other's
            with pytest.raises(ValueError):
                diffusers_to_wan(w)
            with pytest.raises(ValueError):
                wan_to_diffusers(n)
    # diffusers' own single-file converter is the authority (FLF2V's emb_pos is the one name it leaves as is).
    converted = convert_wan_transformer_to_diffusers({"model.diffusion_model." + w: i for i, w in enumerate(wan)})
    unmapped = {"img_emb.emb_pos"} if "flf2v" in name else set()
    assert converted == {(w if w in unmapped else n): i for i, (n, w) in enumerate(zip(names, wan))}
    for prefix in PREFIXES:
        assert detect_key_format([prefix + w for w in wan]) == ("wan", prefix)
    assert detect_key_format(names) == ("diffusers", "")
    # Same tensor shapes in both formats: Wan's modulation tables are (1, 6, dim) per block, (1, 2, dim) in the head.
    dim = _CONFIGS[name]["num_attention_heads"] * _CONFIGS[name]["attention_head_dim"]
    wan_shape = {w: tuple(sd[n].shape) for n, w in zip(names, wan)}
    assert wan_shape["blocks.0.modulation"] == (1, 6, dim) and wan_shape["head.modulation"] == (1, 2, dim)


def test_key_mapping_spot_checks():
    pairs = {
        "blocks.3.attn1.to_q.weight": "blocks.3.self_attn.q.weight",
        "blocks.3.attn1.norm_q.weight": "blocks.3.self_attn.norm_q.weight",
        "blocks.3.attn2.to_k.bias": "blocks.3.cross_attn.k.bias",
        "blocks.3.attn2.to_out.0.weight": "blocks.3.cross_attn.o.weight",
        "blocks.3.attn2.add_v_proj.weight": "blocks.3.cross_attn.v_img.weight",
        "blocks.3.attn2.norm_added_k.weight": "blocks.3.cross_attn.norm_k_img.weight",
        "blocks.3.ffn.net.0.proj.weight": "blocks.3.ffn.0.weight",
        "blocks.3.ffn.net.2.bias": "blocks.3.ffn.2.bias",
        "blocks.3.norm2.weight": "blocks.3.norm3.weight",
        "blocks.3.scale_shift_table": "blocks.3.modulation",
        "scale_shift_table": "head.modulation",
        "proj_out.weight": "head.head.weight",
        "condition_embedder.text_embedder.linear_2.bias": "text_embedding.2.bias",
        "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
        "condition_embedder.time_proj.weight": "time_projection.1.weight",
        "condition_embedder.image_embedder.ff.net.2.weight": "img_emb.proj.3.weight",
    }
    for d, w in pairs.items():
        assert (diffusers_to_wan(d), wan_to_diffusers(w)) == (w, d)


def test_unknown_keys_raise_naming_the_key():
    with pytest.raises(ValueError, match=r"blocks\.0\.self_attn\.qq\.weight"):
        wan_to_diffusers("blocks.0.self_attn.qq.weight")
    with pytest.raises(ValueError, match=r"'blocks\.0\.self_attn\.q\.weight'.*wan-format name"):
        diffusers_to_wan("blocks.0.self_attn.q.weight")
    with pytest.raises(ValueError, match="model.diffusion_model.blocks.0.modulation"):
        wan_to_diffusers("model.diffusion_model.blocks.0.modulation")
    lora = "diffusion_model.blocks.0.self_attn.q.lora_A.weight"
    with pytest.raises(ValueError, match=r"neither.*" + lora.replace(".", r"\.")):
        detect_key_format(["diffusion_model.blocks.0.self_attn.q.weight", lora])
    with pytest.raises(ValueError, match="mixes formats"):
        detect_key_format(["blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"])
    with pytest.raises(ValueError, match="prefixed and unprefixed"):
        detect_key_format(["model.diffusion_model.head.modulation", "head.head.weight"])
    with pytest.raises(ValueError, match="no keys"):
        detect_key_format([])
    with pytest.raises(ValueError, match="'comfy'"):
        from_diffusers_state_dict({"proj_out.weight": 0}, "comfy")
    with pytest.raises(ValueError, match="'blocks.0.self_attn.q.weight'"):
        from_diffusers_state_dict({"blocks.0.self_attn.q.weight": 0}, "diffusers")


def test_state_dict_helpers_round_trip():
    sd = {k: i for i, k in enumerate(build_tiny_transformer().state_dict())}
    for fmt in ("wan", "diffusers"):
        for prefix in PREFIXES:
            if fmt == "diffusers" and prefix:
                continue
            out = from_diffusers_state_dict(sd, fmt, prefix)
            assert detect_key_format(out) == (fmt, prefix)
            assert to_diffusers_state_dict(out) == sd


def test_keys_module_needs_no_torch_or_diffusers():
    # Load the file alone with torch/diffusers made unimportable: it must stay a pure name mapping.
    code = (
        "import sys, importlib.util\n"
        "for m in ('torch', 'diffusers', 'transformers', 'safetensors'): sys.modules[m] = None\n"
        f"spec = importlib.util.spec_from_file_location('k', {os.path.join(REPO, 'slice_adapter', 'files', 'keys.py')!r})\n"
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)\n"
        "print(k.diffusers_to_wan('blocks.0.norm2.weight'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "blocks.0.norm3.weight"


# ---------------------------------------------------------------- loading / saving


def _forward(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    text = torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), text, return_dict=False)[0]


@pytest.mark.parametrize(
    "fmt,prefix", [("wan", ""), ("wan", "model.diffusion_model."), ("wan", "diffusion_model."), ("diffusers", "")]
)
def test_single_file_loads_identically_and_saves_back(tmp_path, tiny_dir, tiny_pipe, fmt, prefix):
    original = tiny_pipe.transformer
    path = save_transformer_state_dict(original.state_dict(), tmp_path / "w.safetensors", fmt, prefix,
                                       metadata={"origin": "test"})
    with safe_open(path, framework="pt") as f:
        file_keys, meta = sorted(f.keys()), f.metadata()
    assert meta == {"format": "pt", "origin": "test"}
    assert detect_key_format(file_keys) == (fmt, prefix)
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or p.endswith(".tmp")]

    model, info = load_transformer(tiny_dir, transformer_file=path)
    assert (info["kind"], info["key_format"], info["prefix"]) == ("single_file", fmt, prefix)
    assert info["transformer_file"] == path and info["metadata"]["origin"] == "test"
    assert_same_weights(original, model)
    torch.testing.assert_close(_forward(model), _forward(original), atol=ATOL, rtol=0)

    # Saved back in the recorded format, the file has exactly the original's keys and tensors.
    again = save_transformer_state_dict(model.state_dict(), tmp_path / "again.safetensors",
                                        info["key_format"], info["prefix"])
    with safe_open(path, framework="pt") as a, safe_open(again, framework="pt") as b:
        assert sorted(b.keys()) == file_keys
        for k in file_keys:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_load_transformer_config_sources(tmp_path, tiny_dir, tiny_pipe):
    original = tiny_pipe.transformer
    model, info = load_transformer(tiny_dir)
    assert (info["kind"], info["key_format"], info["subfolder"]) == ("pretrained", "diffusers", "transformer")
    assert_same_weights(original, model)
    model, info = load_transformer(os.path.join(tiny_dir, "transformer"), torch_dtype=torch.bfloat16)
    assert info["subfolder"] is None and model.dtype == torch.bfloat16

    path = save_transformer_state_dict(original.state_dict(), tmp_path / "w.safetensors", "wan", "")
    for config in (os.path.join(tiny_dir, "transformer"), dict(original.config)):
        model, info = load_transformer(None, transformer_file=path, config=config)
        assert_same_weights(original, model)
    # A .pt checkpoint in Wan keys goes through diffusers' loader too.
    pt = tmp_path / "w.pt"
    torch.save(from_diffusers_state_dict(original.state_dict(), "wan", "model.diffusion_model."), pt)
    model, info = load_transformer(tiny_dir, transformer_file=pt)
    assert info["prefix"] == "model.diffusion_model." and info["metadata"] is None
    assert_same_weights(original, model)


def test_load_transformer_errors(tmp_path, tiny_dir, tiny_pipe):
    path = save_transformer_state_dict(tiny_pipe.transformer.state_dict(), tmp_path / "w.safetensors", "wan", "")
    with pytest.raises(ValueError, match="needs a config"):
        load_transformer(None, transformer_file=path)
    with pytest.raises(ValueError, match="does not exist"):
        load_transformer(tiny_dir, transformer_file=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a file"):
        load_transformer(path)
    with pytest.raises(ValueError, match=r"does not match.*unexpected \['blocks\.1\."):
        load_transformer(None, transformer_file=path, config=dict(tiny_pipe.transformer.config, num_layers=1))
    with pytest.raises(ValueError, match="no transformer config"):
        load_transformer(None, transformer_file=path, config=str(tmp_path))
    bad = dict(tiny_pipe.transformer.state_dict())
    bad["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="lora_A"):
        save_transformer_state_dict(bad, tmp_path / "bad.safetensors", "wan", "")
    assert not os.path.exists(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="str to str"):
        save_transformer_state_dict({}, tmp_path / "m.safetensors", "wan", "", metadata={"n": 1})


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_i2v_and_flf2v_keys_load(tmp_path, prefix):
    # Tiny I2V (k_img/v_img/norm_k_img, img_emb.proj.*) and FLF2V (img_emb.emb_pos, which diffusers' converter skips).
    for extra in (dict(), dict(pos_embed_seq_len=8)):
        cfg = dict(image_dim=16, added_kv_proj_dim=32, in_channels=8, **extra)
        original = build_tiny_transformer(seed=2, **cfg)
        path = save_transformer_state_dict(original.state_dict(), tmp_path / "i2v.safetensors", "wan", prefix)
        model, info = load_transformer(None, transformer_file=path, config=dict(original.config))
        assert (info["key_format"], info["prefix"]) == ("wan", prefix)
        assert_same_weights(original, model)
