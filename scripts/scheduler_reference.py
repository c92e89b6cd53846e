"""Reference diffusion steps from HuggingFace diffusers' DDPMScheduler and DDIMScheduler.

Writes model/tests/fixtures/scheduler_diffusers.json, which model/tests/suite/schedule.rs checks
`NoiseSchedule` (abar, spacing, `ddpm_step`, `ddim_step`) against. Settings that match our
conventions (model/src/schedule.rs, infer/src/sampler.rs): `squaredcos_cap_v2` over 1000
steps, epsilon prediction, no thresholding, `clip_sample` on (range 1, pixel space) and off
(latent space), `variance_type="fixed_small"` (the posterior variance; ours logs and clips
it only at t = 0, where no noise is added), DDIM `set_alpha_to_one=True` (abar_{-1} = 1),
`eta=0`, `use_clipped_model_output=True` (we re-derive eps from the clipped x_0), and
`timestep_spacing="linspace"` (round(linspace(0, T-1, S))) for respacing.

Differences handled here: (1) diffusers builds its tables in float32; we construct the
schedulers with float32 promoted to float64 so the reference is not limited by f32
cancellation (e.g. beta_t = 1 - abar_t/abar_{t-1} at small t), and check the stock float32
tables agree to 2e-5 relative. (2) DDIMScheduler steps to `t - T // S`, not to the previous
kept linspace timestep; we set its `num_inference_steps` so that `T // S` equals the gap to
the previous kept timestep, which makes its own step run between our respaced timesteps.
DDPMScheduler walks its timestep list and needs no help. A fixed "noise" replaces
diffusers' random draw.

Run: /work/venv-ref/bin/python scripts/scheduler_reference.py   (needs torch, diffusers)
"""
import json
import math
import os
from unittest import mock

import numpy as np
import torch
import diffusers.schedulers.scheduling_ddpm as ddpm_mod
from diffusers import DDIMScheduler, DDPMScheduler

T, SHAPE = 1000, [1, 2, 4, 4]
_tensor = torch.tensor


def float64_tensor(*args, dtype=None, **kw):
    return _tensor(*args, dtype=torch.float64 if dtype in (None, torch.float32) else dtype, **kw)


def make(cls, **kw):
    """A scheduler whose float tables are float64 (construction code unchanged)."""
    with mock.patch.object(torch, "tensor", float64_tensor):
        s = cls(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                thresholding=False, clip_sample_range=1.0, timestep_spacing="linspace", **kw)
    assert s.alphas_cumprod.dtype == torch.float64
    return s


def values(f):
    n = math.prod(SHAPE)
    return torch.tensor([f(i) for i in range(n)], dtype=torch.float32).reshape(SHAPE).double()


x_t = values(lambda i: 1.3 * math.sin(0.37 * i + 0.1))
eps = values(lambda i: math.cos(0.91 * i - 0.2))
noise = values(lambda i: 1.1 * math.sin(1.7 * i + 0.5))
flat = lambda x: x.flatten().tolist()


def ddpm_step(s, t, clip, z):
    s.register_to_config(clip_sample=clip)
    with mock.patch.object(ddpm_mod, "randn_tensor", lambda *a, **k: z):
        return s.step(eps, t, x_t).prev_sample


out = {"T": T, "shape": SHAPE, "x_t": flat(x_t), "eps": flat(eps), "noise": flat(noise)}

full = make(DDPMScheduler, variance_type="fixed_small")
stock = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
rel = ((stock.alphas_cumprod.double() - full.alphas_cumprod) / full.alphas_cumprod).abs().max().item()
assert rel < 2e-5, rel
probe = [0, 1, 10, 100, 250, 500, 750, 900, 999]
out.update(probe_t=probe, betas=[full.betas[t].item() for t in probe],
           alphas_cumprod=[full.alphas_cumprod[t].item() for t in probe], float32_abar_max_rel_diff=rel)

out["spacing"] = {}
for steps in (250, 100, 50, 25, 10, 2):
    d = make(DDPMScheduler)
    d.set_timesteps(steps)
    out["spacing"][str(steps)] = sorted(d.timesteps.tolist())

# DDPM: the full 1000-step chain, and 250 steps respaced; (steps, step indices i).
out["ddpm"] = []
for steps, idx in [(1000, [500, 250, 10, 1, 0]), (250, [125, 62, 1, 0])]:
    s = make(DDPMScheduler, variance_type="fixed_small")
    if steps < T:
        s.set_timesteps(steps)
    keep = sorted(s.timesteps.tolist()) if steps < T else list(range(T))
    for i in idx:
        t = keep[i]
        for clip in (False, True):
            out["ddpm"].append({
                "steps": steps, "i": i, "t": t, "clip": clip,
                "variance": s._get_variance(t).item(),
                "mean": flat(ddpm_step(s, t, clip, torch.zeros_like(x_t))),
                "sample": flat(ddpm_step(s, t, clip, noise)),
            })

# DDIM (eta = 0): 50 steps respaced.
out["ddim"] = []
for steps, idx in [(50, [25, 12, 1, 0])]:
    d = make(DDIMScheduler, set_alpha_to_one=True)
    d.set_timesteps(steps)
    keep = sorted(d.timesteps.tolist())
    for i in idx:
        t, t_prev = keep[i], keep[i - 1] if i > 0 else -1
        gap = t - t_prev if i > 0 else 1
        d.num_inference_steps = next(n for n in range(T, 0, -1) if T // n == gap)
        for clip in (False, True):
            d.register_to_config(clip_sample=clip)
            prev = d.step(eps, t, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
            out["ddim"].append({"steps": steps, "i": i, "t": t, "t_prev": t_prev, "clip": clip,
                                "sample": flat(prev)})

path = os.path.join(os.path.dirname(__file__), "..", "model", "tests", "fixtures", "scheduler_diffusers.json")
with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
print("wrote", os.path.normpath(path), "| stock float32 abar max rel diff", rel)
