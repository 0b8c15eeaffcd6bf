//! Online token selection of one head (the paper's Eqs. 6-8).
//!
//! Given the importance `s` of every token of a region of whole blocks (the
//! softmax of the last query, pooled over the query heads of a KV head), each
//! block `B` gets the redundancy score
//! `h = (1 - alpha) * sum(s) + alpha * (1 - sum(s^2) / sum(s)^2)`; blocks are
//! ranked by `h`, highest first, and given the budgets of `p*` in decreasing
//! order; each block keeps its top-t tokens by `s`. Before that, an ouro
//! extension: [`chain`] hands each entry's importance on to the entries
//! after it, decaying, so the continuation of an attended span is kept too.

use super::budgets::TcaParams;

/// Budgets of `n_blocks` blocks drawn from `p` (over `{1, 2, 4, ...}`),
/// largest first. One block gets the rounded mean budget (the paper's decode
/// rule); several get about `p_k * n_blocks` blocks of `k` (largest
/// remainders), so their mean follows `p`.
pub fn block_budgets(p: &[f32], n_blocks: usize, block: usize) -> Vec<usize> {
    if n_blocks == 0 {
        return Vec::new();
    }
    if n_blocks == 1 {
        let mean = super::budgets::mean_budget(p).round() as usize;
        return vec![mean.clamp(1, block)];
    }
    let exact: Vec<f64> = p.iter().map(|&v| v as f64 * n_blocks as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|v| v.floor() as usize).collect();
    let mut left = n_blocks.saturating_sub(counts.iter().sum());
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(b.cmp(&a)));
    for &i in order.iter().cycle().take(left.min(p.len() * n_blocks)) {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    let mut out = Vec::with_capacity(n_blocks);
    for i in (0..p.len()).rev() {
        out.extend(std::iter::repeat_n((1usize << i).min(block), counts[i]));
    }
    out.truncate(n_blocks);
    out
}

/// The redundancy score of one block.
pub fn redundancy(s: &[f32], alpha: f32) -> f32 {
    let sum: f32 = s.iter().sum();
    let sq: f32 = s.iter().map(|v| v * v).sum();
    let spread = if sum > 0.0 { 1.0 - sq / (sum * sum) } else { 0.0 };
    (1.0 - alpha) * sum + alpha * spread
}

/// Hands importance on along the sequence: `s[i] = max(s[i], gamma *
/// s[i - 1])` (with the updated `s[i - 1]`), so an entry right after an
/// important one is nearly as important, and a span's importance fades
/// over about `1 / (1 - gamma)` entries. A query asking for a passkey
/// attends to the key's first digits; the model then copies the rest, digit
/// after digit, by attending to the entry after the one it just copied.
/// Selected by the observation window alone, those later digits were
/// dropped (at 8K with per-layer thresholds at tau 0.7, 5 of full
/// attention's 15 answers came out cut short, such as "58" for 58454).
/// `gamma = 0` leaves `s` as it is.
pub fn chain(s: &mut [f32], gamma: f32) {
    if gamma <= 0.0 {
        return;
    }
    for i in 1..s.len() {
        s[i] = s[i].max(gamma * s[i - 1]);
    }
}

/// Selects tokens of a region of `s.len() / params.block` whole blocks
/// with budgets `p`: returns the kept indices, ascending. `sink`: also keep
/// index 0 (the sequence's first token).
pub fn select(s: &[f32], params: &TcaParams, p: &[f32], sink: bool) -> Vec<usize> {
    let (block, alpha) = (params.block, params.alpha);
    let chained;
    let s = if params.chain > 0.0 {
        let mut c = s.to_vec();
        chain(&mut c, params.chain);
        chained = c;
        &chained[..]
    } else {
        s
    };
    let n_blocks = s.len() / block;
    let budgets = block_budgets(p, n_blocks, block);
    let h: Vec<f32> = (0..n_blocks).map(|j| redundancy(&s[j * block..(j + 1) * block], alpha)).collect();
    let mut rank: Vec<usize> = (0..n_blocks).collect();
    rank.sort_by(|&a, &b| h[b].total_cmp(&h[a]).then(a.cmp(&b)));
    let mut keep = Vec::new();
    let mut idx: Vec<usize> = Vec::with_capacity(block);
    for (r, &j) in rank.iter().enumerate() {
        let t = budgets[r].min(block);
        let base = j * block;
        if t >= block {
            keep.extend(base..base + block);
            continue;
        }
        idx.clear();
        idx.extend(0..block);
        idx.sort_by(|&a, &b| s[base + b].total_cmp(&s[base + a]).then(a.cmp(&b)));
        keep.extend(idx[..t].iter().map(|i| base + i));
    }
    if sink && n_blocks > 0 && !keep.contains(&0) {
        keep.push(0);
    }
    keep.sort_unstable();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_follow_p_and_sum_to_the_block_count() {
        let p = [0.5, 0.0, 0.25, 0.25];
        assert_eq!(block_budgets(&p, 4, 8), vec![8, 4, 1, 1]);
        assert_eq!(block_budgets(&p, 1, 8), vec![4]); // mean 3.5, rounded
        let b = block_budgets(&p, 7, 8);
        assert_eq!(b.len(), 7);
        assert!(b.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(block_budgets(&[0.0, 0.0, 0.0, 1.0], 5, 8), vec![8; 5]);
    }

    #[test]
    fn spread_blocks_get_more_and_top_tokens_are_kept() {
        // Block 0: one spike; block 1: flat. Equal mass; the flat one ranks first.
        let mut s = vec![0.0f32; 8];
        s[2] = 0.4;
        s[4..8].copy_from_slice(&[0.1; 4]);
        let keep = select(&s, &params(4, 0.0), &[0.5, 0.0, 0.5], false);
        assert_eq!(keep, vec![2, 4, 5, 6, 7]);
        // Dense budgets keep everything; the sink is added when asked.
        assert_eq!(select(&s, &params(4, 0.0), &[0.0, 0.0, 1.0], false), (0..8).collect::<Vec<_>>());
        assert_eq!(select(&s, &params(4, 0.0), &[1.0, 0.0, 0.0], true), vec![0, 2, 4]);
    }

    fn params(block: usize, chain: f32) -> TcaParams {
        TcaParams { block, window: 4, alpha: 0.5, observe: 1, chain }
    }

    #[test]
    fn chain_keeps_what_follows_an_attended_entry() {
        // Attention lands on entry 1; entries 2-3 carry on from it, 4-6 are
        // scattered filler a little above them.
        let s = [0.0, 0.6, 0.0, 0.0, 0.05, 0.05, 0.05, 0.0];
        let p = [0.0, 0.0, 1.0, 0.0]; // one block of 8 keeps 4
        assert_eq!(select(&s, &params(8, 0.0), &p, false), vec![1, 4, 5, 6]);
        assert_eq!(select(&s, &params(8, 0.9), &p, false), vec![1, 2, 3, 4]);
        let mut c = s.to_vec();
        chain(&mut c, 0.5);
        assert_eq!(c, vec![0.0, 0.6, 0.3, 0.15, 0.075, 0.05, 0.05, 0.025]);
        // gamma = 0 changes nothing.
        let mut same = s.to_vec();
        chain(&mut same, 0.0);
        assert_eq!(same, s.to_vec());
    }
}
