//! The shared store test suite.
