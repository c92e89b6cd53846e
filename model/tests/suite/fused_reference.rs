//! f64 references of the fused kernels' outputs and gradients, written out in plain Rust
//! loops: independent of every Burn backend (a Burn f64 reference on `NdArray<f64>` shares
//! its device's default dtype with `NdArray<f32>`, whichever test sets it first).

use burn::backend::Flex;
use burn::prelude::*;

/// A tensor's values in f64, row-major.
fn values<const D: usize>(t: &Tensor<Flex, D>) -> Vec<f64> {
    t.to_data().convert::<f64>().to_vec().unwrap()
}

fn data(v: Vec<f64>) -> TensorData {
    let n = v.len();
    TensorData::new(v, [n])
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `[output, d gate, d up]` of `sum(w * silu(gate) * up)`.
pub fn swiglu([gate, up, w]: &[Tensor<Flex, 3>; 3]) -> [TensorData; 3] {
    let (g, u, w) = (values(gate), values(up), values(w));
    let mut out = vec![0.0; g.len()];
    let mut dg = out.clone();
    let mut du = out.clone();
    for i in 0..g.len() {
        let s = sigmoid(g[i]);
        let silu = g[i] * s;
        out[i] = silu * u[i];
        du[i] = w[i] * silu;
        dg[i] = w[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
    [data(out), data(dg), data(du)]
}

/// `[output, dx^T, dw, dbias]` of `sum(g * (x w + bias))`, `x` given as `x^T [d_in, rows]`.
pub fn linear([x_t, w, bias, g]: &[Tensor<Flex, 2>; 4]) -> [TensorData; 4] {
    let [d_in, rows] = x_t.dims();
    let d_out = w.dims()[1];
    let (xt, w, b, g) = (values(x_t), values(w), values(bias), values(g));
    let x = |r: usize, i: usize| xt[i * rows + r];
    let mut out = vec![0.0; rows * d_out];
    let mut dxt = vec![0.0; d_in * rows];
    let mut dw = vec![0.0; d_in * d_out];
    let mut db = vec![0.0; d_out];
    for r in 0..rows {
        for o in 0..d_out {
            let go = g[r * d_out + o];
            let mut y = b[o];
            for i in 0..d_in {
                y += x(r, i) * w[i * d_out + o];
                dxt[i * rows + r] += go * w[i * d_out + o];
                dw[i * d_out + o] += x(r, i) * go;
            }
            out[r * d_out + o] = y;
            db[o] += go;
        }
    }
    [data(out), data(dxt), data(dw), data(db)]
}

/// `[output, dx, d gamma]` of `sum(g * x / rms(x) * gamma)`, `rms = sqrt(mean(x^2) + 1e-5)`
/// over the last axis.
pub fn rms_norm([x, gamma, g]: &[Tensor<Flex, 3>; 3]) -> [TensorData; 3] {
    let d = x.dims()[2];
    let (x, gamma, g) = (values(x), values(gamma), values(g));
    let mut out = vec![0.0; x.len()];
    let mut dx = out.clone();
    let mut dgamma = vec![0.0; d];
    for ((row, grow), (orow, dxrow)) in x
        .chunks(d)
        .zip(g.chunks(d))
        .zip(out.chunks_mut(d).zip(dx.chunks_mut(d)))
    {
        let r = (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt();
        let dot: f64 = (0..d).map(|j| gamma[j] * grow[j] * row[j]).sum();
        for j in 0..d {
            orow[j] = row[j] / r * gamma[j];
            dgamma[j] += grow[j] * row[j] / r;
            dxrow[j] = gamma[j] * grow[j] / r - row[j] * dot / (d as f64 * r * r * r);
        }
    }
    [data(out), data(dx), data(dgamma)]
}

/// `[output, dq, dk, dv, dbias]` of `sum(w * softmax(q k^T / sqrt(hd) + bias) v)`; a row
/// whose keys are all masked gives zeros; bias gradients on visible keys only.
pub fn attention([q, k, v, bias]: &[Tensor<Flex, 4>; 4], w: &Tensor<Flex, 4>) -> [TensorData; 5] {
    let [b, h, s, hd] = q.dims();
    let lk = k.dims()[2];
    let scale = 1.0 / (hd as f64).sqrt();
    let (q, k, v, bias, w) = (values(q), values(k), values(v), values(bias), values(w));
    let mut out = vec![0.0; q.len()];
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut dbias = vec![0.0; bias.len()];
    for bh in 0..b * h {
        let (qo, ko, so) = (bh * s * hd, bh * lk * hd, bh * s * lk);
        for i in 0..s {
            // probabilities of row i
            let scores: Vec<f64> = (0..lk)
                .map(|j| {
                    let dot: f64 = (0..hd)
                        .map(|c| q[qo + i * hd + c] * k[ko + j * hd + c])
                        .sum();
                    dot * scale + bias[so + i * lk + j]
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = if max == f64::NEG_INFINITY {
                vec![0.0; lk]
            } else {
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.iter().map(|x| x / sum).collect()
            };
            let row = |t: &[f64], j: usize, c: usize| t[ko + j * hd + c];
            for c in 0..hd {
                out[qo + i * hd + c] = (0..lk).map(|j| p[j] * row(&v, j, c)).sum();
            }
            let d_out = &w[qo + i * hd..qo + (i + 1) * hd];
            let o = &out[qo + i * hd..qo + (i + 1) * hd];
            let dot: f64 = d_out.iter().zip(o).map(|(a, b)| a * b).sum();
            for j in 0..lk {
                let dp: f64 = (0..hd).map(|c| d_out[c] * row(&v, j, c)).sum();
                let ds = p[j] * (dp - dot);
                if bias[so + i * lk + j] == 0.0 {
                    dbias[so + i * lk + j] = ds;
                }
                for c in 0..hd {
                    dv[ko + j * hd + c] += p[j] * d_out[c];
                    dq[qo + i * hd + c] += ds * row(&k, j, c) * scale;
                    dk[ko + j * hd + c] += ds * q[qo + i * hd + c] * scale;
                }
            }
        }
    }
    [data(out), data(dq), data(dk), data(dv), data(dbias)]
}
