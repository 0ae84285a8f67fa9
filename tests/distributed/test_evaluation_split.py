"""Evaluation over DP ranks when the batches do not split evenly: fewer batches than ranks (a rank
with nothing to encode), an odd count, a short last batch, labels on only some batches. Each DP=2
result must equal the one-process evaluation of the same batches exactly (the rows come back in
batch order, so even ties rank the same)."""
import pytest
import torch

from tests.distributed.harness import run_ranks


def _batches(sizes, labelled):
    gen = torch.Generator().manual_seed(0)
    out = []
    for size, has_labels in zip(sizes, labelled):
        batch = {"images": torch.randn(size, 6, generator=gen), "tokens": torch.randn(size, 5, generator=gen)}
        if has_labels:
            batch["class_index"] = torch.randint(0, 3, (size,), generator=gen)
        out.append(batch)
    return out


def _evaluate_both_ways(cases):
    from engine.evaluation import collect_features
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    encode_image = lambda x: torch.nn.functional.normalize(x[:, :4], dim=1)
    encode_text = lambda x: torch.nn.functional.normalize(x[:, :4], dim=1)
    results = []
    for sizes, labelled in cases:
        batches = _batches(sizes, labelled)
        split = collect_features(encode_image, encode_text, batches, ctx.dp_rank, ctx.dims.dp, ctx.dp_group, ctx.device)
        whole = collect_features(encode_image, encode_text, batches, 0, 1, None, ctx.device)
        results.append((split, whole))
    return results


CASES = [
    ([256], [True]),  # one batch, two DP ranks (as eval.batch_size = the whole set): rank 1 encodes nothing
    ([4, 4, 3], [True, True, True]),  # odd number of batches, short last one
    ([4, 2], [True, False]),  # labels on rank 0's batch only
    ([3], [False]),  # no labels anywhere, one rank empty
]


@pytest.fixture(scope="module")
def results():
    return run_ranks(2, _evaluate_both_ways, CASES, timeout=120)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dp2_equals_one_process(results, case):
    sizes, labelled = CASES[case]
    for rank in range(2):
        (images, texts, labels), (want_images, want_texts, want_labels) = results[rank][case]
        assert images.shape == (sum(sizes), 4) and texts.shape == (sum(sizes), 4)
        assert torch.equal(images, want_images) and torch.equal(texts, want_texts)
        if all(labelled):
            assert torch.equal(labels, want_labels) and labels.shape == (sum(sizes),)
        else:
            assert labels is None and want_labels is None


def test_empty_evaluation_set_is_an_error():
    from engine.evaluation import collect_features

    with pytest.raises(ValueError, match="evaluation set is empty"):
        collect_features(lambda x: x, lambda x: x, [], 0, 1, None, "cpu")
