"""The flags several commands share: --device, and the trellis spec (--bits, --state-bits, --code,
--vec) with the defaults a command quantizes with when they are left out."""

from __future__ import annotations

import argparse
from collections import defaultdict

from trellis_runtime.devices import DEFAULT_DEVICE, DEFAULT_HEAD, DEVICES, HEADS
from trellis_runtime.errors import TrellisError
from trellis_runtime.trellis import (CODES, DEFAULT_VEC, MAX_BITS, MAX_STATE_BITS, MIN_STATE_BITS,
                                     TrellisSpec, spec_for)

# On a CPU the full 16-bit trellis takes hours for even a small model; 12 state bits encode about as
# fast as 10 at lower distortion, and each step above costs several times the time (README, Measured:
# state bits L vs MSE vs time).
DEFAULT_STATE_BITS = {"cpu": 12, "cuda": MAX_STATE_BITS}
# On a CPU 3INST: computed in a few vector integer instructions where HYB's table costs a 16-lane
# gather, it decodes 1.7x as fast, needs no float32 copy, and scores a lower perplexity at L=12
# (README, Measured: CPU decode against llama.cpp). On CUDA HYB, which the GPU kernels were measured
# with.
DEFAULT_CODE = {"cpu": "3inst", "cuda": "hyb"}


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE)


def add_head_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", choices=HEADS, default=DEFAULT_HEAD,
                        help="output head on CPU: as stored, or int8 rows quantized at load "
                             "(half the bytes per token)")


def require_head(head: str, device: str) -> None:
    """The int8 head is the CPU kernels' format: a one-line error elsewhere, before loading."""
    if head == "int8" and device != "cpu":
        raise TrellisError(f"--head int8 runs on the CPU only, not on {device}")


def require_device(name: str) -> str:
    """NAME, once it is usable: a one-line error now rather than a CUDA traceback while loading."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TrellisError("--device cuda requested but no CUDA device is available")
    return name


def add_spec_flags(parser: argparse.ArgumentParser, state_bits_default: str, code_default: str) -> None:
    """The spec flags; --state-bits, --code and --vec default to None, filled in by
    `spec_from_arguments` (the state bits and the code with the command's defaults, described by
    `state_bits_default` and `code_default`)."""
    vec_defaults = defaultdict(list)
    for code, vec in DEFAULT_VEC.items():
        vec_defaults[vec].append(code)
    parser.add_argument("--bits", type=int, default=TrellisSpec.bits,
                        help=f"bits per weight K (1-{MAX_BITS})")
    parser.add_argument("--state-bits", type=int, default=None,
                        help=f"trellis state bits L ({MIN_STATE_BITS}-{MAX_STATE_BITS}); default "
                             f"{state_bits_default}")
    parser.add_argument("--code", choices=CODES, default=None,
                        help=f"state-to-value code; default {code_default}")
    parser.add_argument("--vec", type=int, default=None,
                        help="values per trellis step V; default " + ", ".join(
                            f"{vec} for {'/'.join(codes)}" for vec, codes in vec_defaults.items()))


def spec_from_arguments(args: argparse.Namespace, state_bits: int, code: str) -> TrellisSpec:
    """The spec the flags ask for, with `state_bits` and `code` where their flags were left out."""
    return spec_for(code if args.code is None else args.code, bits=args.bits,
                    state_bits=state_bits if args.state_bits is None else args.state_bits,
                    vec=args.vec)


def device_state_bits_help() -> str:
    """'12 on CPU, 16 on CUDA', from DEFAULT_STATE_BITS."""
    return ", ".join(f"{bits} on {device.upper()}" for device, bits in DEFAULT_STATE_BITS.items())


def device_code_help() -> str:
    """'3inst on CPU, hyb on CUDA', from DEFAULT_CODE."""
    return ", ".join(f"{code} on {device.upper()}" for device, code in DEFAULT_CODE.items())


def default_spec(device: str) -> TrellisSpec:
    """What `trellis quantize` makes on `device` with no spec flags, and what serve and generate
    quantize a float model to on first use."""
    return spec_for(DEFAULT_CODE[device], bits=TrellisSpec.bits, state_bits=DEFAULT_STATE_BITS[device])
