"""What a width without a Kronecker Hadamard transform loses, measured on real weights.

Some widths (11008 = 43 * 256) have no H_n = H_r kron H_{2^p} here. trellis_runtime.hadamard then
rotates in diagonal blocks (I_k kron H_b); the alternative is to pad the width with zeros up to one
that has a transform, and pay for the padding in stored bits. SmolLM2-135M's widths (576, 1536) do
have transforms, so both fallbacks are forced on them and compared, side by side in one run, with
the full transform: for a handful of its linears, plain Viterbi reconstruction error (no Hessian)
of the doubly rotated weight, relative to the weight's energy, under

  full     H_n on each side (today's rotation for these widths);
  blockB   I_{n/B} kron H_B on each side: B = 16 and 64 (Sylvester blocks) and a large block
           (192 = 12 * 16 of 576, 512 of 1536): what the fallback gives a width whose odd part
           has no construction (688 = 43 * 16 gets blocks of 16, 11008 = 43 * 256 of 256);
  pad      the weight padded with zeros to the next multiple of 16 that has a full transform,
           quantized whole, the error measured on the original entries only.

"bits" is what each stores per original weight; "bits_lost" puts error and storage in one currency:
the extra bits per weight over `full`, counting an error ratio e as log2(e) / 2 bits (a trellis
code's error falls by 4x per bit) plus the padding's extra storage. Written to
benchmarks/results/rotation_fallback.json.

To fit a few minutes of CPU only a random sample of each rotated matrix's tiles (--tiles) is
quantized, the others kept exact, and the error scaled by tiles / sampled: an unbiased estimate
(the tiles' errors are independent), exact in expectation also for `pad`, whose error is measured
after rotating back and cropping.

    .venv/bin/python benchmarks/rotation_fallback.py [--layers 0 15] [--tiles 192]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qat.sources import load_float_model, resolve_source
from trellis_cli.flags import default_spec
from trellis_runtime.codes import initial_table, state_values
from trellis_runtime.hadamard import hadamard_transform, random_signs, rotation_plan
from trellis_runtime.quantized import matrix_to_tiles, tiles_to_matrix
from trellis_runtime.trellis import TILE_COLS, TrellisSpec
from trellis_runtime.viterbi import encode

RESULTS = Path(__file__).parent / "results" / "rotation_fallback.json"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
SCALE_RATIO = 0.9  # qat.ptq.QuantizeOptions.scale_ratio's default
# Forced block sizes per width: 16 and 64 (Sylvester), and a large block with a transform.
BLOCKS = {576: (16, 64, 192), 1536: (16, 64, 512)}


def rotate_blocks(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """(I_{n/block} kron H_block) (signs * x) along the last dim."""
    n = x.shape[-1]
    y = (x * signs.to(x.dtype)).reshape(*x.shape[:-1], n // block, block)
    return hadamard_transform(y).reshape(x.shape)


def unrotate_blocks(y: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    n = y.shape[-1]
    x = hadamard_transform(y.reshape(*y.shape[:-1], n // block, block), transpose=True)
    return x.reshape(y.shape) * signs.to(y.dtype)


def padded_width(n: int) -> int:
    """The next multiple of 16 above n whose rotation is a full Kronecker transform."""
    m = n + TILE_COLS
    while rotation_plan(m).blocks != 1:
        m += TILE_COLS
    return m


def quantize(rotated: torch.Tensor, spec: TrellisSpec, values: torch.Tensor, sample: int,
             seed: int) -> tuple[torch.Tensor, float]:
    """The rotated matrix with `sample` random tiles replaced by their plain Viterbi
    reconstruction (scaled as PTQ scales it), and the factor tiles / sampled."""
    scale = rotated.pow(2).mean().sqrt() / SCALE_RATIO
    tiles = matrix_to_tiles(rotated / scale)
    flat = tiles.reshape(-1, tiles.shape[-1]).clone()
    chosen = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:sample]
    states = encode(flat[chosen], values, spec)
    flat[chosen] = values[states].reshape(len(chosen), -1)
    return tiles_to_matrix(flat.reshape(tiles.shape)) * scale, flat.shape[0] / len(chosen)


def rotation_error(w: torch.Tensor, blocks: tuple[int, int], shape: tuple[int, int],
                   spec: TrellisSpec, values: torch.Tensor, sample: int, seed: int) -> float:
    """Relative error on the top-left `shape` entries of w (the original weight; the rest is
    padding) after rotating with blocks (out_block, in_block), quantizing and rotating back."""
    m, n = w.shape
    s_in, s_out = random_signs(n, seed), random_signs(m, seed + 1)
    rotated = rotate_blocks(rotate_blocks(w, s_in, blocks[1]).T, s_out, blocks[0]).T
    recon, factor = quantize(rotated, spec, values, sample, seed)
    back = unrotate_blocks(unrotate_blocks(recon.T, s_out, blocks[0]).T, s_in, blocks[1])
    original, got = w[:shape[0], :shape[1]], back[:shape[0], :shape[1]]
    return float((got - original).pow(2).sum() * factor / original.pow(2).sum())


def measure(name: str, w: torch.Tensor, spec: TrellisSpec, values: torch.Tensor, sample: int,
            seed: int) -> list[dict]:
    """One row per rotation of w: its kind, blocks, relative error, bits and bits lost."""
    m, n = w.shape
    m2, n2 = padded_width(m), padded_width(n)
    variants = [("full", (m, n), w)]
    variants += [(kind, blocks, w) for kind, blocks in
                 zip(("block16", "block64", "block_large"), zip(BLOCKS[m], BLOCKS[n]))]
    variants.append(("pad", (m2, n2), F.pad(w, (0, n2 - n, 0, m2 - m))))
    rows = []
    for kind, blocks, matrix in variants:
        error = rotation_error(matrix, blocks, (m, n), spec, values, sample, seed)
        bits = spec.bits * matrix.numel() / w.numel()
        rows.append({"linear": name, "shape": [m, n], "rotation": kind, "blocks": list(blocks),
                     "rel_mse": error, "bits": bits})
    full = rows[0]["rel_mse"]
    for row in rows:
        row["bits_lost"] = math.log2(row["rel_mse"] / full) / 2 + row["bits"] - spec.bits
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per rotation kind, means over the linears: error ratio to `full`, bits, bits lost."""
    full = {r["linear"]: r["rel_mse"] for r in rows if r["rotation"] == "full"}
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        kinds.setdefault(row["rotation"], []).append(row)
    return {kind: {"mse_ratio": sum(r["rel_mse"] / full[r["linear"]] for r in group) / len(group),
                   "bits": sum(r["bits"] for r in group) / len(group),
                   "bits_lost": sum(r["bits_lost"] for r in group) / len(group)}
            for kind, group in kinds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    parser.add_argument("--tiles", type=int, default=192, help="tiles quantized per matrix")
    args = parser.parse_args()
    spec = default_spec("cpu")
    values = state_values(spec, initial_table(spec, seed=0))
    model, _ = load_float_model(resolve_source("smollm2-135m"))
    started = time.time()
    rows = []
    for layer in args.layers:
        block = model.model.layers[layer]
        for i, linear in enumerate(LINEARS):
            w = block.get_submodule(linear).weight.detach().to(torch.float32)
            name = f"layers.{layer}.{linear}"
            for row in measure(name, w, spec, values, args.tiles, seed=1000 * layer + i):
                rows.append(row)
                print(f"{name:<28}{row['rotation']:<15}{str(row['blocks']):<13}"
                      f"{row['rel_mse']:>9.5f}{row['bits']:>7.3f}{row['bits_lost']:>+9.4f}",
                      flush=True)
    summary = summarize(rows)
    for kind, entry in summary.items():
        print(f"{kind:<15} error x{entry['mse_ratio']:.4f}  bits {entry['bits']:.3f}  "
              f"bits lost {entry['bits_lost']:+.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1),
        "spec": spec.to_dict(), "scale_ratio": SCALE_RATIO, "layers": args.layers,
        "tiles_sampled": args.tiles,
        "summary": summary, "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
