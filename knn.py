"""Exact k-nearest-neighbour search by chunked matrix multiplication (algorithm-free, shared).

SCAN mines its neighbours with it (Sec. 3.1 of the SCAN paper), DeepCluster builds PIC's 5-NN graph and the
10-NN graph behind the "ratio edge intra-class" (Caron's thesis, Sec. 2.4 and 4.1), and the scripts use it for
weighted k-NN monitors. One function, any device, bounded memory, exact:

    scores, indices = knn(features, k=20)                  # each row's 20 most similar rows, itself excluded
    dist, idx = knn(test_feats, train_feats, k=5, metric="l2")

How the top-k is taken (cheaper than `topk` over whole rows; the matrix product is most of the time):
a block of scores S [R, M] is cut into groups of G consecutive columns; the k best entries of a row lie in the
k groups with the largest maxima (if an entry were in another group, the k groups ahead of it would each hold a
larger or equal, lower-indexed entry). So one cheap `amax` pass over S, a `topk` over M/G group maxima and a
`topk` over the k*G candidates replace a `topk` over M entries. Ties are broken towards the lower index; the rare
rows with a tie exactly at the k-th place are redone with a stable full sort, so the answer never depends on how
`topk` orders equal values.
"""

import torch

GROUP = 32  # columns per group for the two-stage top-k


def knn(queries, keys=None, k=20, metric="cosine", exclude_self=True, chunk_size=None, memory_mb=256):
    """Exact k-NN. Returns (scores [N, k], indices [N, k]) on the queries' device.

    queries: [N, D] tensor (any float dtype; computed in float32). keys: [M, D] or None to search the queries
    themselves, in which case `exclude_self` drops each point's own index (by index, so a duplicate image is still
    a neighbour). metric: "cosine" (similarity, descending), "ip" (inner product, descending) or "l2" (squared
    Euclidean distance, ascending). Ties go to the lower index. chunk_size: query rows per block; by default it is
    derived from `memory_mb`, the budget for one block of scores.
    """
    if metric not in ("cosine", "ip", "l2"):
        raise ValueError(f"knn: unknown metric {metric!r}; use 'cosine', 'ip' or 'l2'.")
    self_search = keys is None
    keys = queries if self_search else keys
    for name, x in (("queries", queries), ("keys", keys)):
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"knn: {name} must be a non-empty 2-D tensor [num_points, dim], got {shape}.")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"knn: queries have dimension {queries.shape[1]} but keys have {keys.shape[1]}.")
    excluding = self_search and exclude_self
    available = keys.shape[0] - int(excluding)
    if not 1 <= k <= available:
        raise ValueError(f"knn: k={k} but only {available} candidate neighbours exist "
                         f"({keys.shape[0]} keys{', self excluded' if excluding else ''}); choose 1 <= k <= {available}.")
    queries, keys = queries.detach().float(), keys.detach().float()  # fp32 accumulation even for half inputs
    for name, x in (("queries", queries), ("keys", keys)):
        if not torch.isfinite(x).all():
            raise ValueError(f"knn: {name} contain NaN or infinite values.")

    if metric == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=1)
        keys = queries if self_search else torch.nn.functional.normalize(keys, dim=1)
    num_keys, device = keys.shape[0], keys.device
    # Every metric becomes "largest score first": for l2, ||q - x||^2 = ||q||^2 - (2 q.x - ||x||^2), and ||q||^2 is
    # constant per row, so we rank by 2 q.x - ||x||^2 and add ||q||^2 back at the end.
    key_sq_norms = keys.pow(2).sum(1) if metric == "l2" else None
    # Pad the keys to whole groups; the padded columns' scores are set to -inf so they are never chosen.
    padded = -(-num_keys // GROUP) * GROUP
    keys = torch.cat([keys, keys.new_zeros(padded - num_keys, keys.shape[1])])

    if chunk_size is None:
        chunk_size = max(1, min(4096, memory_mb * 2**20 // (4 * padded)))
    chunk_size = min(chunk_size, queries.shape[0])
    # One buffer for every block: a fresh 256 MB allocation per block would cost page faults and zeroing each time.
    buffer = torch.empty(chunk_size, padded, device=device)
    all_scores, all_indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        rows = queries[start:start + chunk_size]                            # [R, D]
        block = torch.mm(rows, keys.T, out=buffer[:rows.shape[0]])          # [R, M_padded]
        if metric == "l2":
            block[:, :num_keys].mul_(2).sub_(key_sq_norms)
        block[:, num_keys:] = float("-inf")
        if excluding:
            own = torch.arange(start, start + rows.shape[0], device=device)
            block[own - start, own] = float("-inf")
        scores, indices = _topk_block(block, k)
        if metric == "l2":
            scores = (rows.pow(2).sum(1, keepdim=True) - scores).clamp_min(0)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _topk_block(block, k):
    """Top-k of each row of block [R, M] (M a multiple of GROUP), ties to the lower index. -> (values, indices) [R, k]."""
    num_rows, width = block.shape
    num_groups = width // GROUP
    if num_groups <= k:  # too few groups for the two-stage search to pay: sort whole rows
        return _stable_topk(block, k)
    group_max = block.view(num_rows, num_groups, GROUP).amax(2)            # [R, M/G]
    top_group_vals, top_groups = group_max.topk(k + 1, dim=1)               # [R, k+1]
    # Groups in ascending order, so candidate columns are in ascending index order.
    groups = top_groups[:, :k].sort(1).values                               # [R, k]
    cand_cols = (groups[:, :, None] * GROUP + torch.arange(GROUP, device=block.device)).flatten(1)  # [R, k*G]
    cand_vals = block.gather(1, cand_cols)                                  # [R, k*G]
    vals, pos = cand_vals.topk(k + 1, dim=1)                                # [R, k+1], sorted descending
    # A tie at the k-th place (between groups or between candidates) leaves the choice to topk: redo those rows.
    tied = (top_group_vals[:, k - 1] == top_group_vals[:, k]) | (vals[:, k - 1] == vals[:, k])
    vals, cols = vals[:, :k], cand_cols.gather(1, pos[:, :k])
    vals, cols = _order(vals, cols)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        vals[rows], cols[rows] = _stable_topk(block[rows], k)
    return vals, cols


def _stable_topk(block, k):
    vals, cols = block.sort(dim=1, descending=True, stable=True)  # stable: equal values keep ascending column order
    return vals[:, :k], cols[:, :k]


def _order(vals, cols):
    """Sort each row by (value descending, index ascending)."""
    cols, perm = cols.sort(1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, cols.gather(1, perm)
