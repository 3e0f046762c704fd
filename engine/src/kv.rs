//! kv (in progress)
