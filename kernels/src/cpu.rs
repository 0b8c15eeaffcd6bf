//! Which instruction-set path the kernels run on, chosen once per process.
//!
//! Four paths, best first: `avx512` (AVX-512 F/BW/VL with VNNI's 512-bit
//! `vpdpbusd`), `vnni256` (256-bit `vpdpbusd`, from AVX-512 VNNI+VL or from
//! AVX-VNNI), `avx2` (AVX2 + FMA + F16C) and `portable` (plain Rust). The
//! choice is made at run time from the CPU's features, never from build
//! flags, so one binary runs everywhere and uses what the CPU has.
//! `OURO_ISA=portable|avx2|vnni256|avx512` asks for a lower path (a benchmark
//! or test compares paths in one run this way); asking for one the CPU lacks
//! gives the best it has, with a warning.
//!
//! Every path computes the matmul formats bit for bit like the portable
//! twin. Before a path is used it proves that on this CPU
//! ([`crate::isa_check`]): a path that disagrees is skipped for the next one
//! down and the skip is recorded in [`IsaChoice::fallbacks`]. The answer is
//! then fixed for the life of the process, so every call takes the same
//! arithmetic path (a requirement of batch invariance).

use std::sync::OnceLock;

/// An instruction-set path of the kernels, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD: the reference every path matches.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// AVX2 plus 256-bit VNNI (`vpdpbusd` on `ymm`).
    Vnni256,
    /// AVX-512 F, BW and VL with VNNI (`vpdpbusd` on `zmm`).
    Avx512,
}

impl Isa {
    /// Every path, best first.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Vnni256, Isa::Avx2, Isa::Portable];

    /// Short name for logs, metrics and `OURO_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Vnni256 => "vnni256",
            Isa::Avx512 => "avx512",
        }
    }

    /// The path named `s` (as [`Isa::name`] writes it).
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether the x86 AVX2 kernels (attention, elementwise ops, dense
    /// matmuls) may run: every SIMD path includes AVX2.
    pub fn has_avx2(self) -> bool {
        self >= Isa::Avx2
    }

    /// The next path down (the one tried when this one fails its check).
    pub fn lower(self) -> Option<Isa> {
        match self {
            Isa::Avx512 => Some(Isa::Vnni256),
            Isa::Vnni256 => Some(Isa::Avx2),
            Isa::Avx2 => Some(Isa::Portable),
            Isa::Portable => None,
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"),
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni256 => Isa::Avx2.supported() && (has_avx512_vnni_vl() || is_x86_feature_detected!("avxvnni")),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.supported() && is_x86_feature_detected!("avx512bw") && has_avx512_vnni_vl(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// AVX-512 F + VL + VNNI: the EVEX form of the 256- and 512-bit `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_vnni_vl() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni")
}

/// A path that failed its check at start and was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The path skipped.
    pub isa: Isa,
    /// The first weight format it disagreed on.
    pub format: &'static str,
    /// The row count of the disagreeing call.
    pub m: usize,
}

/// The path in use and how it was chosen.
#[derive(Debug, Clone)]
pub struct IsaChoice {
    /// The path every kernel runs on.
    pub isa: Isa,
    /// The best path this CPU supports.
    pub best: Isa,
    /// The path `OURO_ISA` asked for, if any.
    pub requested: Option<Isa>,
    /// Paths that failed their check, best first.
    pub fallbacks: Vec<Fallback>,
    /// Why the request could not be honoured, if it could not.
    pub warning: Option<String>,
}

static CHOICE: OnceLock<IsaChoice> = OnceLock::new();

/// The path the kernels run on (chosen and checked on first use).
pub fn isa() -> Isa {
    choice().isa
}

/// The path in use with how it was chosen, for start logs and metrics.
pub fn choice() -> &'static IsaChoice {
    CHOICE.get_or_init(|| {
        let requested = std::env::var("OURO_ISA").ok();
        let corrupt = std::env::var("OURO_ISA_CHECK_CORRUPT").ok().and_then(|s| Isa::parse(&s));
        choose(requested.as_deref(), corrupt)
    })
}

/// Picks the path for a request (`OURO_ISA`'s value) and checks it, falling
/// back down the list while a path disagrees with the portable twin.
/// `corrupt` makes that path's check fail (for tests of the fallback; set in
/// a process through `OURO_ISA_CHECK_CORRUPT`).
pub fn choose(requested: Option<&str>, corrupt: Option<Isa>) -> IsaChoice {
    let best = Isa::ALL.into_iter().find(|i| i.supported()).unwrap_or(Isa::Portable);
    let mut warning = None;
    let parsed = match requested.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match Isa::parse(s) {
            Some(i) => Some(i),
            None => {
                warning = Some(format!("OURO_ISA={s} is not one of portable, avx2, vnni256, avx512; using {}", best.name()));
                None
            }
        },
    };
    let mut start = best;
    if let Some(r) = parsed {
        if r > best {
            warning = Some(format!("OURO_ISA={} needs CPU features this machine lacks; using {}", r.name(), best.name()));
        } else {
            start = r;
        }
    }
    let mut fallbacks = Vec::new();
    let mut isa = start;
    while isa != Isa::Portable {
        match crate::isa_check::check(isa, corrupt == Some(isa)) {
            Ok(()) => break,
            Err((format, m)) => {
                fallbacks.push(Fallback { isa, format, m });
                isa = isa.lower().unwrap_or(Isa::Portable);
                while !isa.supported() {
                    isa = isa.lower().unwrap_or(Isa::Portable);
                }
            }
        }
    }
    IsaChoice { isa, best, requested: parsed, fallbacks, warning }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
    }

    #[test]
    fn a_request_for_a_lower_path_is_honoured_and_an_unknown_one_warns() {
        let c = choose(Some("portable"), None);
        assert_eq!(c.isa, Isa::Portable);
        assert!(c.fallbacks.is_empty());
        let c = choose(Some("sse9"), None);
        assert_eq!(c.isa, c.best);
        assert!(c.warning.as_deref().unwrap().contains("sse9"));
    }

    #[test]
    fn a_path_that_disagrees_with_the_portable_twin_falls_back_to_the_next_one() {
        let best = choose(None, None);
        if best.isa == Isa::Portable {
            eprintln!("skipped: this CPU has no SIMD path to fail over from");
            return;
        }
        println!("paths checked: {}", Isa::ALL.iter().filter(|i| i.supported()).map(|i| i.name()).collect::<Vec<_>>().join(", "));
        let c = choose(None, Some(best.isa));
        assert_ne!(c.isa, best.isa, "the corrupted path must not be used");
        assert!(c.isa < best.isa);
        assert_eq!(c.fallbacks.len(), 1);
        assert_eq!(c.fallbacks[0].isa, best.isa);
        assert_eq!(c.fallbacks[0].m, 1, "the first call checked (m = 1) is the one reported");
    }
}
