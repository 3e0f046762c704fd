//! cpu (in progress)
