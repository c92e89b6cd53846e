"""An independent PyTorch implementation of the tiny Transfusion model, for timing: the
yardstick of `transfusion-train bench` (training step) and `transfusion bench` (KV-cached
diffusion step with guidance, cached text decoding). Not a test; nothing in the project
depends on it.

The same computation as the Rust model's `tiny` preset: token embedding, a linear patch
adapter (timestep MLP added to every patch, 2D sin-cos patch positions), 4 pre-norm Llama
layers (RMSNorm, half-split RoPE with positions restarting per document, SwiGLU), the
Transfusion mask (causal, bidirectional inside an image, block-diagonal over packed
documents), one gather in and one gather out, CE over the text targets plus lambda times the
MSE over the images, global-norm clipping and AdamW (0.9/0.95, eps 1e-8, weight decay 0.1).

Install (outside the repository): python -m venv ~/venv-ref && ~/venv-ref/bin/pip install torch numpy
Run: ~/venv-ref/bin/python scripts/pytorch_reference/transfusion_tiny.py train|diffusion|text [--threads 2]
     [--preset tiny|paper_160m] [--device cpu|cuda] [--dtype f32|bf16]
Prints one line `ms_per_step <median>` (train, diffusion) or `tokens_per_s <median>` (text).
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    """The `tiny` preset; `Config.preset("paper_160m")` gives the paper's 0.16B model (16 layers,
    width 768, 12 heads, 8-channel 32x32 latents in 2x2 patches, no patch position table)."""
    vocab = 512
    d = 128
    layers = 4
    heads = 4
    hidden = 384
    channels = 3
    latent = 32
    patch = 4
    d_freq = 64
    theta = 10000.0
    eps = 1e-5
    lam = 5.0
    timesteps = 1000

    pos_table = True

    @staticmethod
    def preset(name):
        c = Config()
        if name == "paper_160m":
            c.d, c.layers, c.heads = 768, 16, 12
            c.hidden = (8 * c.d // 3 + 63) // 64 * 64
            c.channels, c.latent, c.patch, c.d_freq = 8, 32, 2, 256
            c.pos_table = False
        elif name != "tiny":
            raise SystemExit(f"unknown preset {name} (tiny, paper_160m)")
        return c

    @property
    def patches(self):
        return (self.latent // self.patch) ** 2

    @property
    def patch_dim(self):
        return self.channels * self.patch * self.patch


def rope_tables(positions, hd, theta):
    """positions [b, s] -> cos, sin [b, 1, s, hd/2]."""
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = positions.float()[..., None] * inv
    return ang.cos()[:, None], ang.sin()[:, None]


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.hd = c.heads, c.d // c.heads
        self.n1 = nn.RMSNorm(c.d, eps=c.eps)
        self.n2 = nn.RMSNorm(c.d, eps=c.eps)
        self.wq = nn.Linear(c.d, c.d, bias=False)
        self.wk = nn.Linear(c.d, c.d, bias=False)
        self.wv = nn.Linear(c.d, c.d, bias=False)
        self.wo = nn.Linear(c.d, c.d, bias=False)
        self.w1 = nn.Linear(c.d, c.hidden, bias=False)
        self.w3 = nn.Linear(c.d, c.hidden, bias=False)
        self.w2 = nn.Linear(c.hidden, c.d, bias=False)

    def forward(self, x, cos, sin, allowed, past=None):
        """x [b, s, d]; allowed [b, 1, s, past+s] (True = may attend)."""
        b, s, _ = x.shape
        y = self.n1(x)
        split = lambda t: t.view(b, s, self.h, self.hd).transpose(1, 2)
        q = rope(split(self.wq(y)), cos, sin)
        k = rope(split(self.wk(y)), cos, sin)
        v = split(self.wv(y))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, -1))
        y = self.n2(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y)), (k, v)


def sinusoidal(t, dim):
    half = dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * f
    return torch.cat([a.cos(), a.sin()], dim=1)


def patch_positions(grid, d):
    """Fixed 2D sin-cos embedding [grid*grid, d]: half the width for rows, half for columns."""
    def axis(pos, dim):
        half = dim // 2
        f = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / half)
        a = pos[:, None] * f
        return torch.cat([a.sin(), a.cos()], dim=1)
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    return torch.cat([axis(ys.flatten(), d // 2), axis(xs.flatten(), d // 2)], dim=1)


class Tiny(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.vocab, c.d)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.d, eps=c.eps)
        self.head = nn.Linear(c.d, c.vocab, bias=False)
        p = c.patch_dim
        self.t1 = nn.Linear(c.d_freq, max(p, c.d_freq))
        self.t2 = nn.Linear(max(p, c.d_freq), p)
        self.proj_in = nn.Linear(p, c.d, bias=False)
        self.proj_out = nn.Linear(c.d, p, bias=False)
        pos = patch_positions(c.latent // c.patch, c.d) if c.pos_table else torch.zeros(1, c.d)
        self.register_buffer("pos", pos)

    def patchify(self, x):
        n, ch, hh, ww = x.shape
        k = self.c.patch
        x = x.view(n, ch, hh // k, k, ww // k, k).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (hh // k) * (ww // k), ch * k * k)

    def unpatchify(self, p):
        n = p.shape[0]
        c, k, g = self.c.channels, self.c.patch, self.c.latent // self.c.patch
        return p.view(n, g, g, c, k, k).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * k, g * k)

    def encode_images(self, x_t, t):
        temb = self.t2(F.silu(self.t1(sinusoidal(t, self.c.d_freq))))
        return self.proj_in(self.patchify(x_t) + temb[:, None]) + self.pos

    def decode_images(self, hidden):
        return self.unpatchify(self.proj_out(hidden))

    def decoder(self, x, positions, allowed, cache=None):
        cos, sin = rope_tables(positions, self.c.d // self.c.heads, self.c.theta)
        new = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, allowed, None if cache is None else cache[i])
            new.append(kv)
        return self.norm(x), new


def cosine_alpha_bar(T):
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return torch.tensor([min(1 - 1e-4, max(1e-8, f(t + 1) / f(0))) for t in range(T)])


def packed_batch(c, b=8, s=128, caption=12):
    """Rows of `s` positions, each one document (BOS caption BOI patches EOI EOS) then padding."""
    n = c.patches
    doc = 1 + caption + 1 + n + 1 + 1
    tokens = torch.randint(5, c.vocab, (b, s))
    doc_id = torch.zeros(b, s, dtype=torch.long)
    doc_id[:, :doc] = 1
    span = torch.zeros(b, s, dtype=torch.long)
    img0 = 1 + caption + 1
    span[:, img0:img0 + n] = 1
    positions = torch.arange(s).expand(b, s).clone()
    positions[:, doc:] = torch.arange(s - doc)
    idx = torch.arange(s)
    causal = idx[None, :, None] >= idx[None, None, :]
    same_doc = doc_id[:, :, None] == doc_id[:, None, :]
    same_img = (span[:, :, None] == span[:, None, :]) & (span[:, :, None] > 0)
    allowed = ((causal | same_img) & same_doc)[:, None]
    # One gather in: text embeddings first, then every image's patches.
    flat = torch.arange(b * s).view(b, s).clone()
    patch_rows = (torch.arange(b)[:, None] * s + img0 + torch.arange(n)).flatten()
    flat[:, img0:img0 + n] = b * s + torch.arange(b * n).view(b, n)
    lm_mask = torch.zeros(b, s)
    lm_mask[:, :img0 - 1] = 1  # caption tokens predict the next
    lm_mask[:, img0 + n:doc - 1] = 1
    targets = torch.roll(tokens, -1, dims=1)
    return dict(tokens=tokens, positions=positions, allowed=allowed, source=flat.flatten(),
                patch_rows=patch_rows, lm_mask=lm_mask.flatten(), targets=targets.flatten(), n_img=b)


def time_train(args):
    c = Config.preset(args.preset)
    model = Tiny(c)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": other}], lr=3e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ab = cosine_alpha_bar(c.timesteps)
    batch = packed_batch(c, args.batch, args.seq_len)

    def step():
        with autocast(args):
            loss = train_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def train_loss():
        n = batch["n_img"]
        x0 = torch.rand(n, c.channels, c.latent, c.latent) * 2 - 1
        eps = torch.randn_like(x0)
        t = torch.randint(0, c.timesteps, (n,))
        a = ab[t].view(n, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        b, s = batch["tokens"].shape
        text = model.emb(batch["tokens"]).view(b * s, c.d)
        patches = model.encode_images(x_t, t).reshape(-1, c.d)
        x = torch.cat([text, patches])[batch["source"]].view(b, s, c.d)
        hidden, _ = model.decoder(x, batch["positions"], batch["allowed"])
        flat = hidden.reshape(b * s, c.d)
        logits = model.head(flat)
        ce = F.cross_entropy(logits, batch["targets"], reduction="none")
        lm = (ce * batch["lm_mask"]).sum() / batch["lm_mask"].sum()
        out = model.decode_images(flat[batch["patch_rows"]].view(n, c.patches, c.d))
        return lm + c.lam * F.mse_loss(out.float(), eps)

    if args.count_ops:
        return count_float_ops(train_loss), "forward_ops"
    return timed(step, args.warmup, args.steps), "ms_per_step"


def count_float_ops(f):
    """Aten operations with a floating-point result that one call of `f` dispatches: the
    counterpart of `transfusion-train bench`'s forward ops (float tensor ops of the forward
    pass; integer and boolean ops not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                Count.n += 1
            return out

    with Count():
        f()
    return Count.n


def prefix_cache(model, c, rows, prompt):
    """The KV cache of `rows` prompts of `prompt` tokens."""
    tokens = torch.randint(5, c.vocab, (rows, prompt))
    pos = torch.arange(prompt).expand(rows, prompt)
    causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()[None, None].expand(rows, 1, -1, -1)
    _, cache = model.decoder(model.emb(tokens), pos, causal)
    return cache


@torch.no_grad()
def time_diffusion(args):
    c = Config.preset(args.preset)
    model = Tiny(c).eval()
    rows = 2 if args.cfg != 1.0 else 1
    cache = prefix_cache(model, c, rows, args.prompt_tokens)
    n = c.patches
    pos = (args.prompt_tokens + 1 + torch.arange(n)).expand(rows, n)
    # Patches see the whole prefix (and BOI, folded into the prefix here) and each other.
    allowed = torch.ones(rows, 1, n, args.prompt_tokens + n, dtype=torch.bool)
    ab = cosine_alpha_bar(c.timesteps)
    state = {"x": torch.randn(1, c.channels, c.latent, c.latent), "t": 999}

    def step():
        t = state["t"]
        x = state["x"].expand(rows, -1, -1, -1)
        tt = torch.full((rows,), t)
        h, _ = model.decoder(model.encode_images(x, tt), pos, allowed, cache)
        eps = model.decode_images(h)
        if rows == 2:
            eps = eps[1:] + args.cfg * (eps[:1] - eps[1:])
        a, a_prev = ab[t], ab[max(t - 20, 0)]
        x0 = (state["x"] - (1 - a).sqrt() * eps) / a.sqrt()
        state["x"] = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        state["t"] = max(t - 20, 20)

    if args.count_ops:
        return count_float_ops(step), "step_ops"
    return timed(step, args.warmup, args.steps), "ms_per_step"


@torch.no_grad()
def time_text(args):
    c = Config.preset(args.preset)
    model = Tiny(c).eval()
    prompt = args.prompt_tokens
    tokens = torch.randint(5, c.vocab, (1, prompt))
    pos = torch.arange(prompt)[None]
    causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()[None, None]

    def decode():
        h, cache = model.decoder(model.emb(tokens), pos, causal)
        nxt = model.head(h[:, -1]).argmax(-1)
        for i in range(args.text_tokens - 1):
            p = torch.tensor([[prompt + i]])
            allowed = torch.ones(1, 1, 1, prompt + i + 1, dtype=torch.bool)
            h, cache = model.decoder(model.emb(nxt[:, None]), p, allowed, cache)
            nxt = model.head(h[:, -1]).argmax(-1)

    ms = timed(decode, 1, max(3, args.steps // 5))
    return args.text_tokens / (ms / 1000.0), "tokens_per_s"


def autocast(args):
    """bf16 autocast of the forward pass (`--dtype bf16`), or nothing."""
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")


def sync():
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def timed(f, warmup, steps):
    for _ in range(warmup):
        f()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        f()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "diffusion", "text"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--preset", default="tiny", help="tiny or paper_160m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--count-ops", action="store_true",
                    help="print the float ops of one training forward pass (train) or of one "
                         "diffusion step (diffusion) instead of timing")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                    help="bf16: autocast the training forward pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    value, unit = {"train": time_train, "diffusion": time_diffusion, "text": time_text}[args.what](args)
    print(f"{unit} {value:.2f}" if isinstance(value, float) else f"{unit} {value}")


if __name__ == "__main__":
    main()
