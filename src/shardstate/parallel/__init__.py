"""Tensor parallelism: process groups and the parallel layers a rank-local model is built from."""
