"""The micro-batch finder over 2 gloo ranks with different memory budgets."""
from models.common.finetune_utils import find_micro_batch_size
from tests.distributed.harness import run_ranks


def _find_on_ranks(budgets):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    budget = budgets[dist.get_rank()]
    tried = []

    def fits(b):
        tried.append(b)
        return b <= budget

    return find_micro_batch_size(fits, limit=64, group=dist.group.WORLD), tried


def test_finder_agrees_over_ranks():
    """Each trial is ANDed over the group: the ranks try the same sizes and agree on the smallest fit."""
    (size0, tried0), (size1, tried1) = run_ranks(2, _find_on_ranks, [40, 13])
    assert size0 == size1 == 13
    assert tried0 == tried1
