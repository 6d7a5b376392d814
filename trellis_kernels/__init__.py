"""Triton kernels with their torch references (decode, fused GEMV/GEMM, Hadamard, Viterbi, BCJR,
decode attention over the KV cache), the tensor-core operand layout they are moving to
(fragments.py), and the C++ CPU kernels for decode steps (cpu.py)."""
