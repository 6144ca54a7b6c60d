"""LLaVA's modality-length grouped sampler: invariants, DDP sharding, determinism, resume."""
import numpy as np
import pytest

from llava_san.data import ModalityLengthGroupedBatchSampler as Sampler
from llava_san.data import split_to_even_chunks


def llava_split_to_even_chunks(indices, lengths, num_chunks):
    """Reference: LLaVA ``llava_trainer.split_to_even_chunks`` (copied logic)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    num_indices_per_chunk = len(indices) // num_chunks
    chunks = [[] for _ in range(num_chunks)]
    chunks_lengths = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest_chunk = chunks_lengths.index(min(chunks_lengths))
        chunks[shortest_chunk].append(index)
        chunks_lengths[shortest_chunk] += lengths[index]
        if len(chunks[shortest_chunk]) == num_indices_per_chunk:
            chunks_lengths[shortest_chunk] = float("inf")
    return chunks


def lengths(n_mm, n_lang, seed=0, distinct=False):
    rng = np.random.default_rng(seed)
    if distinct:  # no ties: the length sort is unambiguous
        mags = rng.permutation(np.arange(1, n_mm + n_lang + 1))
        out = np.concatenate([mags[:n_mm], -mags[n_mm:]])
    else:
        out = np.concatenate([rng.integers(1, 400, n_mm), -rng.integers(1, 900, n_lang)])
    return out[rng.permutation(len(out))]


def flat(batches):
    return [i for b in batches for i in b]


def test_split_to_even_chunks_matches_llava():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 100, 64)
    for n, k in [(64, 8), (64, 4), (60, 8), (7, 3), (16, 16)]:
        idx = sorted(range(n), key=lambda i: -lens[i])
        assert split_to_even_chunks(idx, lens, k) == llava_split_to_even_chunks(idx, lens.tolist(), k)


def test_single_process_permutation_and_modality():
    lens = lengths(1000, 203)
    s = Sampler(lens, batch_size=16, seed=3)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(flat(batches)) == list(range(len(lens)))  # a permutation: each index exactly once
    for b in batches:
        assert 1 <= len(b) <= 16
        signs = np.sign(lens[b])
        assert (signs == signs[0]).all()  # image and text-only never share a batch
    # full megabatches (W*A = 1): each batch is one megabatch sorted longest first
    for b in batches[:-2]:
        assert len(b) == 16 and list(np.abs(lens[b])) == sorted(np.abs(lens[b]), reverse=True)
    assert s.num_padded == 0


def test_determinism_per_seed_and_epoch():
    lens = lengths(500, 100)
    a, b = Sampler(lens, 8, seed=7), Sampler(lens, 8, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    e1 = list(a)
    assert e1 != list(b)
    b.set_epoch(1)
    assert list(b) == e1
    assert list(Sampler(lens, 8, seed=8)) != list(Sampler(lens, 8, seed=7))


@pytest.mark.parametrize("world,accum", [(4, 1), (4, 2), (3, 2)])
def test_ddp_shards_disjoint_covering_and_in_lockstep(world, accum):
    bs = 4
    mb = bs * world * accum
    # partial megabatches hold >= world samples, so nothing is padded
    lens = lengths(5 * mb + world * 3, 2 * mb + world, distinct=True)
    ranks = [Sampler(lens, bs, world_size=world, rank=r, grad_accum=accum, seed=11) for r in range(world)]
    shards = [list(s) for s in ranks]
    assert len({len(x) for x in shards}) == 1 and len(shards[0]) == len(ranks[0])  # same batch count
    all_idx = [i for sh in shards for i in flat(sh)]
    assert sorted(all_idx) == list(range(len(lens)))  # disjoint and covering
    for sh in shards:
        for b in sh:
            assert len(set(np.sign(lens[b]))) == 1
    # one global step = one megabatch: batch j of rank r is chunk (j*W + r) of the global order
    g = ranks[0].global_batches()
    for r in range(world):
        assert shards[r] == g[r::world]
    first_mb = flat(g[: world * accum])
    assert len(first_mb) == mb and len(set(np.sign(lens[first_mb]))) == 1
    # chunks of a full megabatch are LLaVA's balanced split of the length-sorted megabatch
    order = sorted(first_mb, key=lambda i: -abs(lens[i]))
    assert [sorted(c) for c in g[: world * accum]] == [
        sorted(c) for c in llava_split_to_even_chunks(order, np.abs(lens).tolist(), world * accum)]


def test_tiny_leftover_is_padded_so_ranks_step_together():
    lens = np.array([5] * 16 + [-3])  # one text-only sample, two ranks
    shards = [list(Sampler(lens, 4, world_size=2, rank=r, seed=0)) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert set(flat(shards[0]) + flat(shards[1])) == set(range(17))
    s = Sampler(lens, 4, world_size=2, rank=0, seed=0)
    list(s)
    assert s.num_padded == 1  # the text-only sample appears on both ranks


def test_resume_reproduces_the_tail():
    lens = lengths(700, 90)
    s = Sampler(lens, 8, world_size=2, rank=1, grad_accum=2, seed=5)
    s.set_epoch(3)
    full = list(s)
    for k in (0, 1, 17, len(full) - 1, len(full)):
        r = Sampler(lens, 8, world_size=2, rank=1, grad_accum=2, seed=5)
        r.set_epoch(3)
        r.set_start_batch(k)
        assert list(r) == full[k:]
        assert len(r) == len(full)  # len is always the full epoch
        assert list(r) == full  # the start position is one-shot
    r = Sampler(lens, 8, world_size=2, rank=1, grad_accum=2, seed=5)
    r.set_epoch(3)
    n = sum(len(b) for b in full[:10])
    r.set_start_index(n)
    assert list(r) == full[10:]
    with pytest.raises(ValueError, match="batch boundary"):
        r.set_start_index(n + 1)
    # state dict round trip; a start position does not leak into another epoch
    r.set_start_batch(4)
    state = r.state_dict()
    q = Sampler(lens, 8, world_size=2, rank=1, grad_accum=2, seed=5)
    q.load_state_dict(state)
    assert q.epoch == 3 and list(q) == full[4:]
    q.load_state_dict(state)
    q.set_epoch(4)
    assert len(list(q)) == len(full)
    with pytest.raises(ValueError, match="world_size: saved 2 != now 4"):
        Sampler(lens, 8, world_size=4, rank=1, grad_accum=2, seed=5).load_state_dict(state)


def test_random_and_sequential_modes():
    lens = lengths(100, 30)
    s = Sampler(lens, 8, seed=1, mode="random")
    assert sorted(flat(list(s))) == list(range(130))
    shards = [list(Sampler(lens, 8, world_size=3, rank=r, mode="sequential")) for r in range(3)]
    got = [i for sh in shards for i in flat(sh)]
    assert sorted(got) == list(range(130)) and len(got) == 130  # no padding for evaluation
    assert all(flat(sh) == sorted(flat(sh)) for sh in shards)
    with pytest.raises(ValueError, match="mode"):
        Sampler(lens, 8, mode="bogus")
    with pytest.raises(ValueError, match="non-zero"):
        Sampler(np.array([1, 0, -1]), 2)


def test_only_one_modality():
    lens = np.arange(1, 51)  # easy-vqa: all image samples
    shards = [list(Sampler(lens, 8, world_size=2, rank=r)) for r in range(2)]
    assert sorted(flat(shards[0] + shards[1])) == list(range(50))
