//! The start-up check that a SIMD path computes what the portable twin does.
//!
//! A path may be written and built on a machine that cannot run it, so
//! before the kernels use a path it multiplies small random matrices of every
//! weight format by m = 1, 5 and 16 activation rows on it and on the
//! portable twin, and compares the results bit for bit (a few milliseconds).
//! [`crate::cpu::choose`] skips a path that disagrees.

use crate::cpu::Isa;
use crate::matmul::{matmul_on, MatmulScratch, QMatrix};
use crate::pool::ThreadPool;
use crate::quant::Format;

/// Every weight format the matmul takes.
pub const FORMATS: [Format; 5] = [Format::F32, Format::F16, Format::Q8_0, Format::Q4_0, Format::Q4_1];

/// Row counts checked: one row, a tile's worth, and more than one tile.
const MS: [usize; 3] = [1, 5, 16];

/// Checks `isa` against the portable twin; `Err((format, m))` names the
/// first disagreement. `corrupt` flips a bit of the path's first result, so
/// tests can watch the fallback work.
pub(crate) fn check(isa: Isa, corrupt: bool) -> Result<(), (&'static str, usize)> {
    if !isa.supported() {
        return Err(("unsupported", 0));
    }
    let pool = ThreadPool::new(1);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    // 40 rows: two full groups and a padded one; 96 columns: three blocks.
    let (n, k) = (40, 96);
    let mut scratch = MatmulScratch::default();
    for &m in &MS {
        for format in FORMATS {
            let k = if format.is_blocked() { k } else { k + 5 };
            let values: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let w = QMatrix::quantize(format, n, k, &values).expect("valid shape");
            let x: Vec<f32> = (0..m * k).map(|_| next() * 3.0).collect();
            let mut want = vec![0f32; m * n];
            matmul_on(Isa::Portable, &pool, &w, &x, m, &mut want, &mut scratch);
            let mut got = vec![0f32; m * n];
            matmul_on(isa, &pool, &w, &x, m, &mut got, &mut scratch);
            if corrupt {
                got[0] = f32::from_bits(got[0].to_bits() ^ 1);
            }
            if got.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()) {
                return Err((format.name(), m));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_this_cpu_has_passes_its_check() {
        for isa in Isa::ALL {
            if isa == Isa::Portable {
                continue;
            }
            if !isa.supported() {
                println!("{}: skipped, this CPU lacks it", isa.name());
                continue;
            }
            assert_eq!(check(isa, false), Ok(()), "{}", isa.name());
            assert!(check(isa, true).is_err(), "{}: a corrupted result must be caught", isa.name());
            println!("{}: bit-identical to portable", isa.name());
        }
    }
}
