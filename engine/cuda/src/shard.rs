//! Which slice of the model one GPU holds under tensor parallelism: the one type every layer of
//! the crate (experts, peer all-reduce, runner, rank threads) agrees on, with no dependencies.

/// Which slice of the model one GPU holds (Megatron-style): heads, MLP columns and vocabulary
/// split `world` ways; KV heads replicated when `world` exceeds them; routed experts split
/// evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };
}
