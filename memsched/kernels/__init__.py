"""Triton kernels emitted by the fusion pass, each with a PyTorch fallback.

Kernel fusion is not part of memsched yet: the scheduled program calls ATen ops directly.
"""
