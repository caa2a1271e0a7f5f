"""The data order: every example once per epoch, split exactly between ranks, and identical
for any split of the same global batch (the property resume and sharded-vs-single rely on)."""
from dsft.batches import StepBatches


def _global_batch(batches: StepBatches, step: int, world: int) -> list[int]:
    return [i for rank in range(world) for micro in batches.micro_batches(step, rank) for i in micro]


def test_each_epoch_visits_every_example_once():
    batches = StepBatches(range(12), micro_batch=2, accumulation=3, world_size=2, seed=0)
    epoch_one = _global_batch(batches, 0, 2)
    assert sorted(epoch_one) == list(range(12))
    assert sorted(_global_batch(batches, 1, 2)) == list(range(12))
    assert _global_batch(batches, 1, 2) != epoch_one  # a new permutation


def test_two_ranks_see_the_same_global_batch_as_one_process_with_double_accumulation():
    two = StepBatches(range(37), micro_batch=2, accumulation=2, world_size=2, seed=5)
    one = StepBatches(range(37), micro_batch=2, accumulation=4, world_size=1, seed=5)
    for step in range(20):  # crosses epoch boundaries (37 is not a multiple of 8)
        assert _global_batch(two, step, 2) == _global_batch(one, step, 1)
        assert set(two.micro_batches(step, 0)[0]).isdisjoint(two.micro_batches(step, 1)[0])


def test_a_subset_stream_only_draws_from_its_examples():
    subset = [3, 7, 11, 19]
    batches = StepBatches(subset, micro_batch=1, accumulation=2, world_size=1, seed=1)
    drawn = [i for step in range(10) for micro in batches.micro_batches(step, 0) for i in micro]
    assert set(drawn) == set(subset)
