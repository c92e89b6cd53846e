//! The linear layer `x w (+ bias)` on `flex` with its own backward pass: the three
//! products (`x w`, `dy w^T`, `x^T dy`) go straight to `gemm` with the transposes read in
//! place (see [`super::gemm`]); the bias, where there is one, is added by Burn.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::DType;

use super::gemm::matmul;
use super::{path, primitive, record, tensor, AutodiffFlexTensor, Path};

/// `x w + bias`, Burn's linear layer ([`burn::tensor::module::linear`]) on two-dimensional
/// input.
///
/// # Shapes
/// - `x`: `[rows, d_in]`, `weight`: `[d_in, d_out]`, `bias`: `[d_out]`
/// - output: `[rows, d_out]`
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    let product = match path::<B>().filter(|_| f32s) {
        Some(Path::Flex) => {
            let (x, w): (FlexTensor, FlexTensor) = (primitive(x), primitive(weight));
            tensor(matmul(&x, &w, 1.0))
        }
        Some(Path::AutodiffFlex) => tensor(linear_autodiff(primitive(x), primitive(weight))),
        None => return crate::ops::reference::linear(x, weight, bias),
    };
    match bias {
        Some(bias) => product + bias.unsqueeze(),
        None => product,
    }
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    /// `(x, weight)`.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        // [rows, d_out]
        let dy = grads.consume::<Flex>(&ops.node);
        let [x_node, w_node] = ops.parents;
        if let Some(node) = x_node {
            // [rows, d_out] x [d_out, d_in]
            grads.register::<Flex>(node.id, matmul(&dy, &w.transpose(0, 1), 1.0));
        }
        if let Some(node) = w_node {
            // [d_in, rows] x [rows, d_out]
            grads.register::<Flex>(node.id, matmul(&x.transpose(0, 1), &dy, 1.0));
        }
    }
}

fn linear_autodiff(x: AutodiffFlexTensor, w: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let out = matmul(&x.primitive, &w.primitive, 1.0);
    let state = (x.primitive.clone(), w.primitive.clone());
    record(LinearBackward, [&x, &w], state, out)
}
