"""Benchmarks: kernel microbenchmarks and whole-model benchmarks."""
