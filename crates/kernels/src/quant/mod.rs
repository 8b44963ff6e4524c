//! Scalar reference kernels for every block format.

pub mod dequant;
pub mod dot;
pub mod quantize;

#[cfg(test)]
pub(crate) mod tests;
