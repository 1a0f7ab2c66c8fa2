"""Exact k-nearest-neighbour search by blocked matrix multiplication (algorithm-free, shared).

SCAN mines its neighbours with it (Sec. 3.1 of the SCAN paper), DeepCluster builds PIC's 5-NN graph and the
10-NN graph behind the "ratio edge intra-class" (Caron's thesis, Sec. 2.4 and 4.1), and the scripts use it for
weighted k-NN monitors. One function, any device, bounded memory, exact:

    scores, indices = knn(features, k=20)                  # each row's 20 most similar rows, itself excluded
    dist, idx = knn(test_feats, train_feats, k=5, metric="l2")

Nearly all the time is the matrix product, so two things matter:

1. Self-search computes each pair once. Similarity is symmetric, so a block of rows is multiplied only with the
   columns from its own first row on (the upper triangle, half the product). A row block then gives each of its rows
   the top-k over those columns (the "row side"), and every later column a few candidates from these rows (the
   "column side"). Blocks are taken last to first, so each later column already holds a running k-th best score
   tau from its own row side: only entries >= tau can enter its list. Columns whose group of rows has a maximum
   below tau are skipped without looking at them. Over the whole search about k * N entries pass this test,
   which is how many times a list changes when its keys arrive in random order.
2. The top-k of a row is taken without a `topk` over the whole row: the row is cut into groups of G consecutive
   columns, and the k best entries lie in the k groups with the largest maxima (an entry in another group has k
   groups ahead of it, each holding a larger or equal entry at a lower index). So one cheap `amax` pass, a `topk`
   over M/G group maxima and a `topk` over the k*G candidates replace a `topk` over M entries.

Ties go to the lower index everywhere; rows with a tie exactly at the k-th place are redone with a stable sort, so
the answer never depends on how `topk` orders equal values.
"""

import torch

GROUP = 32      # columns per group for the row-side top-k
ROW_GROUP = 8   # rows per group for the column-side threshold test
TILE = 2048     # columns multiplied at once in self-search: a tile of a block stays in the cache


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
    if metric == "l2":
        # Every metric becomes "largest score first" inside one product: with q' = [q, -|q|^2/2, -1/2] and
        # x' = [x, 1, |x|^2], q'.x' = q.x - |q|^2/2 - |x|^2/2 = -|q - x|^2 / 2 (symmetric in q and x).
        def augment(x, norm_col, one_col):
            sq = x.pow(2).sum(1, keepdim=True)
            return torch.cat([x, norm_col(sq), one_col(sq)], 1)
        rows = augment(queries, lambda sq: -sq / 2, lambda sq: torch.full_like(sq, -0.5))
        cols = augment(keys, torch.ones_like, lambda sq: sq)
    else:
        rows, cols = queries, keys
    # Pad the keys to whole groups; the padded columns' scores are set to -inf so they are never chosen.
    num_keys = keys.shape[0]
    padded = -(-num_keys // GROUP) * GROUP
    cols = torch.cat([cols, cols.new_zeros(padded - num_keys, cols.shape[1])])
    if chunk_size is None:
        chunk_size = max(1, min(4096, memory_mb * 2**20 // (4 * padded)))
    if self_search:
        scores, indices = _search_self(rows, cols, k, num_keys, excluding, chunk_size)
    else:
        scores, indices = _search(rows, cols, k, num_keys, chunk_size)
    return ((-2 * scores).clamp_min(0) if metric == "l2" else scores), indices


def _search(rows, cols, k, num_keys, chunk_size):
    """Top-k columns of every row of rows @ cols.T, one block of rows at a time."""
    buffer = torch.empty(min(chunk_size, rows.shape[0]), cols.shape[0], device=rows.device)  # reused by every block
    all_scores, all_indices = [], []
    for start in range(0, rows.shape[0], chunk_size):
        block_rows = rows[start:start + chunk_size]
        block = torch.mm(block_rows, cols.T, out=buffer[:len(block_rows)])   # [R, M_padded]
        block[:, num_keys:] = float("-inf")
        scores, indices = _topk_block(block, k)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _search_self(rows, cols, k, num_points, excluding, chunk_size):
    """Self-search over the upper triangle of rows @ cols.T; see the module docstring (1)."""
    device, padded = cols.device, cols.shape[0]
    chunk = max(GROUP, chunk_size // GROUP * GROUP)  # whole groups: blocks start on group and row-group boundaries
    best_vals = torch.full((padded, k), float("-inf"), device=device)      # running top-k of every point
    best_idx = torch.full((padded, k), padded, dtype=torch.long, device=device)
    # Two buffers reused by every block: fresh large allocations would cost page faults each time.
    buffer = torch.empty(chunk * padded, device=device)
    col_buffer = torch.empty(chunk // ROW_GROUP * padded, device=device)
    for start in reversed(range(0, num_points, chunk)):
        stop = min(start + chunk, num_points)
        num_rows, width = stop - start, padded - start                      # columns start..M of the upper triangle
        block = buffer[:num_rows * width].view(num_rows, width)             # [R, W]
        column_side = stop < num_points                                     # (then R is a multiple of ROW_GROUP)
        col_max = col_buffer[:num_rows // ROW_GROUP * width].view(-1, width) if column_side else None  # [R/G, W]
        # The product tile by tile, each tile's row-group maxima taken while it is still in the cache.
        for c0 in range(0, width, TILE):
            c1 = min(c0 + TILE, width)
            tile = block[:, c0:c1]
            torch.mm(rows[start:stop], cols[start + c0:start + c1].T, out=tile)
            tile[:, max(0, num_points - start - c0):] = float("-inf")       # padded columns
            if excluding and c0 < num_rows:                                  # each point's own column
                own = torch.arange(c0, min(c1, num_rows), device=device)
                tile[own, own - c0] = float("-inf")
            if column_side:
                torch.amax(tile.unflatten(0, (-1, ROW_GROUP)), 1, out=col_max[:, c0:c1])
        # Row side: rows start..stop have seen no column yet (blocks run last to first), so this is their list.
        top = min(k, width)
        vals, idx = _topk_block(block, top)
        best_vals[start:stop, :top], best_idx[start:stop, :top] = vals, idx + start
        if not column_side:
            continue
        # Column side: the real columns after this block get the entries that reach their running k-th best.
        tau = best_vals[stop:num_points, k - 1]                             # [C]
        group, col = (col_max[:, num_rows:num_points - start] >= tau).nonzero(as_tuple=True)  # [F] groups to read
        cand_vals = block.view(-1, ROW_GROUP, width)[group, :, col + num_rows]  # [F, ROW_GROUP]
        f, r = (cand_vals >= tau[col, None]).nonzero(as_tuple=True)         # per column: rows ascending
        _insert(best_vals, best_idx, col[f] + stop, cand_vals[f, r], group[f] * ROW_GROUP + r + start)
    return best_vals[:num_points], best_idx[:num_points]


def _insert(best_vals, best_idx, points, vals, idx):
    """Insert candidates (point, score, neighbour index) into the sorted lists best_* [P, k], in place.

    Order: score descending, then index ascending. Each candidate's place is the number of list entries ahead of it
    plus the number of the point's other candidates ahead of it; each old entry moves down by the number of
    candidates ahead of it. Entries pushed past k fall off. Counting, no sort of the lists.
    """
    if len(points) == 0:
        return
    k = best_vals.shape[1]
    # Sort by (point, score descending); a stable sort keeps the callers' ascending index order among equal scores.
    order = torch.argsort(points * 2**32 + _descending_key(vals), stable=True)
    points, vals, idx = points[order], vals[order], idx[order]
    touched, slot = torch.unique_consecutive(points, return_inverse=True)   # [U], candidate -> its list
    old_vals, old_idx = best_vals[touched], best_idx[touched]               # [U, k]
    ahead = (old_vals[slot] > vals[:, None]) | ((old_vals[slot] == vals[:, None]) & (old_idx[slot] < idx[:, None]))
    ahead = ahead.sum(1)                                                    # [C] old entries ahead: they are 0..a-1
    first = torch.searchsorted(slot, torch.arange(len(touched), device=slot.device))   # each list's first candidate
    rank = torch.arange(len(points), device=points.device) - first[slot]   # place among the point's candidates
    new_pos = ahead + rank                                                  # [C]
    # old entry p moves down by the number of candidates with a <= p (those are ahead of it)
    count = torch.zeros(len(touched), k + 1, dtype=torch.long, device=points.device)
    count.index_put_((slot, ahead), torch.ones_like(ahead), accumulate=True)
    old_pos = torch.arange(k, device=points.device) + count[:, :k].cumsum(1)  # [U, k]
    # Write both into lists one longer than k; the spare last column collects what falls off.
    merged_vals, merged_idx = old_vals.new_empty(len(touched), k + 1), old_idx.new_empty(len(touched), k + 1)
    merged_vals.scatter_(1, old_pos.clamp_max(k), old_vals)
    merged_idx.scatter_(1, old_pos.clamp_max(k), old_idx)
    merged_vals[slot, new_pos.clamp_max(k)], merged_idx[slot, new_pos.clamp_max(k)] = vals, idx
    best_vals[touched], best_idx[touched] = merged_vals[:, :k], merged_idx[:, :k]


def _descending_key(vals):
    """int64 keys in [0, 2^32) whose ascending order is the descending order of float32 vals."""
    bits = (vals + 0.0).view(torch.int32).long()                            # + 0.0 turns -0.0 into 0.0
    ascending = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)             # float order as integer order
    return 2**31 - 1 - ascending


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
