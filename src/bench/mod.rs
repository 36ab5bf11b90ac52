//! Benchmarks driven from the command line (`churnlog bench ...`).
