//! models (in progress)
