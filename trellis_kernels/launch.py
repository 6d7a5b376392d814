"""A kernel launch as data: built before it runs, so that it can also be compiled ahead of time
exactly as it would run (trellis_cli/kernel_aot.py, benchmarks/kernels_sass.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    kernel: object  # a triton.jit function (or its interpreted stand-in)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict  # num_warps, num_stages

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    def arguments(self) -> dict:
        """Every parameter by name: the runtime arguments and the constexprs."""
        return dict(zip(self.kernel.arg_names, self.args), **self.constexprs)
