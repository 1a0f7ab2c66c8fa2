"""knn.py against a float64 brute force (exact order, ties to the lower index), against faiss, and distributed
(gloo processes on the CPU) against one process."""

import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knn import GROUP, knn, search_space, whitening

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force(queries, keys, k, metric, exclude_self):
    """Sort every row completely in float64: (score descending, index ascending); l2 returns distances."""
    q, x = queries.double(), keys.double()
    if metric == "cosine":
        q, x = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(x, dim=1)
    scores = -torch.cdist(q, x) ** 2 if metric == "l2" else q @ x.T
    if exclude_self:
        scores.fill_diagonal_(float("-inf"))
    vals, idx = scores.sort(dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    return (-vals if metric == "l2" else vals), idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("num_points,dim,k,chunk_size", [
    (1000, 16, 20, None),       # one block
    (1000, 16, 20, 97),         # chunks that do not divide N
    (333, 5, 7, 64),            # N not a multiple of the group width
    (GROUP * 3, 4, 2, 1),       # one row per chunk, few groups
    (50, 3, 30, None),          # fewer groups than k: the full-sort path
    (300, 16, 40, 32),          # k above a block's rows: lists are completed by the column side
    (4500, 8, 10, 256),         # blocks wider than one product tile (knn.TILE columns)
])
def test_self_search_equals_brute_force(device, metric, num_points, dim, k, chunk_size):
    gen = torch.Generator().manual_seed(num_points + k)
    feats = torch.randn(num_points, dim, generator=gen)
    scores, indices = knn(feats.to(device), k=k, metric=metric, chunk_size=chunk_size)
    ref_scores, ref_indices = brute_force(feats, feats, k, metric, exclude_self=True)
    assert scores.shape == indices.shape == (num_points, k)
    assert scores.device.type == device
    torch.testing.assert_close(scores.cpu().double(), ref_scores, atol=1e-4, rtol=1e-4)
    # continuous random data has no near-ties, so the order must match exactly
    assert torch.equal(indices.cpu(), ref_indices)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_separate_keys(metric):
    gen = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(300, 8, generator=gen), torch.randn(500, 8, generator=gen)
    scores, indices = knn(queries, keys, k=10, metric=metric, chunk_size=70)
    ref_scores, ref_indices = brute_force(queries, keys, 10, metric, exclude_self=False)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_ties_go_to_the_lower_index(metric):
    # binary vectors: many exactly equal scores, also at the k-th place and across groups
    gen = torch.Generator().manual_seed(2)
    # (3000 points = 94 groups > k, so the two-stage path runs and meets ties in both of its stages)
    feats = torch.randint(0, 3, (3000, 3), generator=gen).float() + torch.tensor([1.0, 0, 0])
    scores, indices = knn(feats, k=25, metric=metric, chunk_size=512)
    ref_scores, ref_indices = brute_force(feats, feats, 25, metric, exclude_self=True)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-5, rtol=0)


def test_exclude_self_is_by_index_even_with_duplicates():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2000, 6, generator=gen)  # 63 groups > k: the two-stage path
    feats[50:60] = feats[5]        # eleven identical points, tied with each other inside the top-k
    scores, indices = knn(feats, k=12)
    own = torch.arange(2000)[:, None]
    assert not (indices == own).any()
    dup_rows = [5] + list(range(50, 60))
    for row in dup_rows:           # the ten other copies come first, at similarity 1
        others = sorted(set(dup_rows) - {row})
        assert indices[row, :10].tolist() == others
        torch.testing.assert_close(scores[row, :10], torch.ones(10))
    # without exclusion the point itself (lowest index among equals first) is a neighbour
    _, with_self = knn(feats, k=12, exclude_self=False)
    assert with_self[55, :11].tolist() == sorted(dup_rows)


def test_half_inputs_are_accumulated_in_float32():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(400, 64, generator=gen).half()
    scores, indices = knn(feats, k=5, metric="ip")
    ref_scores, ref_indices = brute_force(feats.float(), feats.float(), 5, "ip", exclude_self=True)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-3, rtol=1e-5)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_equals_faiss(metric):
    faiss = pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(3000, 32, generator=gen)
    if metric == "cosine":
        data = torch.nn.functional.normalize(feats, dim=1).numpy()
        index = faiss.IndexFlatIP(32)
    else:
        data = feats.numpy()
        index = faiss.IndexFlatL2(32)
    index.add(data)
    ref_scores, ref_indices = index.search(data, 11)
    # drop each point itself from faiss' answer, by index
    keep = ref_indices != np.arange(3000)[:, None]
    ref_indices = np.stack([row[mask][:10] for row, mask in zip(ref_indices, keep)])
    ref_scores = np.stack([row[mask][:10] for row, mask in zip(ref_scores, keep)])
    scores, indices = knn(feats, k=10, metric=metric, chunk_size=500)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-4, rtol=1e-4)
    # indices up to ties: every disagreement must be between equal scores
    differ = indices.numpy() != ref_indices
    assert differ.mean() < 1e-3
    np.testing.assert_allclose(scores.numpy()[differ], ref_scores[differ], atol=1e-5)


def test_memory_budget_bounds_the_block():
    feats = torch.randn(5000, 8)
    # 1 MiB budget -> blocks of at most 1 MiB / (4 bytes * 5024 columns) = 52 rows; same answer as one big block
    small = knn(feats, k=5, memory_mb=1)
    big = knn(feats, k=5, chunk_size=5000)
    assert torch.equal(small[1], big[1]) and torch.equal(small[0], big[0])


@pytest.mark.parametrize("call,message", [
    (lambda: knn(torch.randn(10, 4), k=10), "k=10"),
    (lambda: knn(torch.randn(10, 4), k=0), "k=0"),
    (lambda: knn(torch.randn(10, 4), torch.randn(5, 4), k=6), "only 5 candidate"),
    (lambda: knn(torch.randn(0, 4), k=1), "non-empty"),
    (lambda: knn(torch.randn(10), k=1), "2-D"),
    (lambda: knn(torch.randn(10, 4), torch.randn(10, 3), k=1), "dimension 4 but keys have 3"),
    (lambda: knn(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]), k=1), "NaN or infinite"),
    (lambda: knn(torch.randn(10, 4), k=1, metric="euclid"), "unknown metric"),
])
def test_bad_input_raises_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_k_equal_to_all_other_points_is_allowed():
    feats = torch.randn(10, 4)
    _, indices = knn(feats, k=9)
    assert all(sorted(row) == sorted(set(range(10)) - {i}) for i, row in enumerate(indices.tolist()))


def _distributed_cases(world):
    """(queries, keys, knn arguments): built alike in every process."""
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(599, 8, generator=gen)                              # N odd
    # integer-valued points with many duplicates: exact ties everywhere, also at the k-th place
    ties = torch.randint(0, 3, (700, 3), generator=gen).float() + torch.tensor([1.0, 0, 0])
    if world > 2:
        return [(feats, None, dict(k=10, chunk_size=64)), (ties, None, dict(k=25, metric="l2", chunk_size=64)),
                (feats[:301], feats, dict(k=10, metric="ip", chunk_size=50))]
    cases = []
    for metric in ("cosine", "ip", "l2"):
        for exclude_self in (True, False):
            cases.append((feats, None, dict(k=10, metric=metric, exclude_self=exclude_self, chunk_size=64)))
            cases.append((ties, None, dict(k=25, metric=metric, exclude_self=exclude_self, chunk_size=64)))
        cases.append((feats[:301], feats, dict(k=10, metric=metric, chunk_size=50)))    # separate keys
        cases.append((ties[:301], ties, dict(k=25, metric=metric, chunk_size=64)))
    cases.append((feats[:200], None, dict(k=70, chunk_size=32)))   # k above a range's size: lists filled by others
    cases.append((feats[:578], None, dict(k=10, metric="l2", exclude_self=False, chunk_size=64)))  # last block: 2 rows
    cases.append((feats, None, dict(k=10)))                        # one block: one rank does it all
    cases.append((feats[:301], feats, dict(k=10)))
    return cases


def _distributed_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for queries, keys, kwargs in _distributed_cases(world):
            scores, indices = knn(queries, keys, distributed=True, **kwargs)
            ref_scores, ref_indices = knn(queries, keys, **kwargs)
            assert torch.equal(indices, ref_indices), (rank, queries.shape, kwargs)
            assert torch.equal(scores, ref_scores), (rank, queries.shape, kwargs)   # bit for bit
        # the default inside a process group: the whole search on every rank, no communication (rank 1 does not
        # call knn at all, and the ranks pass different points)
        if rank != 1:
            feats = torch.randn(300 + 50 * rank, 6, generator=torch.Generator().manual_seed(rank))
            scores, indices = knn(feats, k=5, metric="l2")
            ref_scores, ref_indices = brute_force(feats, feats, 5, "l2", exclude_self=True)
            assert torch.equal(indices, ref_indices)
            torch.testing.assert_close(scores.double(), ref_scores, atol=1e-4, rtol=1e-4)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_one_process(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork where there is one: spawned children would each import torch again, which takes seconds
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_distributed_worker, args=(world, port), nprocs=world, start_method=method)


def test_distributed_without_process_group_is_the_plain_search():
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(7))
    plain, flagged = knn(feats, k=7), knn(feats, k=7, distributed=True)
    assert torch.equal(plain[0], flagged[0]) and torch.equal(plain[1], flagged[1])


def naive_whitening(x, eps):
    """PCA whitening written out in numpy float64: centre, rotate onto the covariance's eigenvectors, divide each
    axis by sqrt(eigenvalue + eps * largest eigenvalue), L2-normalise each row."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred / len(x))
    eigval = np.clip(eigval, 0, None)
    z = centred @ eigvec / np.sqrt(eigval + eps * eigval.max())
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize("eps", [0.0, 0.01, None])
def test_whitening_equals_a_naive_transcription_and_scikit_learn(eps):
    # The eigenvectors' signs are arbitrary, so rows are compared through their cosine similarities (the Gram matrix),
    # which is what the neighbour search sees. Test points are transformed with the train points' statistics.
    from sklearn.decomposition import PCA
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 12, generator=g) * torch.logspace(0, 2, 12) + 3.0   # anisotropic, off-centre
    test = torch.randn(40, 12, generator=g) * torch.logspace(0, 2, 12) + 3.0
    f = whitening(train, eps)
    expected = naive_whitening(train.numpy(), 12 / 500 if eps is None else eps)       # default eps: d / N
    got = f(train).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got @ got.T, expected @ expected.T, atol=1e-4)
    if eps == 0.0:  # scikit-learn's PCA(whiten=True) differs only by a global scale (N - 1), gone after normalising
        ref = PCA(whiten=True).fit(train.numpy().astype(np.float64)).transform(test.numpy().astype(np.float64))
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        got = f(test).double().numpy()
        np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-4)


def test_whitening_finds_the_neighbours_that_large_nuisance_directions_hide():
    # Two classes apart along a direction of small variance, and three nuisance directions (think brightness, size,
    # pose) of large variance: cosine neighbours of the raw features follow the nuisance, even once centred; the
    # whitened ones follow the classes.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 2
    x = torch.randn(1000, 8, generator=g) * 0.3
    x[:, 0] += 2.0 * labels - 1.0                                              # the class: +-1
    x[:, 1:4] += 10.0 * torch.randn(1000, 3, generator=g)                      # the nuisance: spread 10
    x += 50.0                                                                  # off-centre, as ReLU features are
    purity = lambda z: (labels[knn(z, k=10)[1]] == labels[:, None]).float().mean().item()
    assert purity(x) < 0.6 and purity(x - x.mean(0)) < 0.7 and purity(whitening(x)(x)) > 0.95


@pytest.mark.parametrize("whiten", [True, False])
def test_search_space_cosine_is_the_mean_of_the_features_and_the_pixels_cosines(whiten):
    g = torch.Generator().manual_seed(0)
    z, pixels = torch.randn(200, 6, generator=g) + 2.0, torch.rand(200, 30, generator=g) * 255     # off-centre
    cosine = lambda x: (lambda u: u @ u.T)(torch.nn.functional.normalize(x.double(), dim=1))       # [N, N]
    part = lambda x: whitening(x)(x) if whiten else x                          # of L2-normalised rows, as scan.py
    both = search_space(z, pixels, whiten)                                     # [200, 36], rows of norm 1
    np.testing.assert_allclose(both.double().norm(dim=1), 1.0, atol=1e-5)
    expected = (cosine(part(torch.nn.functional.normalize(z, dim=1))) +
                cosine(part(torch.nn.functional.normalize(pixels, dim=1)))) / 2
    np.testing.assert_allclose(both.double() @ both.double().T, expected, atol=1e-5)
    alone = search_space(z, whiten=whiten)                                     # no pixels: the features' own space
    np.testing.assert_allclose(alone.double() @ alone.double().T, cosine(part(torch.nn.functional.normalize(z, dim=1))),
                               atol=1e-5)
