//! llmd daemon.
fn main() {}
