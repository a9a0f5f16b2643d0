"""Kernel backends, one package each, every one meeting the contract written in
`spatialformer_kernels.dispatch` (the one place a backend is chosen):

- `triton`: fused Triton kernels for CUDA tensors (and CPU tensors in Triton's interpreter).
- `cpu`: the C++ kernel in `cpu/csrc/`, compiled on first use, for CPU tensors.

The pure-PyTorch reference (`spatialformer_kernels.reference`) is not a package here: it is
the specification every backend is tested against, and the fallback.
"""
