//! Mixed precision: the decoder's matrix products in bf16 or f16 while the weights, the
//! residual stream, the norms, the softmax statistics of the loss and the optimizer stay
//! in f32.
//!
//! Each projection casts its input and its (f32) weight to the compute type, multiplies,
//! and casts the product back to f32; attention runs on compute-type queries, keys and
//! values. Autodiff carries the gradient back through the casts, so weight gradients
//! arrive in f32 and AdamW updates f32 master weights, the usual mixed-precision recipe.
//! Whether a backend supports a compute type is probed at run time
//! ([`Precision::check_backend`]): CUDA and the `flex` CPU backend support both;
//! `ndarray` supports neither.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

/// The type the decoder's matrix products are computed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Projections and attention in bfloat16 (8-bit exponent: no loss scaling needed).
    Bf16,
    /// Projections and attention in float16 (5-bit exponent: small gradients can
    /// underflow; prefer bf16 where the hardware has it).
    F16,
}

impl Precision {
    /// The compute type, `None` for f32 (no casts at all).
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(FloatDType::BF16),
            Self::F16 => Some(FloatDType::F16),
        }
    }

    /// Casts `x` to the compute type (unchanged for f32).
    pub fn to_compute<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.compute_dtype() {
            Some(dt) => x.cast(dt),
            None => x,
        }
    }

    /// Casts a compute-type result back to f32 (unchanged for f32).
    pub fn to_f32<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.compute_dtype() {
            Some(_) => x.cast(FloatDType::F32),
            None => x,
        }
    }

    /// `layer(x)` with the product in the compute type and the result in f32.
    ///
    /// # Shapes
    /// `[.., d_in] -> [.., d_out]`
    pub fn linear<B: Backend, const D: usize>(
        self,
        layer: &Linear<B>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        // One [rows, d_in] x [d_in, d_out] product instead of a batch of small ones: the
        // weight gradient is then one product too (no sum over the batch dimensions).
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([rows, dims[D - 1]]);
        let weight = self.to_compute(layer.weight.val());
        let bias = layer.bias.as_ref().map(|b| self.to_compute(b.val()));
        let y = self.to_f32(crate::ops::linear(self.to_compute(x), weight, bias));
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// An error naming the backend when it cannot compute in this precision (f32 always
    /// passes). Runs one small cast, product and cast back on `device`; the panics of an
    /// unsupporting backend (possibly on its device thread) are captured for the message
    /// instead of being printed.
    pub fn check_backend<B: Backend>(self, device: &B::Device) -> Result<(), String> {
        let Some(dt) = self.compute_dtype() else {
            return Ok(());
        };
        let messages = Arc::new(Mutex::new(Vec::<String>::new()));
        let previous = std::panic::take_hook();
        let sink = messages.clone();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown error".into());
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
        }));
        let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let a = Tensor::<B, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], device).cast(dt);
            let p = a.clone().matmul(a).cast(FloatDType::F32);
            p.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))
        }));
        std::panic::set_hook(previous);
        match probe {
            Ok(Ok(v)) if v == [7.0, 10.0, 15.0, 22.0] => Ok(()),
            Ok(Ok(v)) => Err(format!(
                "precision {self}: the backend computed a wrong test product {v:?}"
            )),
            Ok(Err(e)) => Err(format!("precision {self}: {e}")),
            Err(_) => {
                let why = messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "unknown error".into());
                Err(format!(
                    "precision {self} is not supported by this backend ({why}); \
                     use precision = \"f32\", or the flex CPU backend / CUDA for {self}"
                ))
            }
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            other => Err(format!(
                "unknown precision `{other}` (expected f32, bf16 or f16)"
            )),
        }
    }
}
