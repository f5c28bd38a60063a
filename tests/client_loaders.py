"""How each program applies a LoRA file to a Wan checkpoint in original keys, restated from their loaders so the
always-on tests can run without them (the opt-in tests in test_export_clients.py run the real ones where they can be
installed). Each function takes the base state dict (original Wan names, no prefix) and the LoRA state dict and
returns (patched state dict, keys the program leaves unused).

- ComfyUI (comfy/lora.py, comfy/model_patcher.py): keys `diffusion_model.<name>` map to `<name>.weight` (or to a
  raw parameter `<name>` itself), and so do `lora_unet_<name with _>` (kohya/musubi names);
  `.lora_B/.lora_A` or `.lora_up/.lora_down` (+ `.alpha`, scale alpha / rank) add B @ A, `.diff` adds to the
  weight, `.diff_b` to the bias. The patcher only patches the parameters of leaf modules: a patch on a parameter held
  by a module with children (`blocks.N.modulation`) is registered and never applied.
- Wan2GP (models/wan/modules/model.py preprocess_loras, then mmgp's offload.load_loras_into_model): deletes every
  `*modulation.diff` key, converts `lora_unet_*` names, strips `diffusion_model.`; then patches modules by name
  (`.diff` to a module's weight, `.diff_b` to its bias, LoRA pairs with alpha / rank); a name that is not a module
  with a weight is an unexpected key.
- musubi-tuner (utils/lora_utils.py load_safetensors_with_lora_and_fp8, the Wan inference path): for every 2-D
  `<name>.weight` of the checkpoint, `lora_unet_<name with . -> _>.lora_down/.lora_up/.alpha` add up @ down *
  alpha / dim; nothing else is read.
"""

from __future__ import annotations

import torch


def _owner_is_leaf(state: dict, owner: str) -> bool:
    prefix = owner + "."
    return all("." not in k[len(prefix):] for k in state if k.startswith(prefix))


def comfy_apply(base: dict, lora: dict) -> tuple[dict, set]:
    out = {k: v.clone() for k, v in base.items()}
    used = set()
    for key in base:
        stem = "diffusion_model." + (key[: -len(".weight")] if key.endswith(".weight") else key)
        patches = []
        kohya = "lora_unet_" + key[: -len(".weight")].replace(".", "_") if key.endswith(".weight") else None
        for prefix, up_key, down_key in ((stem, ".lora_B.weight", ".lora_A.weight"),
                                         (kohya, ".lora_up.weight", ".lora_down.weight")):
            if prefix is None or f"{prefix}{up_key}" not in lora:
                continue
            alpha = lora.get(f"{prefix}.alpha")
            up, down = lora[f"{prefix}{up_key}"].float(), lora[f"{prefix}{down_key}"].float()
            scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
            patches.append((key, up @ down * scale))
            used |= {f"{prefix}{up_key}", f"{prefix}{down_key}", f"{prefix}.alpha"}
        if f"{stem}.diff" in lora:
            patches.append((key, lora[f"{stem}.diff"].float()))
            used.add(f"{stem}.diff")
        if f"{stem}.diff_b" in lora and key.endswith(".weight"):
            patches.append((key[: -len(".weight")] + ".bias", lora[f"{stem}.diff_b"].float()))
            used.add(f"{stem}.diff_b")
        for target, delta in patches:
            if _owner_is_leaf(base, target.rpartition(".")[0]) and delta.shape == out[target].shape:
                out[target] = (out[target].float() + delta).to(out[target].dtype)
    return out, set(lora) - used


def wan2gp_apply(base: dict, lora: dict) -> tuple[dict, set]:
    lora = {k: v for k, v in lora.items() if not k.endswith("modulation.diff")}
    if any(k.startswith("lora_unet_") for k in lora):  # its lora_unet_* conversion, for the Wan block modules
        renamed = {}
        for k, v in lora.items():
            k = k.replace("lora_unet_blocks_", "diffusion_model.blocks.")
            for part in ("cross_attn", "self_attn", "ffn"):
                k = k.replace(f"_{part}_", f".{part}.")
            renamed[k.replace("lora_up", "lora_B").replace("lora_down", "lora_A")] = v
        lora = renamed
    lora = {k.removeprefix("diffusion_model."): v for k, v in lora.items()}
    modules = {k[: -len(".weight")] for k in base if k.endswith(".weight")}
    out = {k: v.clone() for k, v in base.items()}
    unused = set()
    for k, v in lora.items():
        if k.endswith(".alpha"):
            continue
        module, _, kind = k.rpartition(".")
        if kind == "weight":
            module, kind = k.rsplit(".", 2)[0], k.rsplit(".", 2)[1] + ".weight"
        if module not in modules:
            unused.add(k)
            continue
        if kind == "diff":
            out[f"{module}.weight"] = out[f"{module}.weight"] + v.float()
        elif kind == "diff_b":
            out[f"{module}.bias"] = out[f"{module}.bias"] + v.float()
        elif kind == "lora_A.weight":
            up = lora[f"{module}.lora_B.weight"].float()
            alpha = lora.get(f"{module}.alpha")
            scale = 1.0 if alpha is None else alpha.item() / v.shape[0]
            out[f"{module}.weight"] = out[f"{module}.weight"] + up @ v.float() * scale
        elif kind != "lora_B.weight":
            unused.add(k)
    return out, unused


def musubi_apply(base: dict, lora: dict) -> tuple[dict, set]:
    out = {k: v.clone() for k, v in base.items()}
    used = set()
    for key in base:
        if not key.endswith(".weight") or base[key].dim() != 2:
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        down, up = lora.get(f"{name}.lora_down.weight"), lora.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            continue
        alpha = lora.get(f"{name}.alpha")
        scale = (down.shape[0] if alpha is None else alpha.item()) / down.shape[0]
        out[key] = out[key] + up.float() @ down.float() * scale
        used |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    return out, set(lora) - used


CLIENT_APPLY = {"ComfyUI": comfy_apply, "Wan2GP": wan2gp_apply, "musubi-tuner": musubi_apply}


def changed(a: dict, b: dict) -> set:
    """Names whose tensors differ."""
    return {k for k in a if not torch.equal(a[k], b[k])}


def wan_module_tree(state: dict) -> torch.nn.Module:
    """A module tree named like the original Wan model (for loaders that patch modules by name, e.g. mmgp): a
    Linear per 2-D `.weight`, a module holding the 1-D/other weights (norms, convolution), raw parameters (modulation)
    on their container; holding `state`'s values."""
    root = torch.nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root
