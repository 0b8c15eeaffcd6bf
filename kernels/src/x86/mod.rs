//! x86-64 SIMD kernels, compiled with `#[target_feature]` and chosen at run
//! time by [`crate::cpu::isa`]. Each function here has a portable twin next to
//! its public entry point.

pub(crate) mod avx2;
pub(crate) mod qgemm;
