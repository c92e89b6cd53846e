#!/usr/bin/env bash
# The GPU checks of the speed work, in one call of a few minutes on a lent GPU machine (which
# has PyTorch and CUDA but no Rust). Prints: CUDA-vs-CPU agreement of the demo checkpoint's
# outputs, `bench --preset paper_160m` step time and MFU in f32 and bf16, the PyTorch
# reference of the same config on the same GPU, and the cached diffusion step time.
#
# Build here (the cuda feature compiles Burn's CUDA backend; about 20 minutes on 2 cores),
# pinning the CUDA version the binaries bind to (cudarc otherwise takes the newest it knows,
# which a machine with an older driver refuses); 12.8 matches the PyTorch wheels' CUDA 12:
#   CUDARC_CUDA_VERSION=12080 CARGO_TARGET_DIR=target-cuda cargo build --release --bins -p transfusion-train \
#     -p transfusion-infer --features transfusion-train/cuda,transfusion-infer/cuda
#   mkdir -p bin-cuda && cp target-cuda/release/transfusion{,-train} bin-cuda/ && strip bin-cuda/*
# then carry bin-cuda/ to the GPU machine and run there, from the repository root:
#   bash scripts/gpu/check.sh bin-cuda
# Environment: PYTHON (default python3, with torch), PEAK_F32 / PEAK_BF16 (dense TFLOP/s of
# the GPU for MFU; defaults are an H100/H200 SXM's datasheet figures), OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-bin-cuda}
PY=${PYTHON:-python3}
PEAK_F32=${PEAK_F32:-67}
PEAK_BF16=${PEAK_BF16:-989}
OUT=${OUT:-/tmp/gpu-check}
REF=scripts/pytorch_reference/transfusion_tiny.py
CKPT=assets/demo-checkpoint
PROMPT="a large red circle at the top left"
mkdir -p "$OUT"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

# CubeCL compiles kernels with NVRTC at run time; on a machine whose CUDA comes with the
# PyTorch wheel, NVRTC and the runtime live in the wheel's nvidia/*/lib folders.
NV=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null \
  || "$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
if [ -n "$NV" ]; then
  for lib in "$NV"/*/lib; do LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"; done
  export LD_LIBRARY_PATH
  ls "$NV"/cuda_nvrtc/lib/libnvrtc* >/dev/null 2>&1 && echo "NVRTC: $NV/cuda_nvrtc/lib" \
    || echo "warning: no NVRTC under $NV/cuda_nvrtc/lib"
fi

section() { printf '\n== %s\n' "$*"; }
run() { echo "\$ $*"; "$@" 2>&1 | tail -n 30; }

section "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for b in transfusion transfusion-train; do
  [ -x "$BIN/$b" ] || { echo "error: $BIN/$b missing (see the build lines at the top)"; exit 1; }
done

section "CUDA vs CPU: the demo checkpoint's text, image (DDIM 50, CFG 3, seed 0) and caption"
for dev in cpu cuda; do
  "$BIN/transfusion" --device $dev text --checkpoint $CKPT --prompt "a large red" \
    --max-tokens 16 --temperature 0 >"$OUT/text-$dev.txt" 2>"$OUT/text-$dev.err"
  "$BIN/transfusion" --device $dev image --checkpoint $CKPT --prompt "$PROMPT" --sampler ddim \
    --steps 50 --cfg 3 --seed 0 --out "$OUT/image-$dev.png" >/dev/null 2>"$OUT/image-$dev.err"
  "$BIN/transfusion" --device $dev caption --checkpoint $CKPT --image "$OUT/image-cpu.png" --temperature 0 \
    >"$OUT/caption-$dev.txt" 2>"$OUT/caption-$dev.err"
done
for what in text caption; do
  if cmp -s "$OUT/$what-cpu.txt" "$OUT/$what-cuda.txt"; then
    echo "$what: identical ($(tr '\n' ' ' <"$OUT/$what-cpu.txt"))"
  else
    echo "$what: DIFFERENT"; echo "  cpu:  $(cat "$OUT/$what-cpu.txt")"; echo "  cuda: $(cat "$OUT/$what-cuda.txt")"
    cat "$OUT/$what-cuda.err" | tail -n 5
  fi
done
"$PY" - "$OUT/image-cpu.png" "$OUT/image-cuda.png" <<'PYEOF'
# Pixel agreement of two 8-bit RGB PNGs (a minimal decoder: no PIL needed).
import struct, sys, zlib
def read_png(path):
    data = open(path, "rb").read()
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), "8-bit RGB/RGBA only"
            ch = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), w * ch, [], bytearray(w * ch)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b, c = prev[i], prev[i - ch] if i >= ch else 0
            p = a + b - c
            pred = [0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)][f]
            line[i] = (line[i] + pred) & 255
        rows.append(line); prev = line
    return b"".join(rows)
a, b = (read_png(p) for p in sys.argv[1:3])
diff = [abs(x - y) for x, y in zip(a, b)]
print(f"image: max |cpu - cuda| = {max(diff)} of 255, mean {sum(diff) / len(diff):.3f}, "
      f"{sum(d > 2 for d in diff)} of {len(diff)} values differ by more than 2")
PYEOF

section "training step, paper_160m, 8 rows x 512 (this project)"
for p in f32 bf16; do
  peak=$PEAK_F32; [ $p = bf16 ] && peak=$PEAK_BF16
  run "$BIN/transfusion-train" bench --preset paper_160m --device cuda --seq-len 512 --batch 8 \
    --steps 10 --warmup 5 --precision $p --peak-tflops "$peak"
done

for recompute in layers none; do
  section "training step, paper_160m at the paper's length: 8 rows x 4096, bf16, recompute $recompute"
  flag=""; [ $recompute = layers ] && flag="--recompute"
  # Burn 0.21 reports no device peak: sample the GPU's used memory every 100 ms meanwhile.
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT/mem-$recompute.txt" &
  SAMPLER=$!
  run "$BIN/transfusion-train" bench --preset paper_160m --device cuda --seq-len 4096 --batch 8 \
    --steps 5 --warmup 2 --precision bf16 --peak-tflops "$PEAK_BF16" --memory $flag
  kill $SAMPLER 2>/dev/null
  echo "peak GPU memory used (nvidia-smi samples): $(sort -n "$OUT/mem-$recompute.txt" | tail -n 1) MiB"
  echo "the memory plan: $("$BIN/transfusion-train" plan --config train/configs/paper_160m.toml \
    --precision bf16 --recompute $recompute 2>&1 | grep 'peak per device')"
done

section "training step, paper_160m, 8 rows x 512 (PyTorch reference, eager)"
for p in f32 bf16; do
  echo "$p: $("$PY" $REF train --preset paper_160m --device cuda --seq-len 512 --batch 8 \
    --steps 10 --warmup 5 --dtype $p)"
done

section "cached diffusion step with CFG 3 (this project, then PyTorch)"
run "$BIN/transfusion" --device cuda bench --checkpoint $CKPT --no-recompute
run "$BIN/transfusion" --device cuda bench --preset paper_160m --no-recompute --ddpm-steps 1 \
  --ddim-steps 1 --batch 1 --prompt-tokens 64 --text-tokens 64 --cfg 3
echo "pytorch paper_160m diffusion: $("$PY" $REF diffusion --preset paper_160m --device cuda --prompt-tokens 64 --cfg 3)"
echo "pytorch tiny diffusion: $("$PY" $REF diffusion --device cuda --prompt-tokens 64 --cfg 3)"
