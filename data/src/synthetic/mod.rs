//! The synthetic image-caption sets the demos train and measure on, drawn on the fly from
//! a seed (no files): [`shapes`] (coloured shapes, the default demo) and [`digits`] (one
//! digit per image, the fine-distinction captioning benchmark).

pub mod digits;
pub mod shapes;
