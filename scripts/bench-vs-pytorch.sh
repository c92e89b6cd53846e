#!/usr/bin/env bash
# Times this project against the independent PyTorch implementation of the same tiny model
# (scripts/pytorch_reference/transfusion_tiny.py) on the same machine and thread count,
# alternating A B A B, and prints one row per figure: the medians and their ratio.
#
#   scripts/bench-vs-pytorch.sh [ROUNDS]      (default 3 rounds)
#
# Environment: PYTHON (a python with torch; default python3), THREADS (default 2), NO_BUILD=1
# (time the binaries already built).
# Setup, outside the repository: python3 -m venv ~/venv-ref && ~/venv-ref/bin/pip install torch numpy
# Run it on an idle machine: a build or a second benchmark beside it distorts every figure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
THREADS=${THREADS:-2}
ROUNDS=${1:-3}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS
REF=scripts/pytorch_reference/transfusion_tiny.py

"$PY" -c "import torch" 2>/dev/null || {
  echo "error: $PY cannot import torch (set PYTHON to a python with torch installed)" >&2
  exit 1
}
# NO_BUILD=1: use the binaries already in $TARGET (default target/release).
TARGET=${TARGET:-${CARGO_TARGET_DIR:-target}/release}
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet --workspace --bins
TRAIN=$TARGET/transfusion-train
INFER=$TARGET/transfusion

# Figures of one round, one "name value" line each.
ours() {
  "$TRAIN" bench --preset tiny --device cpu --steps 10 --warmup 3 --json |
    "$PY" -c 'import json,sys; r = json.load(sys.stdin); print("train_ms", r["step_ms_median"]); print("forward_ops", r["forward_ops"])'
  "$INFER" --device cpu bench --preset tiny --no-recompute --ddpm-steps 1 --ddim-steps 1 \
    --batch 1 --prompt-tokens 64 --text-tokens 64 --cfg 3 |
    "$PY" -c '
import sys
for line in sys.stdin:
    if line.startswith("ms per diffusion step (kv cache, with CFG)"):
        print("diffusion_ms", line.split()[-2])
    if line.startswith("text tokens/s (kv cache)"):
        print("text_tok_s", line.split()[-2])
    if line.startswith("float tensor ops per diffusion step (kv cache, with CFG)"):
        print("step_ops", line.split()[-2])
'
}
theirs() {
  echo "train_ms $("$PY" $REF train --threads "$THREADS" --steps 10 --warmup 3 | cut -d' ' -f2)"
  echo "forward_ops $("$PY" $REF train --threads "$THREADS" --count-ops | cut -d' ' -f2)"
  echo "diffusion_ms $("$PY" $REF diffusion --threads "$THREADS" --prompt-tokens 64 --cfg 3 | cut -d' ' -f2)"
  echo "step_ops $("$PY" $REF diffusion --threads "$THREADS" --prompt-tokens 64 --cfg 3 --count-ops | cut -d' ' -f2)"
  echo "text_tok_s $("$PY" $REF text --threads "$THREADS" --prompt-tokens 64 --text-tokens 64 | cut -d' ' -f2)"
}

log=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS: ours" >&2
  ours | sed 's/^/ours /' >>"$log"
  echo "round $r/$ROUNDS: pytorch" >&2
  theirs | sed 's/^/torch /' >>"$log"
done

"$PY" - "$log" "$THREADS" "$ROUNDS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = lambda who, what: statistics.median(float(v) for w, n, v in rows if w == who and n == what)
print(f"tiny preset, {sys.argv[2]} threads each, medians of {sys.argv[3]} alternating rounds")
print(f"{'figure':<52} {'ours':>10} {'pytorch':>10} {'ours/pytorch':>13}")
for what, label, slower in [
    ("train_ms", "training step, 8x128 packed (ms)", lambda o, t: o / t),
    ("diffusion_ms", "kv-cached diffusion step with CFG, batch 1 (ms)", lambda o, t: o / t),
    ("text_tok_s", "kv-cached text decoding (tokens/s)", lambda o, t: t / o),
    ("forward_ops", "float tensor ops, one training forward pass", lambda o, t: o / t),
    ("step_ops", "float tensor ops, one cached diffusion step with CFG", lambda o, t: o / t),
]:
    o, t = med("ours", what), med("torch", what)
    print(f"{label:<52} {o:>10.2f} {t:>10.2f} {slower(o, t):>12.2f}x")
print("(last column: how many times longer this project takes, or how many more ops it runs;")
print(" 1.00x or less is the bar for the times)")
EOF
rm -f "$log"
