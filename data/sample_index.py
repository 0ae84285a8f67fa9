"""A sample's dataset row from its WebDataset key, for losses with per-sample state (FastCLIP).

img2dataset names each sample by a zero-padded number (`000010023`: shard 1, row 23 with
10,000-row shards), and FastCLIP's reference uses that number as the sample index, with
`data_size` the number of input rows (so indices are dense up to the rows that failed to download).
The synthetic shapes writer's keys are `<split><running index>` (`train00000042`). Both end in
the index: the trailing digits are it.
"""
from __future__ import annotations

import re

_TRAILING_DIGITS = re.compile(r"(\d+)$")


def sample_index_from_key(key: str) -> int:
    """The integer a key ends with; a key without one is an error naming it."""
    match = _TRAILING_DIGITS.search(key.rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"sample key {key!r} does not end in a number: FastCLIP needs numbered samples "
                         "(img2dataset keys, or the synthetic writer's)")
    return int(match.group(1))
