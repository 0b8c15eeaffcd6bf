//! The row-interleaved layout block-format weights are kept in.
//!
//! A matrix's rows (output features) go in groups of [`GROUP`] = 16; the last
//! group is padded with zero rows. A group is stored block by block: for each
//! 32-value block, the group's 16 rows side by side, then their scales. The
//! values are interleaved four bytes at a time: chunk `c` (64 bytes) holds
//! bytes `4c..4c+4` of the block of row 0, then of row 1, ... row 15. So one
//! 512-bit register holds four bytes of each of 16 rows and one `vpdpbusd`
//! against four activation bytes broadcast yields 16 outputs' partial dot
//! products in 16 lanes: no horizontal sums, and the nibbles are unpacked
//! once per block for every activation row of a tile. A 256-bit kernel
//! takes each chunk's first and second halves as rows 0-7 and 8-15.
//!
//! Per block of a group (`qs` = the values, `d`/`m` = 16 f16 each):
//! - `Q8_0`: 8 chunks of `q ^ 0x80` (the values biased to unsigned, the
//!   operand `vpdpbusd` takes as unsigned), then `d`: 544 bytes.
//! - `Q4_0`: 4 chunks of GGML's nibble bytes (low nibble: value `i`, high
//!   nibble: value `16 + i`), then `d`: 288 bytes.
//! - `Q4_1`: the same 4 chunks, then `d`, then `m`: 320 bytes.
//!
//! A group's blocks are consecutive, and groups follow each other, so a
//! task's weights are one sequential stream.

use crate::quant::{Format, BLOCK};

/// Output rows per interleaved group.
pub const GROUP: usize = 16;

/// Bytes of a chunk: four bytes of each of the group's rows.
pub(crate) const CHUNK: usize = 4 * GROUP;

/// Bytes of one block of values of one row.
pub(crate) fn qs_bytes(format: Format) -> usize {
    match format {
        Format::Q8_0 => 32,
        _ => 16,
    }
}

/// Bytes of the values of one block of a group (all chunks).
pub(crate) fn group_qs_bytes(format: Format) -> usize {
    qs_bytes(format) * GROUP
}

/// Bytes of one block of a group: values, then 16 `d`, then 16 `m` (Q4_1).
pub(crate) fn group_block_bytes(format: Format) -> usize {
    let scales = if format == Format::Q4_1 { 4 } else { 2 };
    (qs_bytes(format) + scales) * GROUP
}

/// GGML bytes of one block and the offset of its values.
fn ggml_block(format: Format) -> (usize, usize) {
    match format {
        Format::Q8_0 => (34, 2),
        Format::Q4_0 => (18, 2),
        _ => (20, 4),
    }
}

/// Packs `rows` GGML rows of `cols` values (`ggml`, row-major) into groups.
pub(crate) fn pack(format: Format, rows: usize, cols: usize, ggml: &[u8]) -> Vec<u8> {
    let nb = cols / BLOCK;
    let (size, qs_at) = ggml_block(format);
    let qb = qs_bytes(format);
    let gbb = group_block_bytes(format);
    let groups = rows.div_ceil(GROUP);
    // Padding rows: zero values (Q8_0's bias makes zero 0x80) and zero scales.
    let fill = if format == Format::Q8_0 { 0x80 } else { 0 };
    let mut out = vec![0u8; groups * nb * gbb];
    for (g, group) in out.chunks_exact_mut(nb * gbb).enumerate() {
        for (b, blk) in group.chunks_exact_mut(gbb).enumerate() {
            for l in 0..GROUP {
                let r = g * GROUP + l;
                let src = (r < rows).then(|| &ggml[(r * nb + b) * size..(r * nb + b + 1) * size]);
                for c in 0..qb / 4 {
                    for t in 0..4 {
                        let v = src.map_or(fill, |s| {
                            let q = s[qs_at + 4 * c + t];
                            if format == Format::Q8_0 {
                                q ^ 0x80
                            } else {
                                q
                            }
                        });
                        blk[c * CHUNK + 4 * l + t] = v;
                    }
                }
                if let Some(s) = src {
                    let at = GROUP * qb + 2 * l;
                    blk[at..at + 2].copy_from_slice(&s[0..2]);
                    if format == Format::Q4_1 {
                        blk[at + 2 * GROUP..at + 2 * GROUP + 2].copy_from_slice(&s[2..4]);
                    }
                }
            }
        }
    }
    out
}

/// Appends row `r`'s GGML bytes (the inverse of [`pack`]) to `out`.
pub(crate) fn unpack_row(format: Format, cols: usize, data: &[u8], r: usize, out: &mut Vec<u8>) {
    let nb = cols / BLOCK;
    let qb = qs_bytes(format);
    let gbb = group_block_bytes(format);
    let (g, l) = (r / GROUP, r % GROUP);
    for b in 0..nb {
        let blk = &data[(g * nb + b) * gbb..][..gbb];
        let at = GROUP * qb + 2 * l;
        out.extend_from_slice(&blk[at..at + 2]);
        if format == Format::Q4_1 {
            out.extend_from_slice(&blk[at + 2 * GROUP..at + 2 * GROUP + 2]);
        }
        for c in 0..qb / 4 {
            for t in 0..4 {
                let q = blk[c * CHUNK + 4 * l + t];
                out.push(if format == Format::Q8_0 { q ^ 0x80 } else { q });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_reversible_for_any_row_count() {
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            let (size, _) = ggml_block(format);
            for rows in [1usize, 15, 16, 17, 40] {
                let cols = 96;
                let ggml: Vec<u8> = (0..rows * cols / BLOCK * size).map(|i| (i * 37 % 251) as u8).collect();
                let packed = pack(format, rows, cols, &ggml);
                assert_eq!(packed.len(), rows.div_ceil(GROUP) * 3 * group_block_bytes(format));
                let mut back = Vec::new();
                for r in 0..rows {
                    unpack_row(format, cols, &packed, r, &mut back);
                }
                assert_eq!(back, ggml, "{format:?} rows={rows}");
            }
        }
    }
}
