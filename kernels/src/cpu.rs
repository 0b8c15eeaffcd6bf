//! CPU feature detection, done once per process.
//!
//! Kernels ask [`isa()`] which instruction set to use; the answer is fixed for
//! the life of the process, so every call of a kernel takes the same
//! arithmetic path (a requirement of batch invariance). Tests reach the
//! portable twins directly to compare them with the SIMD kernels.

use std::sync::OnceLock;

/// The instruction set the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Isa {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
        }
    }
}

static ISA: OnceLock<Isa> = OnceLock::new();

/// The best instruction set this CPU supports, detected on first use.
pub fn isa() -> Isa {
    *ISA.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}
