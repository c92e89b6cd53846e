"""Independent reference numbers for the diffusion schedule (numpy, float64).

Writes model/tests/fixtures/schedule.json, which model/tests/suite/schedule.rs checks against.
Formulas: the cosine schedule of Nichol & Dhariwal (2021) with s = 0.008 and betas clipped
at 0.999, the DDPM posterior q(x_{t-1} | x_t, x_0), respacing to S evenly spaced steps, and
the min-SNR-gamma loss weights.

Run: python3 scripts/schedule_reference.py   (needs numpy)
"""
import json
import math
import os

import numpy as np

T = 1000


def cosine_betas(T, s=0.008, max_beta=0.999):
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=np.float64)


def posterior(betas):
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_var = np.log(np.append(var[1], var[1:]))
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
    return abar, var, log_var, c1, c2


def respace(betas, steps):
    stride = (len(betas) - 1) / (steps - 1)
    keep = sorted({int(round(i * stride)) for i in range(steps)})
    abar = np.cumprod(1.0 - betas)
    last, new = 1.0, []
    for i, a in enumerate(abar):
        if i in keep:
            new.append(1.0 - a / last)
            last = a
    return keep, np.array(new)


betas = cosine_betas(T)
abar, var, log_var, c1, c2 = posterior(betas)
probe = [0, 1, 2, 10, 100, 250, 500, 750, 900, 998, 999]
out = {
    "T": T,
    "probe_t": probe,
}
for key, values in [
    ("betas", betas),
    ("alphas_cumprod", abar),
    ("posterior_variance", var),
    ("posterior_log_variance_clipped", log_var),
    ("posterior_mean_coef1", c1),
    ("posterior_mean_coef2", c2),
]:
    out[key] = [values[t] for t in probe]
for steps in (250, 50):
    keep, nb = respace(betas, steps)
    _, rvar, rlog, rc1, rc2 = posterior(nb)
    idx = [0, 1, steps // 2, steps - 2, steps - 1]
    out[f"respaced_{steps}"] = {
        "timesteps": keep,
        "probe_index": idx,
        "betas": [nb[i] for i in idx],
        "posterior_variance": [rvar[i] for i in idx],
        "posterior_mean_coef1": [rc1[i] for i in idx],
        "posterior_mean_coef2": [rc2[i] for i in idx],
    }
# Min-SNR-gamma loss weights (Hang et al. 2023), gamma = 5: the x_0 MSE weighted by
# min(SNR, gamma), written as a weight of the eps MSE (x_0 MSE = eps MSE / SNR) and of the
# v MSE (x_0 MSE = v MSE / (SNR + 1)).
snr = abar / (1.0 - abar)
out["min_snr_5"] = {
    "eps": [float(np.minimum(snr[t], 5.0) / snr[t]) for t in probe],
    "v": [float(np.minimum(snr[t], 5.0) / (snr[t] + 1.0)) for t in probe],
}
path = os.path.join(os.path.dirname(__file__), "..", "model", "tests", "fixtures", "schedule.json")
with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
print("wrote", os.path.normpath(path))
