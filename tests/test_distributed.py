"""tlcourse.distributed: DDP on 2 CPU processes (gloo) takes the steps one process takes."""

import time

import pytest
import torch
from torch.utils.data import Dataset

from tlcourse import distributed, finetune


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_two_processes_on_half_batches_equal_one_process_on_the_whole(batch, tmp_path):
    x, y = batch
    alone = distributed.gradient_step_worker(x, y, 4)
    ranks = distributed.launch(distributed.gradient_step_worker, 2, x, y, 4, 0.1, 1, str(tmp_path / "ddp.pt"))
    accumulated = distributed.gradient_step_worker(x, y, 4, 0.1, 2)
    start = distributed.gradient_step_worker(x, y, 0)
    for name, value in alone.items():
        if name != "logits":
            assert not torch.equal(value, start[name])                    # the steps moved it
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-5)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0)   # replicas stay equal
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-5)
    # The gathered evaluation: 15 rows (8 on rank 0, 7 on rank 1), each once, in order.
    assert ranks[0]["logits"].shape == (15, 3)
    # Rank 0 alone wrote the checkpoint, the unwrapped network's weights, complete.
    saved = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert saved["steps"] == 4 and not list(tmp_path.glob("*.part"))
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(value, ranks[0][name], rtol=0, atol=0)


def test_a_failing_rank_ends_the_job_with_its_error_in_bounded_time():
    start = time.perf_counter()
    with pytest.raises(distributed.WorkerFailed, match=r"^rank 1 failed.*could not read its data") as failed:
        distributed.launch(distributed.failing_worker, 2, 1)
    # Rank 0 failed too, as a consequence; the cause is named first either way.
    assert "other ranks were stopped" in str(failed.value)
    # Rank 0 was waiting in an all-reduce that would never complete (its timeout: 60 s); the
    # launcher stopped it as soon as rank 1 exited.
    assert time.perf_counter() - start < 45


def test_not_launched_is_one_process(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)


def test_split_batch_and_the_linear_scaling_rule():
    assert distributed.split_batch(32, 2) == 16
    assert distributed.split_batch(32, 2, accumulate=4) == 4
    with pytest.raises(ValueError, match="multiple of 6"):
        distributed.split_batch(32, 3, accumulate=2)
    assert distributed.scaled_lr(1e-3, 256, 32) == pytest.approx(8e-3)   # 8x the batch, 8x the rate
    assert distributed.scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)   # Goyal et al.'s ImageNet run
    assert distributed.rank_seed(0, 1) != distributed.rank_seed(1, 0)


class _Draw(Dataset):
    """Item i: one random number drawn from the global stream (as an augmentation would)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.rand(1).item(), i


def test_seeded_items_depend_on_seed_epoch_and_index_only():
    items = distributed.SeededItems(_Draw(), seed=5)
    torch.manual_seed(0)
    a = [items[(0, i)][0] for i in range(12)]
    torch.manual_seed(123)                                   # what the process drew before
    b = [items[(0, i)][0] for i in reversed(range(12))][::-1]  # and the order do not matter
    assert a == b
    assert items[(1, 3)][0] != a[3]                          # another epoch, another draw
    assert distributed.SeededItems(_Draw(), seed=6)[(0, 3)][0] != a[3]
    state = torch.get_rng_state()
    items[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())        # the caller's stream is left alone


def test_ranks_split_each_step_of_the_shared_permutation():
    data = _Draw()
    one = distributed.train_sampler(data, distributed.Context(0, 1), seed=2)
    two = [distributed.train_sampler(data, distributed.Context(r, 2), seed=2) for r in (0, 1)]
    for epoch in (0, 1):
        for s in [one, *two]:
            s.set_epoch(epoch)
        whole = [i for _, i in one]
        halves = [[i for e, i in s] for s in two]
        assert {e for e, _ in one} == {epoch}
        # Step t of a batch of 4: images 4t..4t+3 of the permutation, 2 on each rank.
        for t in range(3):
            assert sorted(halves[0][2 * t:2 * t + 2] + halves[1][2 * t:2 * t + 2]) == sorted(whole[4 * t:4 * t + 4])
        assert not set(halves[0]) & set(halves[1])
    assert whole != [i for _, i in (one.set_epoch(0) or one)]   # set_epoch reshuffles


def test_fit_refuses_gradual_unfreezing():
    with pytest.raises(ValueError, match="DDP"):
        distributed.fit(lambda: None, finetune.Strategy("g", gradual=True), _Draw(), _Draw(), distributed.Context())
