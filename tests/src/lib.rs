//! End-to-end test harness: starts the real binaries.
