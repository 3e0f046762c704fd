//! Paged KV cache bookkeeping: a block allocator with reference counts, per-sequence block
//! tables, automatic prefix caching and copy-on-write.
//!
//! The runner owns the KV storage; this module only decides which physical block ids hold
//! which positions. A block is in exactly one of three states:
//! - **used**: `ref_count > 0`, referenced by one or more [`BlockTable`]s;
//! - **cached-free**: `ref_count == 0` but registered in the prefix cache (its contents are a
//!   full block of known tokens); it can be revived by a prefix hit or evicted (LRU order)
//!   when a fresh block is needed;
//! - **free**: `ref_count == 0`, no contents worth keeping.
//!
//! Prefix caching hashes full blocks in a chain: the hash of block `i` covers the hash of
//! block `i - 1` and the block's token ids, so a hit on block `i` implies the whole prefix up
//! to it matches. Each cached block also stores its tokens and parent hash, which are compared
//! on lookup, so a 64-bit hash collision can never serve wrong KV.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Physical block id, `0 .. num_blocks`.
pub type BlockId = u32;

/// Chain hash of a full block (parent hash + token ids).
pub type BlockHash = u64;

/// Not enough free (or evictable) blocks for the requested operation; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: need {needed}, {free} free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// The blocks one sequence uses, in position order, plus the chain hashes of its full blocks
/// that were already committed (see [`BlockManager::commit_full_blocks`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// `hashes[i]` is the chain hash of `blocks[i]`; only full, committed blocks have one.
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    /// Physical block ids in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the table holds no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while this block is the prefix cache's entry for `hash`.
    hash: Option<BlockHash>,
    /// Parent chain hash and tokens, kept for collision-proof lookups.
    parent: Option<BlockHash>,
    tokens: Vec<u32>,
    /// Key in `evictable` while cached-free.
    lru_tick: u64,
}

/// Allocator and prefix cache for `num_blocks` blocks of `block_size` token slots.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    enable_prefix_caching: bool,
    blocks: Vec<Block>,
    /// Free blocks without cached contents. Popped from the end.
    free: Vec<BlockId>,
    /// Cached-free blocks by last use; the smallest tick is evicted first.
    evictable: BTreeMap<u64, BlockId>,
    /// Prefix cache: chain hash → block holding it.
    cached: HashMap<BlockHash, BlockId>,
    tick: u64,
}

impl BlockManager {
    /// A manager over `num_blocks` blocks of `block_size` slots. `block_size` must be > 0.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        BlockManager {
            block_size,
            enable_prefix_caching,
            blocks: vec![Block::default(); num_blocks],
            // Reversed so that low ids are handed out first (easier to read in logs and tests).
            free: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            tick: 0,
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now: free plus cached-free (evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.num_blocks() - self.num_free_blocks()
    }

    /// Blocks currently registered in the prefix cache (used or not).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Reference count of a block (for tests and debugging).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block as usize].ref_count
    }

    fn chain_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        // SipHash with fixed keys: deterministic within and across runs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Starts a fresh (empty) table for a sequence whose known tokens are `tokens`, reusing
    /// the longest cached chain of full blocks. At least one token is always left to compute
    /// (the step that computes it yields the logits), so at most `(len - 1) / block_size`
    /// blocks are reused. Returns the number of cached tokens now in the table.
    pub fn allocate_cached_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        debug_assert!(table.is_empty(), "allocate_cached_prefix needs an empty table");
        if !self.enable_prefix_caching || tokens.is_empty() {
            return 0;
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = Self::chain_hash(parent, chunk);
            let Some(&id) = self.cached.get(&hash) else { break };
            let block = &self.blocks[id as usize];
            if block.parent != parent || block.tokens != chunk {
                break;
            }
            self.take_ref(id);
            table.blocks.push(id);
            table.hashes.push(hash);
            parent = Some(hash);
        }
        table.blocks.len() * self.block_size
    }

    fn take_ref(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if block.ref_count == 0 {
            // Revived from the cached-free pool.
            self.evictable.remove(&block.lru_tick);
        }
        block.ref_count += 1;
    }

    /// Pops a block with ref_count 0, preferring truly free blocks over evicting cached ones.
    fn pop_free(&mut self) -> Option<BlockId> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        let (_, id) = self.evictable.pop_first()?;
        let block = &mut self.blocks[id as usize];
        if let Some(hash) = block.hash.take() {
            self.cached.remove(&hash);
        }
        block.parent = None;
        block.tokens.clear();
        Some(id)
    }

    fn alloc_block(&mut self) -> Option<BlockId> {
        let id = self.pop_free()?;
        self.blocks[id as usize].ref_count = 1;
        Some(id)
    }

    /// How many new blocks [`Self::ensure_slots`] would need for the same arguments.
    pub fn blocks_needed(&self, table: &BlockTable, total_tokens: usize, write_from: usize) -> usize {
        let grow = self.blocks_for(total_tokens).saturating_sub(table.blocks.len());
        grow + usize::from(self.needs_cow(table, write_from, total_tokens))
    }

    /// Most new tokens that can be written from position `write_from` on with the table's
    /// blocks plus every free block (one fewer if the first write needs a copy).
    pub fn writable_tokens(&self, table: &BlockTable, write_from: usize) -> usize {
        let cow = usize::from(self.needs_cow(table, write_from, write_from + 1));
        let blocks = (table.blocks.len() + self.num_free_blocks()).saturating_sub(cow);
        (blocks * self.block_size).saturating_sub(write_from)
    }

    /// Whether writing position `write_from` hits an existing block shared with another table.
    fn needs_cow(&self, table: &BlockTable, write_from: usize, total_tokens: usize) -> bool {
        if write_from >= total_tokens {
            return false;
        }
        let idx = write_from / self.block_size;
        idx < table.blocks.len() && self.blocks[table.blocks[idx] as usize].ref_count > 1
    }

    /// Makes `table` cover positions `0 .. total_tokens`, where positions from `write_from`
    /// on are about to be written. A shared block that would be written is first replaced by
    /// a private copy (copy-on-write): the `(src, dst)` pair is pushed to `copies` and the
    /// caller must have the runner copy it before the step. All or nothing: on error the
    /// table and the pool are unchanged.
    pub fn ensure_slots(
        &mut self,
        table: &mut BlockTable,
        total_tokens: usize,
        write_from: usize,
        copies: &mut Vec<(BlockId, BlockId)>,
    ) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(table, total_tokens, write_from);
        let free = self.num_free_blocks();
        if needed > free {
            return Err(OutOfBlocks { needed, free });
        }
        if self.needs_cow(table, write_from, total_tokens) {
            let idx = write_from / self.block_size;
            let src = table.blocks[idx];
            let dst = self.alloc_block().expect("counted above");
            self.blocks[src as usize].ref_count -= 1; // still > 0: it was shared
            table.blocks[idx] = dst;
            // A full shared block is never written (only the partial tail is), so no hash to drop;
            // keep the table's hash list consistent anyway.
            table.hashes.truncate(idx);
            copies.push((src, dst));
        }
        while table.blocks.len() < self.blocks_for(total_tokens) {
            let id = self.alloc_block().expect("counted above");
            table.blocks.push(id);
        }
        Ok(())
    }

    /// Registers the blocks of `table` that became full now that `num_computed` tokens of
    /// `tokens` are in the cache, so later requests with the same prefix can reuse them.
    pub fn commit_full_blocks(&mut self, table: &mut BlockTable, tokens: &[u32], num_computed: usize) {
        if !self.enable_prefix_caching {
            return;
        }
        let full = (num_computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let idx = table.hashes.len();
            let parent = idx.checked_sub(1).map(|p| table.hashes[p]);
            let chunk = &tokens[idx * self.block_size..(idx + 1) * self.block_size];
            let hash = Self::chain_hash(parent, chunk);
            table.hashes.push(hash);
            let id = table.blocks[idx];
            if self.cached.contains_key(&hash) || self.blocks[id as usize].hash.is_some() {
                // Same prefix computed concurrently by another sequence (or this block is
                // already the entry): keep the existing entry; this block stays private.
                continue;
            }
            self.cached.insert(hash, id);
            let block = &mut self.blocks[id as usize];
            block.hash = Some(hash);
            block.parent = parent;
            block.tokens = chunk.to_vec();
        }
    }

    /// A second table sharing all of `table`'s blocks (reference counts +1).
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        for &id in &table.blocks {
            self.take_ref(id);
        }
        table.clone()
    }

    /// Drops the table's references; blocks nobody uses go back to the pool (cached ones stay
    /// reusable until evicted). The table is left empty.
    pub fn free(&mut self, table: &mut BlockTable) {
        // Tail first: the tail is the least likely to be shared, so it gets the oldest LRU
        // tick and is evicted first.
        for &id in table.blocks.iter().rev() {
            let block = &mut self.blocks[id as usize];
            assert!(block.ref_count > 0, "double free of KV block {id}");
            block.ref_count -= 1;
            if block.ref_count == 0 {
                if block.hash.is_some() {
                    self.tick += 1;
                    block.lru_tick = self.tick;
                    self.evictable.insert(self.tick, id);
                } else {
                    block.parent = None;
                    block.tokens.clear();
                    self.free.push(id);
                }
            }
        }
        table.blocks.clear();
        table.hashes.clear();
    }

    /// Checks the internal invariants; for tests.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut seen = vec![false; self.blocks.len()];
        for &id in self.free.iter().chain(self.evictable.values()) {
            assert!(!seen[id as usize], "block {id} twice in the free pools");
            seen[id as usize] = true;
            assert_eq!(self.blocks[id as usize].ref_count, 0, "free block {id} has references");
        }
        for &id in self.free.iter() {
            assert!(self.blocks[id as usize].hash.is_none(), "free block {id} still cached");
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.ref_count == 0 {
                assert!(seen[i], "block {i} with no references is in no pool (leaked)");
            }
            if let Some(h) = b.hash {
                assert_eq!(self.cached.get(&h), Some(&(i as BlockId)));
            }
        }
        for (&h, &id) in &self.cached {
            assert_eq!(self.blocks[id as usize].hash, Some(h));
        }
        assert_eq!(self.num_free_blocks() + self.num_used_blocks(), self.num_blocks());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    #[test]
    fn allocate_and_free_returns_everything() {
        let mut m = BlockManager::new(8, 4, true);
        let mut t = BlockTable::default();
        let mut copies = Vec::new();
        m.ensure_slots(&mut t, 10, 0, &mut copies).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(m.num_used_blocks(), 3);
        assert!(copies.is_empty());
        m.free(&mut t);
        assert_eq!(m.num_used_blocks(), 0);
        assert_eq!(m.num_free_blocks(), 8);
        m.check_invariants();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut m = BlockManager::new(2, 4, true);
        let mut t = BlockTable::default();
        let err = m.ensure_slots(&mut t, 9, 0, &mut Vec::new()).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 3, free: 2 });
        assert!(t.is_empty());
        assert_eq!(m.num_free_blocks(), 2);
        m.check_invariants();
    }

    #[test]
    fn prefix_hit_reuses_full_blocks_and_leaves_one_token() {
        let mut m = BlockManager::new(16, 4, true);
        let prompt = toks(10, 100);
        let mut a = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut a, &prompt), 0);
        m.ensure_slots(&mut a, 10, 0, &mut Vec::new()).unwrap();
        m.commit_full_blocks(&mut a, &prompt, 10);
        assert_eq!(m.num_cached_blocks(), 2);

        let mut b = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut b, &prompt), 8);
        assert_eq!(&b.blocks()[..2], &a.blocks()[..2]);
        assert_eq!(m.ref_count(a.blocks()[0]), 2);

        // An 8-token prompt may reuse only one block: the last token must be computed.
        let mut c = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut c, &prompt[..8]), 4);
        // A different first block breaks the chain even if the second block matches.
        let mut other = prompt.clone();
        other[0] = 7;
        let mut d = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut d, &other), 0);
        for t in [&mut a, &mut b, &mut c, &mut d] {
            m.free(t);
        }
        m.check_invariants();
    }

    #[test]
    fn cached_free_blocks_survive_until_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let p1 = toks(5, 0);
        let mut a = BlockTable::default();
        m.ensure_slots(&mut a, 5, 0, &mut Vec::new()).unwrap();
        m.commit_full_blocks(&mut a, &p1, 5);
        m.free(&mut a);
        assert_eq!(m.num_used_blocks(), 0);
        assert_eq!(m.num_cached_blocks(), 2);

        // Still a hit after the owner is gone.
        let mut b = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut b, &p1), 4);
        m.free(&mut b);

        // Fill the pool: the free block goes first, then the cached ones, tail block first.
        let mut c = BlockTable::default();
        m.ensure_slots(&mut c, 4, 0, &mut Vec::new()).unwrap(); // 2 blocks: 2 free ones
        assert_eq!(m.num_cached_blocks(), 2);
        let mut d = BlockTable::default();
        m.ensure_slots(&mut d, 2, 0, &mut Vec::new()).unwrap(); // evicts the tail block
        assert_eq!(m.num_cached_blocks(), 1);
        let mut e = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut e, &p1), 2, "head block still cached");
        for t in [&mut c, &mut d, &mut e] {
            m.free(t);
        }
        m.check_invariants();
    }

    #[test]
    fn fork_then_append_copies_the_shared_partial_block() {
        let mut m = BlockManager::new(8, 4, true);
        let prompt = toks(6, 0);
        let mut a = BlockTable::default();
        m.ensure_slots(&mut a, 6, 0, &mut Vec::new()).unwrap();
        m.commit_full_blocks(&mut a, &prompt, 6);
        let mut b = m.fork(&a);
        assert_eq!(m.num_used_blocks(), 2);
        assert_eq!(m.ref_count(a.blocks()[1]), 2);

        // a appends at position 6 (inside the shared partial block 1): copy-on-write.
        let mut copies = Vec::new();
        m.ensure_slots(&mut a, 7, 6, &mut copies).unwrap();
        assert_eq!(copies, vec![(b.blocks()[1], a.blocks()[1])]);
        assert_ne!(a.blocks()[1], b.blocks()[1]);
        assert_eq!(a.blocks()[0], b.blocks()[0], "full block stays shared");
        // b is now the only owner of the old block: no copy.
        copies.clear();
        m.ensure_slots(&mut b, 7, 6, &mut copies).unwrap();
        assert!(copies.is_empty());
        // Appending into a fresh block after a shared full block needs no copy either.
        let mut c = m.fork(&b);
        copies.clear();
        m.ensure_slots(&mut c, 9, 8, &mut copies).unwrap();
        assert!(copies.is_empty());
        assert_eq!(c.len(), 3);
        for t in [&mut a, &mut b, &mut c] {
            m.free(t);
        }
        assert_eq!(m.num_used_blocks(), 0);
        m.check_invariants();
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut m = BlockManager::new(8, 2, false);
        let p = toks(5, 0);
        let mut a = BlockTable::default();
        m.ensure_slots(&mut a, 5, 0, &mut Vec::new()).unwrap();
        m.commit_full_blocks(&mut a, &p, 5);
        m.free(&mut a);
        let mut b = BlockTable::default();
        assert_eq!(m.allocate_cached_prefix(&mut b, &p), 0);
        assert_eq!(m.num_cached_blocks(), 0);
        m.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// New sequence with a prompt drawn from a small alphabet (so prefixes repeat).
        New {
            len: usize,
            alphabet: u32,
            seed: u32,
        },
        Append {
            seq: usize,
            n: usize,
        },
        Fork {
            seq: usize,
        },
        Free {
            seq: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..20, 1u32..3, 0u32..4).prop_map(|(len, alphabet, seed)| Op::New { len, alphabet, seed }),
            (0usize..8, 1usize..6).prop_map(|(seq, n)| Op::Append { seq, n }),
            (0usize..8).prop_map(|seq| Op::Fork { seq }),
            (0usize..8).prop_map(|seq| Op::Free { seq }),
        ]
    }

    struct Seq {
        tokens: Vec<u32>,
        table: BlockTable,
    }

    proptest! {
        #[test]
        fn no_leak_no_double_free(ops in proptest::collection::vec(op(), 1..60), caching in any::<bool>()) {
            let mut m = BlockManager::new(12, 3, caching);
            let mut seqs: Vec<Seq> = Vec::new();
            for op in ops {
                match op {
                    Op::New { len, alphabet, seed } => {
                        let tokens: Vec<u32> = (0..len as u32).map(|i| (i * 7 + seed) % alphabet).collect();
                        let mut table = BlockTable::default();
                        let cached = m.allocate_cached_prefix(&mut table, &tokens);
                        prop_assert!(cached < tokens.len());
                        if m.ensure_slots(&mut table, tokens.len(), cached, &mut Vec::new()).is_ok() {
                            m.commit_full_blocks(&mut table, &tokens, tokens.len());
                            seqs.push(Seq { tokens, table });
                        } else {
                            m.free(&mut table);
                        }
                    }
                    Op::Append { seq, n } if seq < seqs.len() => {
                        let s = &mut seqs[seq];
                        let old = s.tokens.len();
                        let before = s.table.clone();
                        let mut copies = Vec::new();
                        if m.ensure_slots(&mut s.table, old + n, old, &mut copies).is_ok() {
                            s.tokens.extend((0..n as u32).map(|i| i % 2));
                            m.commit_full_blocks(&mut s.table, &s.tokens, s.tokens.len());
                            for (src, dst) in copies {
                                prop_assert!(m.ref_count(src) >= 1);
                                prop_assert_eq!(m.ref_count(dst), 1);
                            }
                        } else {
                            prop_assert_eq!(&s.table, &before);
                        }
                    }
                    Op::Fork { seq } if seq < seqs.len() => {
                        let table = m.fork(&seqs[seq].table);
                        let tokens = seqs[seq].tokens.clone();
                        seqs.push(Seq { tokens, table });
                    }
                    Op::Free { seq } if seq < seqs.len() => {
                        let mut s = seqs.swap_remove(seq);
                        m.free(&mut s.table);
                    }
                    _ => {}
                }
                m.check_invariants();
                // Reference counts equal the number of tables holding each block.
                let mut refs = vec![0u32; m.num_blocks()];
                for s in &seqs {
                    prop_assert_eq!(s.table.len(), m.blocks_for(s.tokens.len()));
                    for &b in s.table.blocks() {
                        refs[b as usize] += 1;
                    }
                }
                for (b, &r) in refs.iter().enumerate() {
                    prop_assert_eq!(m.ref_count(b as BlockId), r);
                }
                prop_assert_eq!(m.num_used_blocks(), refs.iter().filter(|&&r| r > 0).count());
            }
            for mut s in seqs {
                m.free(&mut s.table);
            }
            m.check_invariants();
            prop_assert_eq!(m.num_used_blocks(), 0);
            prop_assert_eq!(m.num_free_blocks(), m.num_blocks());
        }
    }
}
