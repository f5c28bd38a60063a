"""Quality study: what a slice, a LoRA of equal trainable weights and full fine-tuning learn and keep.

A small Wan transformer is pretrained briefly on a base corpus of generated latent "videos" (four families), then:
  fit:       concept A (trigger "sks_a") trained in slice id 1 / a LoRA / full fine-tuning, same steps, each with a
             small learning-rate sweep (chosen on a validation split, reported on a held-out test split);
  retention: concept B (trigger "sks_b") trained in slice id 2 on the A-merged model / a new LoRA on the A-merged
             model / more full fine-tuning; the change of A's held-out loss;
  drift:     the change of the loss on "checker", a base family no fine-tune ever sees.

Data lives in latent space: each family is a parametric space-time pattern (moving blob, stripes, checkerboard,
...) on its own fixed channel direction, captioned by a fixed random text embedding per word (a trigger or family
word plus two attribute words that the pattern's parameters decide). No VAE or text encoder is involved.

    python benchmarks/quality.py --output /tmp/quality.json
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(
    model=dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=1024, num_layers=4, text_dim=64, freq_dim=64),
    latent=(16, 3, 8, 8), batch=8, pretrain_steps=300, pretrain_lr=1e-3, pretrain_per_family=256,
    steps=100, eval_at=(5, 10, 20, 35, 50, 75), n_train=32, n_val=32, n_test=48, fraction=0.02, seeds=(0, 1, 2),
    lrs={"slice": (1e-2, 3e-2, 1e-1), "lora": (3e-3, 1e-2, 3e-2), "full": (3e-4, 1e-3, 3e-3)},
)
SMOKE = dict(
    model=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=1, text_dim=16, freq_dim=16),
    latent=(16, 1, 4, 4), batch=2, pretrain_steps=2, pretrain_lr=1e-3, pretrain_per_family=4,
    steps=2, eval_at=(1,), n_train=4, n_val=4, n_test=4, fraction=0.1, seeds=(0, 1),
    lrs={"slice": (1e-2,), "lora": (1e-3,), "full": (1e-4,)},
)
METHODS = ("slice", "lora", "full")
# How B's phase may be trained to forget less of A (A's phase is the same): A's own training clips mixed into B's
# training set (replay, the usual prior preservation), or a third of the learning rate.
REMEDIES = {"replay": dict(replay=True, lr_scale=1.0), "lr/3": dict(replay=False, lr_scale=1 / 3)}
BASE_FAMILIES = ("checker", "gradient", "rings", "corner")
CONCEPT_A, CONCEPT_B, UNRELATED = "blob", "stripes", "checker"
WORD = {"blob": "sks_a", "stripes": "sks_b"}  # the triggers; base families are captioned by their own name
TEXT_LEN = 4  # family word, two attribute words, one padding token
DATA_SEED = 1234  # fixes the families' channel directions and the vocabulary: the same task for every seed


# -- data ---------------------------------------------------------------------------------------------------------
def _pattern(name: str, rng, frames: int, size: int):
    """One clip's space-time pattern (F, H, W) and its two attribute words."""
    import numpy as np

    lin = np.linspace(-1, 1, size)
    y, x = np.meshgrid(lin, lin, indexing="ij")
    t = np.arange(frames)[:, None, None]
    if name == "blob":  # a Gaussian blob drifting sideways
        r = rng.choice([0.25, 0.5])
        v = rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)
        cx, cy = rng.uniform(-0.5, 0.5, 2)
        p = np.exp(-((x - cx - v * t) ** 2 + (y - cy) ** 2) / (2 * r * r))
        return p, ("small" if r < 0.3 else "large", "right" if v > 0 else "left")
    if name == "stripes":  # sinusoidal stripes scrolling across
        horizontal = rng.random() < 0.5
        f = rng.choice([1.0, 2.5])
        u = y if horizontal else x
        p = np.sin(2 * np.pi * f * u / 2 + rng.uniform(0, 2 * np.pi) + 0.8 * t)
        return p, ("horizontal" if horizontal else "vertical", "wide" if f < 2 else "thin")
    if name == "checker":  # a checkerboard, flickering or still
        cell = rng.choice([2, 4]) if size >= 8 else 1
        flicker = rng.random() < 0.5
        ij = np.add.outer(np.arange(size) // cell, np.arange(size) // cell) % 2 * 2 - 1.0
        p = ij[None] * (np.where(t % 2 == 0, 1.0, -1.0) if flicker else np.ones_like(t, dtype=float))
        return p, ("fine" if cell == 2 else "coarse", "flickering" if flicker else "still")
    if name == "gradient":  # a linear ramp sliding along its direction
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        p = np.tanh(2 * (ramp[None] - 0.3 * t + rng.uniform(-0.5, 0.5)))
        return p, ("right" if np.cos(angle) > 0 else "left", "down" if np.sin(angle) > 0 else "up")
    if name == "rings":  # concentric rings pulsing outwards
        f = rng.choice([1.0, 2.0])
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        rad = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        p = np.cos(2 * np.pi * f * rad - 1.2 * t)
        return p, ("coarse" if f < 1.5 else "fine", "soft")
    if name == "corner":  # a bright square in one corner
        sy, sx = rng.choice([-1, 1], 2)
        p = ((y * sy > 0.2) & (x * sx > 0.2)).astype(float)[None].repeat(frames, 0) * 2 - 0.5
        return p, ("down" if sy > 0 else "up", "right" if sx > 0 else "left")
    raise ValueError(f"unknown family {name!r}")


@dataclass
class Clips:
    """Latents (N, C, F, H, W) and their caption embeddings (N, TEXT_LEN, text_dim)."""

    latents: "object"
    text: "object"

    def __len__(self):
        return self.latents.shape[0]


class LatentWorld:
    """The families' fixed channel directions and the word embeddings: one world, many draws."""

    def __init__(self, latent, text_dim: int):
        import numpy as np

        self.channels, self.frames, self.size = latent[0], latent[1], latent[2]
        rng = np.random.default_rng(DATA_SEED)
        names = (*BASE_FAMILIES, CONCEPT_A, CONCEPT_B)
        # each family: a main channel direction and a background one, both unit vectors scaled to unit variance
        self.directions = {}
        for n in names:
            d = rng.standard_normal((2, self.channels))
            self.directions[n] = d / np.linalg.norm(d, axis=1, keepdims=True) * math.sqrt(self.channels)
        words = sorted({WORD.get(n, n) for n in names} | {w for n in names for w in self._attribute_words(n)})
        self.embedding = {w: rng.standard_normal(text_dim).astype("float32") for w in words}
        self.text_dim = text_dim

    def _attribute_words(self, name):
        import numpy as np

        rng = np.random.default_rng(0)
        return {w for _ in range(64) for w in _pattern(name, rng, self.frames, self.size)[1]}

    def draw(self, name: str, n: int, seed: int) -> Clips:
        """`n` clips of family `name`; the same (name, n, seed) gives the same clips."""
        import numpy as np
        import torch

        rng = np.random.default_rng([DATA_SEED, seed, sum(map(ord, name))])
        lat = np.empty((n, self.channels, self.frames, self.size, self.size), dtype="float32")
        text = np.zeros((n, TEXT_LEN, self.text_dim), dtype="float32")
        main, back = self.directions[name]
        for i in range(n):
            p, attrs = _pattern(name, rng, self.frames, self.size)
            level = rng.uniform(-0.5, 0.5)
            clip = main[:, None, None, None] * p[None] + back[:, None, None, None] * level
            lat[i] = clip + 0.05 * rng.standard_normal(clip.shape)
            for j, w in enumerate((WORD.get(name, name), *attrs)):
                text[i, j] = self.embedding[w]
        return Clips(torch.from_numpy(lat), torch.from_numpy(text))


def concat(*clips: Clips) -> Clips:
    import torch

    return Clips(torch.cat([c.latents for c in clips]), torch.cat([c.text for c in clips]))


# -- training and evaluation ----------------------------------------------------------------------------------------
class EvalSet:
    """Held-out clips with fixed noise and stratified sigmas: a deterministic flow-matching loss."""

    def __init__(self, clips: Clips, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        n = len(clips)
        self.clips = clips
        self.noise = torch.randn(clips.latents.shape, generator=g)
        self.sigma = ((torch.randperm(n, generator=g).float() + 0.5) / n).clamp(1e-3, 1.0)

    def loss(self, model, chunk: int = 64) -> float:
        import torch

        from slice_ft.flow_matching import flow_matching_loss, flow_target, noisy_latents, sigma_to_timestep

        total, n = 0.0, len(self.clips)
        with torch.no_grad():
            for s in range(0, n, chunk):
                x0, noise, sigma = self.clips.latents[s:s + chunk], self.noise[s:s + chunk], self.sigma[s:s + chunk]
                pred = model(noisy_latents(x0, noise, sigma), sigma_to_timestep(sigma), self.clips.text[s:s + chunk],
                             return_dict=False)[0]
                total += flow_matching_loss(pred, flow_target(x0, noise)).item() * len(x0)
        return total / n


def train(model, params, data: Clips, *, steps: int, lr: float, batch: int, seed: int, evals: dict, eval_at=()):
    """AdamW on `params` with flow matching (uniform sigmas); returns the eval curve [(step, {name: loss})] at
    step 0, the steps in `eval_at` and the last step."""
    import torch

    from slice_ft.flow_matching import (flow_matching_loss, flow_target, noisy_latents, sample_sigmas,
                                        sigma_to_timestep)

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    curve = [(0, {k: e.loss(model) for k, e in evals.items()})] if evals else []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0, text = data.latents[idx], data.text[idx]
        noise = torch.randn(x0.shape, generator=g)
        sigma = sample_sigmas(batch, method="uniform", shift=1.0, generator=g)
        pred = model(noisy_latents(x0, noise, sigma), sigma_to_timestep(sigma), text, return_dict=False)[0]
        flow_matching_loss(pred, flow_target(x0, noise)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the training recipe does; keeps high-LR sweeps finite
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if evals and (step in eval_at or step == steps):
            curve.append((step, {k: e.loss(model) for k, e in evals.items()}))
    model.eval()
    return curve


def merged_state(model) -> dict:
    """The plain model's state dict with every adapter merged in (names as the bare model has them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    import slice_adapter
    from slice_adapter.layer import SliceLayer

    if any(isinstance(m, SliceLayer) for m in model.modules()):
        slice_adapter.merge_adapters(model)
    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and not isinstance(m, SliceLayer):
            m.merge()
    adapter_parts = ("lora_", "slice_", "shira_")
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if not any(p in k for p in adapter_parts)}


class Study:
    """The study's fixed parts: model config, data world, held-out sets; and its steps (pretrain, phase, losses)."""

    def __init__(self, size: dict, log=print):
        import torch

        self.size, self.log = size, log
        self.config = common.wan_layout(in_channels=size["latent"][0], out_channels=size["latent"][0],
                                        rope_max_seq_len=64, **size["model"])
        self.world = LatentWorld(size["latent"], size["model"]["text_dim"])
        n_test = size["n_test"]
        # held-out sets are the same for every seed: seeds vary training data, noise and initialisation only
        self.test = {k: EvalSet(self.world.draw(f, n_test, 10_000), 20_000)
                     for k, f in (("A", CONCEPT_A), ("B", CONCEPT_B), ("U", UNRELATED))}
        self.val = {k: EvalSet(self.world.draw(f, size["n_val"], 30_000), 40_000)
                    for k, f in (("A", CONCEPT_A), ("B", CONCEPT_B))}
        torch.manual_seed(0)

    def model(self, state=None):
        model = common.build_wan(self.config)
        if state is not None:
            model.load_state_dict(state)
        return model

    def pretrain(self) -> tuple[dict, list]:
        """All weights trained on the base corpus: (state dict, curve of the unrelated family's test loss)."""
        s = self.size
        data = concat(*[self.world.draw(f, s["pretrain_per_family"], 0) for f in BASE_FAMILIES])
        model = self.model()
        params = [p for p in model.parameters()]
        t0 = time.perf_counter()
        curve = train(model, params, data, steps=s["pretrain_steps"], lr=s["pretrain_lr"], batch=s["batch"], seed=0,
                      evals={"U": self.test["U"]}, eval_at=range(0, s["pretrain_steps"], 100))
        self.log(f"  pretrained in {time.perf_counter() - t0:.0f} s: U loss {curve[0][1]['U']:.3f} -> "
                 f"{curve[-1][1]['U']:.3f}")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, curve

    def phase(self, method: str, state: dict, concept: str, *, lr: float, seed: int, slice_id: int, rank: int,
              replay: bool = False):
        """Fine-tune `state` on one concept; (merged state, eval curve on A/B test, trainable weights).
        `replay`: also train on concept A's training clips (the same ones A's phase used)."""
        s = self.size
        family = CONCEPT_A if concept == "A" else CONCEPT_B
        data = self.world.draw(family, s["n_train"], 100 + seed)
        if replay:
            data = concat(data, self.world.draw(CONCEPT_A, s["n_train"], 100 + seed))
        model = self.model(state)
        params = common.apply_method(model, method, fraction=s["fraction"], rank=rank, slice_id=slice_id, seed=seed)
        curve = train(model, params, data, steps=s["steps"], lr=lr, batch=s["batch"], seed=1000 * seed + slice_id,
                      evals={"A": self.test["A"], "B": self.test["B"]}, eval_at=s["eval_at"])
        return merged_state(model), curve, sum(p.numel() for p in params)

    def losses(self, state) -> dict:
        model = self.model(state).eval()
        return {k: e.loss(model) for k, e in self.test.items()}


_STUDY = {}


def _study(size: dict) -> Study:
    """One Study per process (pool workers build theirs once: the data are deterministic in `size`)."""
    key = repr(sorted(size.items()))
    if key not in _STUDY:
        _STUDY.clear()
        _STUDY[key] = Study(size, log=lambda *a: None)
    return _STUDY[key]


def _pool_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    common.quiet_warnings()


def job_a(size, base, method, lr, seed, rank):
    """Fine-tune concept A; returns what the sweep and the chains need."""
    study = _study(size)
    state, curve, trainable = study.phase(method, base, "A", lr=lr, seed=seed, slice_id=1, rank=rank)
    val = study.val["A"].loss(study.model(state).eval())
    return {"state": state, "curve_a": curve, "trainable": trainable, "val": val if math.isfinite(val) else math.inf}


def job_chain(size, base, base_losses, method, lr, seed, rank, a=None):
    """Concept A (unless given), then B on the A-merged model; the per-seed record of one method."""
    study = _study(size)
    a = a or job_a(size, base, method, lr, seed, rank)
    after_a = study.losses(a["state"])
    # slice: id 2 on the A-merged model; LoRA: a new LoRA on the A-merged model; full: more full fine-tuning
    state_b, curve_b, _ = study.phase(method, a["state"], "B", lr=lr, seed=seed, slice_id=2, rank=rank)
    after_b = study.losses(state_b)
    remedies = {}
    for name, how in REMEDIES.items():
        state_r, _, _ = study.phase(method, a["state"], "B", lr=lr * how["lr_scale"], seed=seed, slice_id=2,
                                    rank=rank, replay=how["replay"])
        after = study.losses(state_r)
        remedies[name] = {"fit_b": after["B"], "retention_pct": 100 * (after["A"] - after_a["A"]) / after_a["A"]}
    return {
        "remedies": remedies,
        "method": method, "seed": seed, "lr": lr, "trainable": a["trainable"], "after_a": after_a,
        "after_b": after_b, "curve_a": a["curve_a"], "curve_b": curve_b,
        "fit_a": after_a["A"],
        "fit_b": after_b["B"],
        "retention_pct": 100 * (after_b["A"] - after_a["A"]) / after_a["A"],
        # the share of what training A gained that training B took back
        "gain_lost_pct": 100 * (after_b["A"] - after_a["A"]) / (base_losses["A"] - after_a["A"]),
        "drift_a_pct": 100 * (after_a["U"] - base_losses["U"]) / base_losses["U"],
        "drift_ab_pct": 100 * (after_b["U"] - base_losses["U"]) / base_losses["U"],
    }


class _Inline:
    """Pool stand-in for smoke runs: no spawn, no second import of torch."""

    def starmap(self, fn, jobs):
        return [fn(*j) for j in jobs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run(size: dict, *, workers: int = 2, threads: int = 1, log=print) -> dict:
    """Pretrain, sweep, then the A -> B chains for every seed; independent runs go to `workers` processes."""
    import multiprocessing as mp
    import statistics

    import torch

    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_adapter.wan_configs import build_meta_transformer

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    study = _study(size)
    study.log = log
    meta = build_meta_transformer(study.config)
    selected = slice_adapter.plan(meta, SliceConfig(fraction=size["fraction"], slice_id=1)).selected
    # A's and B's slices must share no weight: that is what the retention claim rests on
    overlap = slice_adapter.overlap(meta, SliceConfig(fraction=size["fraction"], slice_id=1),
                                    SliceConfig(fraction=size["fraction"], slice_id=2))
    rank = common.equal_rank(meta, selected)
    base, pre_curve = study.pretrain()
    base_losses = study.losses(base)
    log(f"  base: A {base_losses['A']:.4f}, B {base_losses['B']:.4f}, U {base_losses['U']:.4f}")
    seed0, seeds = size["seeds"][0], size["seeds"]
    pool = (_Inline() if workers <= 1 else
            mp.get_context("spawn").Pool(workers, initializer=_pool_init, initargs=(threads,)))
    with pool:
        # learning-rate sweep on the first seed, chosen on A's validation split (the test split is never seen)
        grid = [(m, lr) for m in METHODS for lr in size["lrs"][m]]
        swept = pool.starmap(job_a, [(size, base, m, lr, seed0, rank) for m, lr in grid])
        sweep = {m: {} for m in METHODS}
        for (m, lr), res in zip(grid, swept):
            sweep[m][lr] = res["val"]
            log(f"  sweep {m} lr {lr:g}: A val loss {res['val']:.4f}")
        chosen = {m: min(v, key=v.get) for m, v in sweep.items()}
        kept = {m: swept[grid.index((m, chosen[m]))] for m in METHODS}
        del swept
        jobs = [(size, base, base_losses, m, chosen[m], seed, rank, kept[m] if seed == seed0 else None)
                for seed in seeds for m in METHODS]
        records = pool.starmap(job_chain, jobs)
    per_seed = {m: [r for r in records if r["method"] == m] for m in METHODS}
    for r in records:
        log(f"  seed {r['seed']} {r['method']}: A {r['after_a']['A']:.4f} -> {r['after_b']['A']:.4f} after B, "
            f"B {r['after_b']['B']:.4f}, U {r['after_b']['U']:.4f}")

    def agg(method, key):
        vals = [r[key] for r in per_seed[method]]
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "values": vals}

    summary = {m: {k: agg(m, k) for k in ("fit_a", "fit_b", "retention_pct", "gain_lost_pct", "drift_a_pct",
                                            "drift_ab_pct")} for m in METHODS}
    for m in METHODS:
        summary[m]["trainable"] = per_seed[m][0]["trainable"]
        summary[m]["lr"] = chosen[m]
        for name in REMEDIES:
            for key in ("fit_b", "retention_pct"):
                vals = [r["remedies"][name][key] for r in per_seed[m]]
                summary[m][f"{key} ({name})"] = {"mean": statistics.fmean(vals), "values": vals,
                                                 "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    s, lo = summary["slice"], summary["lora"]
    claim = {
        "retention_within_1pct": abs(s["retention_pct"]["mean"]) <= 1.0,
        "fit_b_vs_lora": s["fit_b"]["mean"] / lo["fit_b"]["mean"],
    }
    return {
        "seconds": time.perf_counter() - t_start,
        "text_len": TEXT_LEN,
        "rank": rank,
        "selected": selected,
        "slice_overlap": overlap,
        "base_losses": base_losses,
        "pretrain_curve": pre_curve,
        "sweep": {m: {f"{lr:g}": v for lr, v in d.items()} for m, d in sweep.items()},
        "chosen_lr": chosen,
        "summary": summary,
        "per_seed": per_seed,
        "claim": claim,
    }


def plot(result: dict, path) -> None:
    """Loss curves (mean ± std over seeds) of concept A's fine-tune and of B's fine-tune on the A-merged model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"slice": "tab:blue", "lora": "tab:orange", "full": "tab:green"}
    panels = (("curve_a", "A", "fit: concept A (slice id 1 / LoRA / full)"),
              ("curve_b", "B", "then concept B on the A-merged model"),
              ("curve_b", "A", "retention: concept A while B trains"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, concept, title) in zip(axes, panels):
        for method, runs in result["per_seed"].items():
            steps = [s for s, _ in runs[0][key]]
            vals = np.array([[d[concept] for _, d in r[key]] for r in runs])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(steps, mean, color=colors[method], label=f"{method} (lr {runs[0]['lr']:g})")
            ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out loss on {concept} (mean ± std, {len(runs)} seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0], rows=False)
    parser.add_argument("--plot", default=None, help="Also write the loss-curve PNG here.")
    parser.add_argument("--workers", type=int, default=None,
                        help="Processes for the independent runs (default: the CPU count; 1 in --smoke).")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else FULL
    workers = args.workers or (1 if args.smoke else common.os.cpu_count() or 1)
    print(f"quality: {len(size['seeds'])} seeds, {size['steps']} steps per concept, {workers} workers", flush=True)
    result = run(size, workers=workers, threads=args.threads)
    if args.plot:
        plot(result, args.plot)
    common.write_result(
        args.output, "quality", args.smoke,
        setup={**{k: (v if not isinstance(v, dict) else dict(v)) for k, v in size.items()},
               "workers": workers, "threads": args.threads},
        **result,
    )


if __name__ == "__main__":
    main()
