"""The flags several commands share: --device, and the trellis spec (--bits, --state-bits, --code,
--vec) with the defaults a command quantizes with when they are left out."""

from __future__ import annotations

import argparse

from trellis_runtime.devices import DEVICES
from trellis_runtime.errors import TrellisError
from trellis_runtime.trellis import CODES, spec_for

# On a CPU the full 16-bit trellis would take hours for even a small model; 12 state bits keep a
# 2-bit SmolLM2-135M under about 15 minutes on 2 cores (README: L vs MSE vs time).
DEFAULT_STATE_BITS = {"cpu": 12, "cuda": 16}


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="cpu")


def require_device(name: str) -> str:
    """NAME, once it is usable: a one-line error now rather than a CUDA traceback while loading."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TrellisError("--device cuda requested but no CUDA device is available")
    return name


def add_spec_flags(parser: argparse.ArgumentParser, default_code: str) -> None:
    parser.add_argument("--bits", type=int, default=2, help="bits per weight K (1-4)")
    parser.add_argument("--state-bits", type=int, default=None,
                        help="trellis state bits L (8-16); default 12 on CPU, 16 on CUDA")
    parser.add_argument("--code", choices=CODES, default=default_code, help="state-to-value code")
    parser.add_argument("--vec", type=int, default=None,
                        help="values per trellis step V; default 1 for 1mad/3inst, 2 for hyb/lut")


def spec_from_arguments(args: argparse.Namespace, device: str):
    state_bits = args.state_bits if args.state_bits is not None else DEFAULT_STATE_BITS[device]
    return spec_for(args.code, bits=args.bits, state_bits=state_bits, vec=args.vec)
