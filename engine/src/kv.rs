//! The paged KV cache: a byte budget, pages of [`PAGE_SIZE`] entries, and a
//! page table per (sequence, layer, KV head).
//!
//! Each page holds the keys (transposed: one row of `PAGE_SIZE` values per
//! dimension) then the values (one row per entry) of `PAGE_SIZE` entries of
//! one (sequence, layer, KV head), the layout `kernels::attention` reads. Heads keep their own page lists and lengths, so
//! a head can be compacted (TCA) without touching the others. Pages come from
//! one arena allocated zeroed (the OS maps memory only when a page is first
//! written) and return to a free list the moment a sequence is freed,
//! truncated or compacted. `used_bytes()` is exact: pages in use times page
//! bytes.
//!
//! The engine [`grow`](KvCache::grow)s a sequence by the rows of a step before
//! the forward pass (so the forward never fails half-way for lack of memory),
//! the model writes the new entries, and speculative decoding
//! [`truncate`](KvCache::truncate)s rejected rows in O(rows).

use std::alloc::{alloc_zeroed, dealloc, Layout};

use kernels::attention::{AttnShape, KvElem, KvSource};

/// Entries per page.
pub const PAGE_SIZE: usize = kernels::attention::PAGE;

/// Shape of the cache, from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements in one page (keys and values).
    pub fn page_elems(&self) -> usize {
        2 * PAGE_SIZE * self.head_dim
    }
    /// Heads per sequence (layers times KV heads).
    pub fn heads_per_seq(&self) -> usize {
        self.n_layers * self.n_kv_heads
    }
}

/// Handle of a sequence's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqKvId(u32);

/// The cache has no free page for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: {needed} pages needed, {free} free")]
pub struct OutOfPages {
    /// Pages the operation needed.
    pub needed: usize,
    /// Pages free at the time.
    pub free: usize,
}

#[derive(Debug, Default, Clone)]
struct Head {
    pages: Vec<u32>,
    len: usize,
    /// Entries `[0, sealed)` were already selected by TCA (compacted); the
    /// entries after them are the uncompressed tail.
    sealed: usize,
}

#[derive(Debug, Default)]
struct SeqKv {
    heads: Vec<Head>,
}

/// Zeroed, lazily committed storage for pages.
struct Arena<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the arena is plain memory owned by the cache; access follows Rust's
// borrow rules through `as_slice`/`as_mut_slice`.
unsafe impl<T: Send> Send for Arena<T> {}
unsafe impl<T: Sync> Sync for Arena<T> {}

impl<T: KvElem> Arena<T> {
    fn new(len: usize) -> Option<Self> {
        if len == 0 {
            return Some(Self { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0 });
        }
        let layout = Layout::array::<T>(len).ok()?;
        // SAFETY: layout has non-zero size; all-zero bits are 0.0 for f32 and f16.
        let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
        (!ptr.is_null()).then_some(Self { ptr, len })
    }
    fn as_slice(&self) -> &[T] {
        // SAFETY: ptr is valid for len initialised (zeroed) elements.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for Arena<T> {
    fn drop(&mut self) {
        if self.len > 0 {
            if let Ok(layout) = Layout::array::<T>(self.len) {
                // SAFETY: allocated in `new` with this layout.
                unsafe { dealloc(self.ptr as *mut u8, layout) };
            }
        }
    }
}

/// A paged KV cache with elements of type `T` (`f16` or `f32`).
pub struct KvCache<T: KvElem> {
    layout: KvLayout,
    arena: Arena<T>,
    free: Vec<u32>,
    n_pages: usize,
    seqs: Vec<Option<SeqKv>>,
    free_slots: Vec<u32>,
}

impl<T: KvElem> std::fmt::Debug for KvCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").field("layout", &self.layout).field("pages", &self.n_pages).field("free", &self.free.len()).finish()
    }
}

impl<T: KvElem> KvCache<T> {
    /// A cache of at most `budget_bytes` (rounded down to whole pages).
    /// Returns `None` when the memory cannot be reserved.
    pub fn new(layout: KvLayout, budget_bytes: usize) -> Option<Self> {
        let page_bytes = layout.page_elems() * std::mem::size_of::<T>();
        let n_pages = (budget_bytes / page_bytes).min(u32::MAX as usize);
        let arena = Arena::new(n_pages * layout.page_elems())?;
        // Pop from the end: low page ids first, so touched memory is reused.
        let free = (0..n_pages as u32).rev().collect();
        Some(Self { layout, arena, free, n_pages, seqs: Vec::new(), free_slots: Vec::new() })
    }

    /// The cache's shape.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.layout.page_elems() * std::mem::size_of::<T>()
    }
    /// Pages in the budget.
    pub fn total_pages(&self) -> usize {
        self.n_pages
    }
    /// Pages not in use.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Bytes of pages in use.
    pub fn used_bytes(&self) -> usize {
        (self.n_pages - self.free.len()) * self.page_bytes()
    }
    /// Bytes of the whole budget.
    pub fn total_bytes(&self) -> usize {
        self.n_pages * self.page_bytes()
    }
    /// Pages one sequence needs to hold `tokens` entries in every head.
    pub fn pages_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(PAGE_SIZE) * self.layout.heads_per_seq()
    }

    /// Starts an empty sequence.
    pub fn alloc_seq(&mut self) -> SeqKvId {
        let heads = vec![Head::default(); self.layout.heads_per_seq()];
        let seq = Some(SeqKv { heads });
        match self.free_slots.pop() {
            Some(i) => {
                self.seqs[i as usize] = seq;
                SeqKvId(i)
            }
            None => {
                self.seqs.push(seq);
                SeqKvId(self.seqs.len() as u32 - 1)
            }
        }
    }

    fn seq(&self, id: SeqKvId) -> &SeqKv {
        match self.seqs.get(id.0 as usize) {
            Some(Some(s)) => s,
            _ => panic!("KV sequence {id:?} is not allocated"),
        }
    }

    fn seq_mut(&mut self, id: SeqKvId) -> &mut SeqKv {
        match self.seqs.get_mut(id.0 as usize) {
            Some(Some(s)) => s,
            _ => panic!("KV sequence {id:?} is not allocated"),
        }
    }

    /// Frees a sequence and all its pages.
    pub fn free_seq(&mut self, id: SeqKvId) {
        if let Some(slot) = self.seqs.get_mut(id.0 as usize) {
            if let Some(seq) = slot.take() {
                for h in seq.heads {
                    self.free.extend(h.pages);
                }
                self.free_slots.push(id.0);
            }
        }
    }

    /// Entries held by head `(layer, kv_head)` of a sequence.
    pub fn head_len(&self, id: SeqKvId, layer: usize, kv_head: usize) -> usize {
        self.seq(id).heads[layer * self.layout.n_kv_heads + kv_head].len
    }

    /// Entries of the longest head of a sequence.
    pub fn max_len(&self, id: SeqKvId) -> usize {
        self.seq(id).heads.iter().map(|h| h.len).max().unwrap_or(0)
    }

    /// Pages `grow(id, n)` would take from the free list.
    pub fn pages_needed(&self, id: SeqKvId, n: usize) -> usize {
        self.seq(id).heads.iter().map(|h| (h.len + n).div_ceil(PAGE_SIZE) - h.pages.len()).sum()
    }

    /// Makes room for `n` more entries in every head of a sequence and counts
    /// them in its length; the caller writes them. All or nothing.
    pub fn grow(&mut self, id: SeqKvId, n: usize) -> Result<(), OutOfPages> {
        let needed = self.pages_needed(id, n);
        if needed > self.free.len() {
            return Err(OutOfPages { needed, free: self.free.len() });
        }
        let mut free = std::mem::take(&mut self.free);
        for h in self.seq_mut(id).heads.iter_mut() {
            h.len += n;
            while h.pages.len() * PAGE_SIZE < h.len {
                // Cannot fail: checked above.
                h.pages.push(free.pop().unwrap_or_default());
            }
        }
        self.free = free;
        Ok(())
    }

    /// Drops the last `n` entries of every head (rollback of rejected rows).
    /// Costs O(n) plus the pages it frees.
    pub fn truncate(&mut self, id: SeqKvId, n: usize) {
        let mut freed = Vec::new();
        for h in self.seq_mut(id).heads.iter_mut() {
            h.len = h.len.saturating_sub(n);
            h.sealed = h.sealed.min(h.len);
            while h.pages.len() > h.len.div_ceil(PAGE_SIZE) {
                freed.extend(h.pages.pop());
            }
        }
        self.free.extend(freed);
    }

    /// Writes entry `index` of head `(layer, kv_head)`: `k` and `v` hold
    /// `head_dim` values each.
    pub fn write(&mut self, id: SeqKvId, layer: usize, kv_head: usize, index: usize, k: &[f32], v: &[f32]) {
        let d = self.layout.head_dim;
        let pe = self.layout.page_elems();
        let page = self.seq(id).heads[layer * self.layout.n_kv_heads + kv_head].pages[index / PAGE_SIZE] as usize;
        let slot = index % PAGE_SIZE;
        let arena = self.arena.as_mut_slice();
        let base = page * pe;
        // Keys are stored transposed (see `kernels::attention`).
        for (c, src) in k.iter().enumerate().take(d) {
            arena[base + c * PAGE_SIZE + slot] = T::from_f32(*src);
        }
        let vb = base + PAGE_SIZE * d + slot * d;
        for (dst, src) in arena[vb..vb + d].iter_mut().zip(v) {
            *dst = T::from_f32(*src);
        }
    }

    /// Reads entry `index` of a head back as `f32` (tests, TCA, traces).
    pub fn read(&self, id: SeqKvId, layer: usize, kv_head: usize, index: usize, k: &mut [f32], v: &mut [f32]) {
        let d = self.layout.head_dim;
        let pe = self.layout.page_elems();
        let page = self.seq(id).heads[layer * self.layout.n_kv_heads + kv_head].pages[index / PAGE_SIZE] as usize;
        let slot = index % PAGE_SIZE;
        let arena = self.arena.as_slice();
        let base = page * pe;
        for (c, dst) in k.iter_mut().enumerate().take(d) {
            *dst = arena[base + c * PAGE_SIZE + slot].to_f32();
        }
        let vb = base + PAGE_SIZE * d + slot * d;
        for (dst, src) in v.iter_mut().zip(&arena[vb..vb + d]) {
            *dst = src.to_f32();
        }
    }

    /// Entries of head `(layer, kv_head)` already compacted by TCA.
    pub fn head_sealed(&self, id: SeqKvId, layer: usize, kv_head: usize) -> usize {
        self.seq(id).heads[layer * self.layout.n_kv_heads + kv_head].sealed
    }

    /// Scaled dot products `scale * q . k_t` of each query of `qs` (`n_q`
    /// rows of `head_dim` values) with the first `n` keys of head
    /// `(layer, kv_head)`, into `out` (`n_q` rows of `n`; TCA scoring). Each
    /// page of keys is read once for all the queries.
    #[allow(clippy::too_many_arguments)]
    pub fn key_scores(&self, id: SeqKvId, layer: usize, kv_head: usize, n: usize, qs: &[f32], scale: f32, out: &mut Vec<f32>) {
        let d = self.layout.head_dim;
        let pe = self.layout.page_elems();
        let h = &self.seq(id).heads[layer * self.layout.n_kv_heads + kv_head];
        let n = n.min(h.len);
        let n_q = qs.len() / d.max(1);
        out.clear();
        out.resize(n * n_q, 0.0);
        let arena = self.arena.as_slice();
        let mut keys = [0f32; kernels::attention::MAX_HEAD_DIM * PAGE_SIZE];
        for (pi, &p) in h.pages.iter().enumerate() {
            let t0 = pi * PAGE_SIZE;
            if t0 >= n {
                break;
            }
            let m = (n - t0).min(PAGE_SIZE);
            let base = p as usize * pe;
            T::slice_to_f32(&arena[base..base + d * PAGE_SIZE], &mut keys);
            // Four queries at a time, so each key row loaded serves four.
            let mut qi = 0;
            while qi < n_q {
                let g = (n_q - qi).min(4);
                let mut acc = [[0f32; PAGE_SIZE]; 4];
                for c in 0..d {
                    let row = &keys[c * PAGE_SIZE..(c + 1) * PAGE_SIZE];
                    for (r, a) in acc.iter_mut().enumerate().take(g) {
                        let qc = qs[(qi + r) * d + c];
                        for (o, k) in a.iter_mut().zip(row) {
                            *o += qc * k;
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate().take(g) {
                    let dst = &mut out[(qi + r) * n + t0..(qi + r) * n + t0 + m];
                    for (o, v) in dst.iter_mut().zip(&a[..m]) {
                        *o = v * scale;
                    }
                }
                qi += g;
            }
        }
    }

    /// TCA compaction of head `(layer, kv_head)`: of the `region_len` entries
    /// starting at the head's sealed count, keeps those at the (ascending,
    /// region-relative) indices `keep` and drops the rest; later entries move
    /// down (keys keep their RoPE: they were stored post-RoPE), the sealed
    /// count grows by `keep.len()`, and emptied pages go back to the free
    /// list. Returns the number of entries dropped.
    pub fn compact(&mut self, id: SeqKvId, layer: usize, kv_head: usize, region_len: usize, keep: &[usize]) -> usize {
        let d = self.layout.head_dim;
        let pe = self.layout.page_elems();
        let hi = layer * self.layout.n_kv_heads + kv_head;
        let (start, len) = {
            let h = &self.seq(id).heads[hi];
            (h.sealed, h.len)
        };
        let region_len = region_len.min(len - start);
        let keep_ok = keep.windows(2).all(|w| w[0] < w[1]) && keep.last().is_none_or(|&k| k < region_len);
        if !keep_ok || keep.len() == region_len {
            // Nothing to drop (or a malformed list: keep everything).
            self.seq_mut(id).heads[hi].sealed = start + region_len;
            return 0;
        }
        let pages = std::mem::take(&mut self.seq_mut(id).heads[hi].pages);
        let arena = self.arena.as_mut_slice();
        let mut move_entry = |src: usize, dst: usize| {
            let (sb, db) = (pages[src / PAGE_SIZE] as usize * pe, pages[dst / PAGE_SIZE] as usize * pe);
            let (ss, ds) = (src % PAGE_SIZE, dst % PAGE_SIZE);
            for c in 0..d {
                arena[db + c * PAGE_SIZE + ds] = arena[sb + c * PAGE_SIZE + ss];
            }
            let (sv, dv) = (sb + PAGE_SIZE * d + ss * d, db + PAGE_SIZE * d + ds * d);
            arena.copy_within(sv..sv + d, dv);
        };
        let mut dst = start;
        for &k in keep {
            if start + k != dst {
                move_entry(start + k, dst);
            }
            dst += 1;
        }
        for src in start + region_len..len {
            move_entry(src, dst);
            dst += 1;
        }
        let dropped = len - dst;
        let mut pages = pages;
        let mut freed = Vec::new();
        while pages.len() > dst.div_ceil(PAGE_SIZE) {
            freed.extend(pages.pop());
        }
        let h = &mut self.seq_mut(id).heads[hi];
        h.pages = pages;
        h.len = dst;
        h.sealed = start + keep.len();
        self.free.extend(freed);
        dropped
    }

    /// A new sequence holding a copy of `id`'s entries (for `n > 1`: the
    /// prompt is computed once and copied to each choice).
    pub fn fork(&mut self, id: SeqKvId) -> Result<SeqKvId, OutOfPages> {
        let needed: usize = self.seq(id).heads.iter().map(|h| h.pages.len()).sum();
        if needed > self.free.len() {
            return Err(OutOfPages { needed, free: self.free.len() });
        }
        let child = self.alloc_seq();
        let pe = self.layout.page_elems();
        let src_heads = self.seq(id).heads.clone();
        let mut new_heads = Vec::with_capacity(src_heads.len());
        for h in &src_heads {
            let mut pages = Vec::with_capacity(h.pages.len());
            for &p in &h.pages {
                let q = self.free.pop().unwrap_or_default();
                self.arena.as_mut_slice().copy_within(p as usize * pe..(p as usize + 1) * pe, q as usize * pe);
                pages.push(q);
            }
            new_heads.push(Head { pages, len: h.len, sealed: h.sealed });
        }
        self.seq_mut(child).heads = new_heads;
        Ok(child)
    }

    /// The view the attention kernel reads for one layer of the given
    /// sequences (in the call's sequence order).
    pub fn layer_view<'a>(&'a self, layer: usize, seqs: &'a [SeqKvId]) -> LayerView<'a, T> {
        LayerView { cache: self, layer, seqs }
    }

    /// Attention shape for this cache.
    pub fn attn_shape(&self, n_heads: usize) -> AttnShape {
        AttnShape {
            n_heads,
            n_kv_heads: self.layout.n_kv_heads,
            head_dim: self.layout.head_dim,
            page_size: PAGE_SIZE,
            scale: 1.0 / (self.layout.head_dim as f32).sqrt(),
        }
    }
}

/// One layer of several sequences, as the attention kernel sees it.
pub struct LayerView<'a, T: KvElem> {
    cache: &'a KvCache<T>,
    layer: usize,
    seqs: &'a [SeqKvId],
}

impl<T: KvElem> KvSource for LayerView<'_, T> {
    type Elem = T;
    fn arena(&self) -> &[T] {
        self.cache.arena.as_slice()
    }
    fn head(&self, seq: usize, kv_head: usize) -> (&[u32], usize) {
        let h = &self.cache.seq(self.seqs[seq]).heads[self.layer * self.cache.layout.n_kv_heads + kv_head];
        (&h.pages, h.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn layout() -> KvLayout {
        KvLayout { n_layers: 2, n_kv_heads: 3, head_dim: 8 }
    }

    #[test]
    fn budget_is_accounted_in_whole_pages() {
        let l = layout();
        let page_bytes = l.page_elems() * 2;
        let mut kv = KvCache::<f16>::new(l, page_bytes * 60 + 5).unwrap();
        assert_eq!(kv.total_pages(), 60);
        let s = kv.alloc_seq();
        kv.grow(s, 17).unwrap(); // 2 pages per head, 6 heads
        assert_eq!(kv.used_bytes(), 12 * page_bytes);
        kv.free_seq(s);
        assert_eq!(kv.used_bytes(), 0);
    }

    #[test]
    fn grow_is_all_or_nothing() {
        let l = layout();
        let mut kv = KvCache::<f32>::new(l, l.page_elems() * 4 * 7).unwrap();
        let s = kv.alloc_seq();
        assert!(kv.grow(s, 16).is_ok()); // 6 pages
        let err = kv.grow(s, 1).unwrap_err(); // needs 6 more, 1 free
        assert_eq!(err, OutOfPages { needed: 6, free: 1 });
        assert_eq!(kv.head_len(s, 0, 0), 16);
        assert_eq!(kv.free_pages(), 1);
    }

    #[test]
    fn truncate_frees_emptied_pages_and_keeps_the_rest() {
        let l = layout();
        let mut kv = KvCache::<f32>::new(l, l.page_elems() * 4 * 100).unwrap();
        let s = kv.alloc_seq();
        kv.grow(s, 20).unwrap();
        for i in 0..20 {
            let v = vec![i as f32; 8];
            kv.write(s, 1, 2, i, &v, &v);
        }
        kv.truncate(s, 5);
        assert_eq!(kv.head_len(s, 1, 2), 15);
        assert_eq!(kv.free_pages(), 100 - 6);
        let (mut k, mut v) = (vec![0f32; 8], vec![0f32; 8]);
        kv.read(s, 1, 2, 14, &mut k, &mut v);
        assert_eq!(k, vec![14.0; 8]);
    }

    #[test]
    fn fork_copies_entries_into_new_pages() {
        let l = layout();
        let mut kv = KvCache::<f16>::new(l, l.page_elems() * 2 * 100).unwrap();
        let a = kv.alloc_seq();
        kv.grow(a, 3).unwrap();
        kv.write(a, 0, 1, 2, &[1.5; 8], &[2.5; 8]);
        let b = kv.fork(a).unwrap();
        kv.write(a, 0, 1, 2, &[9.0; 8], &[9.0; 8]);
        let (mut k, mut v) = (vec![0f32; 8], vec![0f32; 8]);
        kv.read(b, 0, 1, 2, &mut k, &mut v);
        assert_eq!((k[0], v[0]), (1.5, 2.5));
        assert_eq!(kv.head_len(b, 1, 2), 3);
    }

    #[test]
    fn compact_keeps_chosen_entries_in_order_and_frees_pages() {
        let l = layout();
        let mut kv = KvCache::<f32>::new(l, l.page_elems() * 4 * 100).unwrap();
        let s = kv.alloc_seq();
        kv.grow(s, 40).unwrap();
        for i in 0..40 {
            let v = vec![i as f32; 8];
            kv.write(s, 0, 1, i, &v, &v);
        }
        let before = kv.free_pages();
        // Region: the first 32 entries; keep 0, 5 and 31; the tail 32..40 moves down.
        assert_eq!(kv.compact(s, 0, 1, 32, &[0, 5, 31]), 29);
        assert_eq!((kv.head_len(s, 0, 1), kv.head_sealed(s, 0, 1)), (11, 3));
        assert_eq!(kv.free_pages(), before + 2);
        let (mut k, mut v) = (vec![0f32; 8], vec![0f32; 8]);
        for (i, want) in [0, 5, 31, 32, 33, 34, 35, 36, 37, 38, 39].iter().enumerate() {
            kv.read(s, 0, 1, i, &mut k, &mut v);
            assert_eq!((k[3], v[7]), (*want as f32, *want as f32), "entry {i}");
        }
        // Other heads are untouched; keeping everything only seals.
        assert_eq!(kv.head_len(s, 0, 0), 40);
        assert_eq!(kv.compact(s, 0, 0, 16, &(0..16).collect::<Vec<_>>()), 0);
        assert_eq!((kv.head_len(s, 0, 0), kv.head_sealed(s, 0, 0)), (40, 16));
        // Rollback never cuts below the sealed entries' count.
        kv.truncate(s, 9);
        assert_eq!((kv.head_len(s, 0, 1), kv.head_sealed(s, 0, 1)), (2, 2));
    }

    #[test]
    fn freed_slots_and_pages_are_reused() {
        let l = layout();
        let mut kv = KvCache::<f16>::new(l, l.page_elems() * 2 * 12).unwrap();
        for _ in 0..10 {
            let s = kv.alloc_seq();
            kv.grow(s, 30).unwrap();
            kv.free_seq(s);
        }
        assert_eq!(kv.free_pages(), 12);
        assert_eq!(kv.seqs.len(), 1);
    }
}
