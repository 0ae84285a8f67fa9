"""Sharded, layout-independent checkpoints with atomic commit, exact resume and re-sharding.

Backend: torch.distributed.checkpoint (DCP) with our own canonical keys, not megatron-core's
`dist_checkpointing`. Why: DCP runs unchanged on CPU/gloo and GPU/NCCL (megatron's torch_dist
saver calls `torch.cuda.synchronize()`/`current_device()` and would need more CPU shims), it
re-shards any N-d box layout on load (so a ZeRO-1 flat shard, a few boxes per parameter, needs no
gather), and its planner/storage hooks let every rank write only its own pieces, dedup replicated
ones and read exactly the boxes it needs. Names stay megatron's (TP=1/PP=1 keys, global layer
numbers), so a converter to megatron's format is a renaming.

- `manager.CheckpointManager`: when to save, atomic commit, keep-K, `latest`, resume, async save,
  preemption (see `preemption.py` for the exit behaviour).
- `state`: what goes in (model, optimizer moments and master weights, RNG, data position).
- `layout`: canonical names and boxes; `storage`: the on-disk form and the commit protocol.
- `tools`: write/read model-only checkpoints, `inspect`, offline `reshard` (TP/PP/dtype), for any
  registered model family (the checkpoint names its family).
- `key_map`: model weights through a `KeyMap` (renames, allowed missing/unused names): TE <-> local
  layers, base weights into LoRA layers, a model assembled from several checkpoints.
- `lock`: one run per checkpoint directory (a lock file naming its holder, with a heartbeat).
"""
from engine.checkpoint.key_map import KeyMap, load_model_weights  # noqa: F401
from engine.checkpoint.lock import CheckpointLockError  # noqa: F401
from engine.checkpoint.manager import CheckpointManager, load_into  # noqa: F401
from engine.checkpoint.storage import Boxes, CheckpointError  # noqa: F401
