"""Triton kernels with their torch references (decode, fused GEMV/GEMM, Hadamard, Viterbi, BCJR)."""
