"""Which tokens end a generation: every EOS id of the checkpoint's generation_config.json (copied
from the source model, whose authors list there every token a turn may end with, e.g. both
<|eot_id|> and <|end_of_text|> for Llama 3 Instruct) plus the tokenizer's EOS token. The file is
optional: a checkpoint without it stops on the tokenizer's EOS token alone."""

from __future__ import annotations

import json
from pathlib import Path

from trellis_runtime.errors import CheckpointError

GENERATION_CONFIG_FILE = "generation_config.json"


def stop_token_ids(checkpoint_dir: str | Path, tokenizer) -> list[int]:
    """The EOS ids of `checkpoint_dir`'s generation config and `tokenizer`'s EOS id, sorted."""
    ids = set(configured_eos_ids(Path(checkpoint_dir) / GENERATION_CONFIG_FILE))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def configured_eos_ids(path: Path) -> list[int]:
    """`eos_token_id` of a generation config file (an int or a list); none when the file is absent."""
    if not path.is_file():
        return []
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of token ids, "
                              f"got {eos!r}")
    return ids
