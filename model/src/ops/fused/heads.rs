//! The attention's head layout changes on `flex`, `[b, s, h, hd] -> [b, h, s, hd]` with the
//! rotary embedding applied on the way, and `[b, h, s, hd] -> [b, s, h*hd]`, each one pass
//! over the rows forward and one backward.
//!
//! The composition rotates with five recorded operations (two half-width slices, their
//! concatenation, two products and a sum; their backward passes zero-fill two full-size
//! gradients for the slices) and then moves the heads with a row gather, whose backward
//! pass is a zero-filled row scatter. Here the rows are moved and turned in one pass, and
//! the backward pass moves them back turned the other way: the rotation is orthogonal, so
//! its gradient is the inverse rotation.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{DType, Shape};
use std::mem::MaybeUninit;

use super::math::multiversion;
use super::{
    contiguous, dense, filled, flex_from, path, primitive, record, tensor, AutodiffFlexTensor, Path,
};
use crate::rope::{apply_rope, RopeTables};

/// `[b, s, h, hd] -> [b, h, s, hd]`, rotated by `rope` first when given (as
/// [`apply_rope`]; the tables are constants: no gradient reaches them).
///
/// On `flex` the result is contiguous; elsewhere it is a transposed view.
///
/// # Shapes
/// - `x`: `[b, s, h, hd]`; `rope` tables `[b, s, h, hd]`
/// - output: `[b, h, s, hd]`
pub fn heads_first<B: Backend>(x: Tensor<B, 4>, rope: Option<&RopeTables<B>>) -> Tensor<B, 4> {
    let f32s = x.dtype() == DType::F32
        && rope.is_none_or(|r| r.cos.dtype() == DType::F32 && r.sin.dtype() == DType::F32);
    let tables = |to_flex: fn(Tensor<B, 4>) -> FlexTensor| {
        rope.map(|r| Tables {
            cos: to_flex(r.cos.clone()),
            sin: to_flex(r.sin.clone()),
        })
    };
    match path::<B>().filter(|_| f32s) {
        Some(Path::Flex) => {
            let tables = tables(primitive);
            tensor(first_forward(&primitive(x), tables.as_ref()))
        }
        Some(Path::AutodiffFlex) => {
            let tables = tables(|t| primitive::<B, 4, AutodiffFlexTensor>(t).primitive);
            tensor(first_autodiff(primitive(x), tables))
        }
        None => match rope {
            Some(rope) => apply_rope(x, rope),
            None => x,
        }
        .swap_dims(1, 2),
    }
}

/// `[b, h, s, hd] -> [b, s, h*hd]`.
///
/// # Shapes
/// - `x`: `[b, h, s, hd]`; output `[b, s, h*hd]`
pub fn heads_last<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, hd] = x.dims();
    match path::<B>().filter(|_| x.dtype() == DType::F32) {
        Some(Path::Flex) => tensor(last_forward(&primitive(x))),
        Some(Path::AutodiffFlex) => tensor(last_autodiff(primitive(x))),
        None => x.swap_dims(1, 2).reshape([b, s, h * hd]),
    }
}

/// RoPE tables as `flex` tensors, `[b, s, h, hd]` (see [`RopeTables`]).
#[derive(Clone, Debug)]
struct Tables {
    cos: FlexTensor,
    sin: FlexTensor,
}

/// How rows are turned on their way.
#[derive(Clone, Copy)]
enum Turn<'a> {
    /// Moved as they are.
    Not,
    /// Rotated by the tables' rows at the input's row (the forward pass).
    Rotate { cos: &'a [f32], sin: &'a [f32] },
    /// Rotated back by the tables' rows at the output's row (the backward pass).
    Unrotate { cos: &'a [f32], sin: &'a [f32] },
}

/// The rows of `hd` values of `x`, laid out `[b, m, n]`, moved to `[b, n, m]` (output row
/// `(bi, j, i)` is input row `(bi, i, j)`) and turned by `turn`.
fn swap_row_axes(x: &[f32], [b, m, n]: [usize; 3], hd: usize, turn: Turn) -> Vec<f32> {
    assert_eq!(x.len(), b * m * n * hd, "rows of the head layout change");
    // SAFETY: every output row is written below.
    unsafe {
        filled(x.len(), hd, |at, chunk| {
            for (r, out) in chunk.chunks_mut(hd).enumerate() {
                let o = at / hd + r;
                let (bi, j, i) = (o / (n * m), o / m % n, o % m);
                let src = (bi * m + i) * n + j;
                let row = row_of(x, src, hd);
                match turn {
                    Turn::Not => {
                        for (out, &v) in out.iter_mut().zip(row) {
                            out.write(v);
                        }
                    }
                    Turn::Rotate { cos, sin } => {
                        let (s1, s2) = row_of(sin, src, hd).split_at(hd / 2);
                        rotated_row(out, row, row_of(cos, src, hd), s1, s2);
                    }
                    Turn::Unrotate { cos, sin } => {
                        let (s1, s2) = row_of(sin, o, hd).split_at(hd / 2);
                        rotated_row(out, row, row_of(cos, o, hd), s2, s1);
                    }
                }
            }
        })
    }
}

/// Row `at` of rows of `hd` values.
fn row_of(values: &[f32], at: usize, hd: usize) -> &[f32] {
    &values[at * hd..(at + 1) * hd]
}

multiversion! {
    /// One row turned by the half-split rotation: `y1 = x1 c1 + x2 s1`,
    /// `y2 = x2 c2 + x1 s2` (halves of `hd/2`). With the tables' sine halves in place
    /// (`s1 = -sin`, `s2 = sin`) this is the rotation; with them swapped, its inverse.
    fn rotated_row(out: &mut [MaybeUninit<f32>], x: &[f32], cos: &[f32], s1: &[f32], s2: &[f32]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = cos.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        for i in 0..half {
            o1[i].write(x1[i] * c1[i] + x2[i] * s1[i]);
            o2[i].write(x2[i] * c2[i] + x1[i] * s2[i]);
        }
    }
}

/// [`heads_first`] on `flex`: `[b, s, h, hd] -> [b, h, s, hd]`, rotated by the tables.
fn first_forward(x: &FlexTensor, tables: Option<&Tables>) -> FlexTensor {
    first_move(x, tables, true)
}

/// The gradient of [`heads_first`]: `[b, h, s, hd] -> [b, s, h, hd]`, rotated back.
fn first_backward(dy: &FlexTensor, tables: Option<&Tables>) -> FlexTensor {
    first_move(dy, tables, false)
}

/// The rows of `x`, `[b, m, n, hd]`, moved to `[b, n, m, hd]`; with tables (`[b, s, h, hd]`,
/// at the `[b, s, h]` side), rotated when `forward`, rotated back otherwise.
fn first_move(x: &FlexTensor, tables: Option<&Tables>, forward: bool) -> FlexTensor {
    let [b, m, n, hd] = dims(x);
    let [x] = contiguous([x]);
    let out = match tables {
        Some(t) => {
            let [cos, sin] = contiguous([&t.cos, &t.sin]);
            let (cos, sin) = (dense(&cos), dense(&sin));
            assert_eq!(cos.len(), b * m * n * hd, "RoPE tables for [b, s, h, hd]");
            let turn = if forward {
                Turn::Rotate { cos, sin }
            } else {
                Turn::Unrotate { cos, sin }
            };
            swap_row_axes(dense(&x), [b, m, n], hd, turn)
        }
        None => swap_row_axes(dense(&x), [b, m, n], hd, Turn::Not),
    };
    flex_from(out, Shape::from(vec![b, n, m, hd]))
}

/// [`heads_last`] on `flex`.
fn last_forward(x: &FlexTensor) -> FlexTensor {
    let [b, h, s, hd] = dims(x);
    let [x] = contiguous([x]);
    let out = swap_row_axes(dense(&x), [b, h, s], hd, Turn::Not);
    flex_from(out, Shape::from(vec![b, s, h * hd]))
}

/// The gradient of [`heads_last`]: `[b, s, h*hd] -> [b, h, s, hd]`.
fn last_backward(dy: &FlexTensor, h: usize, hd: usize) -> FlexTensor {
    let shape = dy.layout().shape();
    let (b, s) = (shape[0], shape[1]);
    let [dy] = contiguous([dy]);
    let out = swap_row_axes(dense(&dy), [b, s, h], hd, Turn::Not);
    flex_from(out, Shape::from(vec![b, h, s, hd]))
}

/// The four dimensions of a rank-4 tensor.
fn dims(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    assert_eq!(shape.num_dims(), 4, "a rank-4 tensor");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Which move a recorded head layout change made.
#[derive(Clone, Debug)]
enum Moved {
    /// [`heads_first`], with its tables when it rotated.
    First(Option<Tables>),
    /// [`heads_last`] of `h` heads of `hd` values.
    Last { h: usize, hd: usize },
}

#[derive(Debug)]
struct HeadsBackward;

impl Backward<Flex, 1> for HeadsBackward {
    type State = Moved;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let [x_node] = ops.parents;
        if let Some(node) = x_node {
            let dx = match ops.state {
                Moved::First(tables) => first_backward(&dy, tables.as_ref()),
                Moved::Last { h, hd } => last_backward(&dy, h, hd),
            };
            grads.register::<Flex>(node.id, dx);
        }
    }
}

fn first_autodiff(x: AutodiffFlexTensor, tables: Option<Tables>) -> AutodiffFlexTensor {
    let out = first_forward(&x.primitive, tables.as_ref());
    record(HeadsBackward, [&x], Moved::First(tables), out)
}

fn last_autodiff(x: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let [_, h, _, hd] = dims(&x.primitive);
    let out = last_forward(&x.primitive);
    record(HeadsBackward, [&x], Moved::Last { h, hd }, out)
}
