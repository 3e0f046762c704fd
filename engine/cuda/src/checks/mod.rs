//! GPU self-checks, built only with the `checks` feature for the `llmd-cuda-check` binary
//! (`llmd-cuda-check kernels`, `llmd-cuda-check attention`); the serving library does not carry
//! them. Each compares a kernel with a host reference on random inputs and reports per case.

pub mod attention;
pub mod kernels;
pub mod moe_bench;
