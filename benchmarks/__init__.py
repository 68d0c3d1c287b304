"""Benchmarks of iic_ext: fused kernels and the whole IIC step against pure PyTorch.

Run ``python -m benchmarks [--quick] [--only residual,negatives,views,nce,step,loader]
[--device cpu|cuda] [--threads N]`` from the repository root.
"""
