"""Kernel families: one module each, holding the dispatch and the NumPy/array-API reference.

Each family mirrors ``csrc/cpu/<family>_cpu.cpp`` and ``csrc/cuda/<family>_cuda.cu``.
"""
