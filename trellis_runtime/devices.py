"""The devices the runtime runs on: the one list every `--device` flag and setting offers."""

from __future__ import annotations

from typing import Literal, get_args

# A typed setting (server/settings.py) declares itself `Device`; a flag offers `DEVICES`.
Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
# What runs when no device is named: the CPU is always there; CUDA is asked for.
DEFAULT_DEVICE: Device = "cpu"
# How the output head is stored on the CPU: as the checkpoint holds it (bf16), or as int8 rows with a
# scale each, quantized at load (TrellisModel.quantize_head): half the bytes a decode step reads.
Head = Literal["bf16", "int8"]
HEADS: tuple[str, ...] = get_args(Head)
DEFAULT_HEAD: Head = "bf16"
