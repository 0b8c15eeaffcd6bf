//! # ouro kernels
//!
//! Compute primitives on plain buffers, with no knowledge of models or
//! sequences. The engine calls them from its forward pass:
//!
//! - [`matmul`]: a weight matrix ([`QMatrix`], GGUF block formats or dense)
//!   times a few activation rows, batch invariant, split over a [`ThreadPool`].
//! - [`attention`]: new rows against a paged KV cache ([`KvSource`]), fused
//!   online-softmax attention, causal within the new rows.
//! - [`ops`]: RMSNorm, rotary embeddings, SwiGLU, residual adds.
//! - [`quant`]: the block formats and activation quantization.
//! - [`verify`]: speculative verification (greedy and rejection sampling).
//!
//! Every SIMD kernel has a portable twin; [`cpu::isa`] picks a path
//! (`avx512`, `vnni256`, `avx2` or `portable`) once per process, after
//! checking that it computes the matmul formats bit for bit like the
//! portable twin. Tests compare each kernel with its twin and with an `f64`
//! reference, and check batch invariance bit for bit.
//!
//! ```
//! use kernels::{matmul, Format, MatmulScratch, QMatrix, ThreadPool};
//! let pool = ThreadPool::new(2);
//! let w = QMatrix::quantize(Format::Q8_0, 2, 32, &[0.5; 64]).unwrap();
//! let x = vec![1.0f32; 32];
//! let mut out = vec![0f32; 2];
//! matmul(&pool, &w, &x, 1, &mut out, &mut MatmulScratch::default());
//! assert!((out[0] - 16.0).abs() < 0.1);
//! ```

#![deny(missing_docs)]

pub mod attention;
pub mod bandwidth;
pub mod cpu;
pub mod interleave;
mod isa_check;
pub mod matmul;
pub mod ops;
mod pool;
pub mod quant;
pub mod verify;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{attend, AttnSeq, AttnShape, KvElem, KvSource};
pub use isa_check::FORMATS;
pub use matmul::{matmul, MatmulScratch, MatrixError, QMatrix};
pub use pool::ThreadPool;
pub use quant::Format;
