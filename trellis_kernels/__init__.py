"""Triton kernels with their torch references (decode, fused GEMV/GEMM, Hadamard, Viterbi, BCJR), and
the C++ CPU kernels for decode steps (cpu.py)."""
