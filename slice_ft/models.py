"""Load a Wan transformer from a diffusers folder or a single-file checkpoint, and save one back in its format."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

import torch

from slice_adapter.files.keys import KEY_FORMATS, PREFIXES, detect_key_format, from_diffusers_state_dict, wan_to_diffusers

_CONFIG_NAME = "config.json"


def _config_location(root: str, subfolder: str | None) -> tuple[str, str | None]:
    """(folder, subfolder or None) holding the transformer's config.json: a pipeline folder or a model folder."""
    if subfolder and os.path.isfile(os.path.join(root, subfolder, _CONFIG_NAME)):
        return root, subfolder
    if os.path.isfile(os.path.join(root, _CONFIG_NAME)):
        return root, None
    raise ValueError(
        f"no transformer config found at {root!r}: neither {os.path.join(root, subfolder or '', _CONFIG_NAME)!r} "
        f"nor {os.path.join(root, _CONFIG_NAME)!r} exists; pass a diffusers pipeline folder, a transformer folder "
        f"with config.json, a config dict or a published model name (slice_adapter.wan_configs)"
    )


def _checkpoint_keys(path: str) -> tuple[list[str], dict | None, dict | None]:
    """(keys, safetensors metadata, loaded state dict or None); safetensors keys come from the header alone."""
    if path.endswith(".safetensors"):
        from slice_adapter.files.safetensors_stream import read_header

        entries, metadata = read_header(path)  # names the file when it is truncated or damaged
        return list(entries), metadata, None
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        sd = load_single_file_checkpoint(path, local_files_only=True)
    except Exception as err:  # torch.load's errors name neither the file nor the cause
        raise ValueError(f"{path!r} cannot be read as a checkpoint ({type(err).__name__}: {err}): it is truncated or "
                         "not a transformer checkpoint; re-download or re-save it") from None
    return list(sd.keys()), None, sd


def _diffusers_single_file_names(keys: list[str]) -> set[str]:
    """The names diffusers' own single-file converter turns `keys` into (values are never touched for Wan keys)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return set(convert_wan_transformer_to_diffusers(dict.fromkeys(keys)))


def load_transformer(
    pretrained_model_name_or_path: str | os.PathLike | None,
    *,
    subfolder: str | None = "transformer",
    transformer_file: str | os.PathLike | None = None,
    config: str | os.PathLike | Mapping | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Load a `WanTransformer3DModel` with diffusers' loaders; returns `(model, source_info)`.

    - No `transformer_file`: `from_pretrained(pretrained_model_name_or_path, subfolder=...)` (a pipeline folder,
      or a transformer folder holding config.json directly).
    - `transformer_file` (original Wan / ComfyUI keys, optionally `model.diffusion_model.`/`diffusion_model.`
      prefixed, or diffusers keys): `from_single_file(file, config=<local folder>)` with `local_files_only=True`.
      The config comes from `config` (folder, dict, or a name in `slice_adapter.wan_configs`) or else from
      `pretrained_model_name_or_path`; it is never guessed from the hub.

    `source_info` (a JSON-serialisable dict) has kind ("pretrained" | "single_file"), pretrained_model_name_or_path,
    subfolder, transformer_file, config, key_format, prefix and metadata (the file's safetensors metadata), enough
    for `save_transformer_state_dict(..., source_info["key_format"], source_info["prefix"])` to write the same format.
    """
    from diffusers import WanTransformer3DModel

    root = None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
    if transformer_file is None:
        if root is None:
            raise ValueError("load_transformer: pass pretrained_model_name_or_path (a diffusers folder) or transformer_file")
        if os.path.isfile(root):
            raise ValueError(
                f"{root!r} is a file, not a diffusers folder; pass it as transformer_file= with config=<pipeline "
                f"folder or transformer config dir>"
            )
        sub = subfolder
        if os.path.isdir(root):
            root = os.path.abspath(root)
            _, sub = _config_location(root, subfolder)
        model = WanTransformer3DModel.from_pretrained(root, subfolder=sub, torch_dtype=torch_dtype)
        info = dict(
            kind="pretrained", pretrained_model_name_or_path=root, subfolder=sub, transformer_file=None,
            config=None, key_format="diffusers", prefix="", metadata=None,
        )
        return model, info

    path = os.path.abspath(os.fspath(transformer_file))
    if not os.path.isfile(path):
        raise ValueError(f"transformer_file {path!r} does not exist; pass a local .safetensors/.ckpt/.pt file")
    if config is None and root is None:
        raise ValueError(
            f"transformer_file {path!r} needs a config: pass config=<pipeline folder, transformer config dir, dict "
            f"or published name such as 'wan2.1-t2v-1.3b'> or the pipeline folder as pretrained_model_name_or_path"
        )
    keys, metadata, loaded = _checkpoint_keys(path)
    key_format, prefix = detect_key_format(keys)

    with tempfile.TemporaryDirectory(prefix="slice_ft_cfg_") as tmp:
        cfg_src = config if config is not None else root
        if isinstance(cfg_src, Mapping) or not os.path.exists(os.fspath(cfg_src)):
            if isinstance(cfg_src, Mapping):
                cfg_label, cfg_dict = "<dict>", dict(cfg_src)
            else:
                from slice_adapter.wan_configs import wan_config  # raises ValueError listing known names

                cfg_label, cfg_dict = os.fspath(cfg_src), wan_config(os.fspath(cfg_src))
            with open(os.path.join(tmp, _CONFIG_NAME), "w") as fh:
                json.dump({"_class_name": "WanTransformer3DModel", **cfg_dict}, fh)
            cfg_dir, cfg_sub = tmp, None
        else:
            cfg_dir, cfg_sub = _config_location(os.path.abspath(os.fspath(cfg_src)), subfolder)
            cfg_label = cfg_dir

        # Check the checkpoint's names against the config first: diffusers loads with strict=False and would
        # otherwise leave missing weights uninitialised and only warn about unexpected ones.
        from accelerate import init_empty_weights

        model_cfg = WanTransformer3DModel.load_config(cfg_dir, subfolder=cfg_sub, local_files_only=True)
        with init_empty_weights():
            expected = WanTransformer3DModel.from_config(model_cfg).state_dict()
        names = [k[len(prefix):] for k in keys]
        ours = names if key_format == "diffusers" else [wan_to_diffusers(n) for n in names]
        missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path!r} ({key_format} keys, prefix {prefix!r}) does not match the transformer config at "
                f"{cfg_label!r}: missing {missing[:4]}{'...' if len(missing) > 4 else ''} ({len(missing)}), "
                f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''} ({len(unexpected)}); pass the "
                f"config of the model this file was saved from"
            )

        # Hand diffusers the file itself when its converter yields exactly our names; otherwise (a
        # `diffusion_model.` prefix, FLF2V `img_emb.emb_pos`, prefixed diffusers keys) pass it renamed by us,
        # which from_single_file then loads as-is.
        if key_format == "wan" and prefix != "diffusion_model.":
            native = _diffusers_single_file_names(keys) == set(expected)
        else:
            native = key_format == "diffusers" and prefix == ""
        source = path
        if not native or loaded is not None:
            if loaded is None:
                from diffusers.loaders.single_file_utils import load_single_file_checkpoint

                loaded = load_single_file_checkpoint(path, local_files_only=True)
            source = loaded if native else dict(zip(ours, (loaded[k] for k in keys)))
        model = WanTransformer3DModel.from_single_file(
            source, config=cfg_dir, subfolder=cfg_sub, local_files_only=True, torch_dtype=torch_dtype
        )

    info = dict(
        kind="single_file", pretrained_model_name_or_path=root, subfolder=cfg_sub, transformer_file=path,
        config=cfg_label, key_format=key_format, prefix=prefix, metadata=metadata,
    )
    return model, info


def save_transformer_state_dict(
    state_dict_in_diffusers_names: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    key_format: str = "diffusers",
    prefix: str = "",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write one safetensors file with keys in `key_format` ("diffusers" | "wan") and `prefix`, atomically.

    Tensors are written as they are (dtype kept); no tensor needs reshaping between the two formats.
    """
    from safetensors.torch import save_file

    if key_format not in KEY_FORMATS:
        raise ValueError(f"key_format {key_format!r} is not supported; use one of {KEY_FORMATS}")
    if prefix not in PREFIXES:
        raise ValueError(f"prefix {prefix!r} is not supported; use one of {PREFIXES}")
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map str to str; got {k!r}: {v!r}; json.dumps the value")
        meta[k] = v
    renamed = from_diffusers_state_dict(state_dict_in_diffusers_names, key_format, prefix)
    tensors = {}
    for k, v in renamed.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor; pass tensors only")
        tensors[k] = v.detach().to("cpu").contiguous()

    from slice_adapter.files.safetensors_stream import honour_umask, partial_path

    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = partial_path(path)
    try:
        save_file(tensors, tmp, metadata=meta)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
