"""Exact k-nearest-neighbour search by blocked matrix multiplication (algorithm-free, shared).

SCAN mines its neighbours with it (Sec. 3.1 of the SCAN paper), DeepCluster builds PIC's 5-NN graph and the
10-NN graph behind the "ratio edge intra-class" (Caron's thesis, Sec. 2.4 and 4.1), and the scripts use it for
weighted k-NN monitors. One search function, any device, bounded memory, exact, and a PCA whitening to apply
before it:

    scores, indices = knn(features, k=20)                  # each row's 20 most similar rows, itself excluded
    dist, idx = knn(test_feats, train_feats, k=5, metric="l2")
    whiten = whitening(features); knn(whiten(features))   # on whitened features
    knn(search_space(features, pixels))                     # and the raw pixels beside them, as scan.py mines

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

3. `distributed=True` under torch.distributed: each rank passes all the points, computes a share and gets one
   process's answer, bit for bit. Separate keys: the ranks split the queries, then all_gather. Self-search: W ranges
   of rows with equal parts of the triangle (near N (1 - sqrt(1 - r/W))); a rank searches its range's own triangle
   as in (1), then all LATER points (rows: their row side is their top-k within the range) against the range
   (columns: the column side updates the range's lists). Each pair is computed once, nothing is exchanged until the
   ranks all_gather their lists [N, k], and each point keeps the best k of its W * k candidates. Ranges are whole
   blocks of one process's search, so every score is rounded alike (BLAS rounds products of 1-3 rows differently).
"""

import torch

GROUP = 32      # columns per group for the row-side top-k
ROW_GROUP = 8   # rows per group for the column-side threshold test
TILE = 2048     # columns multiplied at once in self-search: a tile of a block stays in the cache


def knn(queries, keys=None, k=20, metric="cosine", exclude_self=True, chunk_size=None, memory_mb=256,
        distributed=False):
    """Exact k-NN. Returns (scores [N, k], indices [N, k]) on the queries' device.

    queries: [N, D] tensor (any float dtype; computed in float32). keys: [M, D] or None to search the queries
    themselves, in which case `exclude_self` drops each point's own index (by index, so a duplicate image is still
    a neighbour). metric: "cosine" (similarity, descending), "ip" (inner product, descending) or "l2" (squared
    Euclidean distance, ascending). Ties go to the lower index. chunk_size: query rows per block; by default it is
    derived from `memory_mb`, the budget for one block of scores. distributed: under an initialised torch.distributed
    process group, share the work between the ranks, which must all pass the same inputs; see the module docstring (3).
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
        raise ValueError(f"knn: k={k} but only {available} candidate neighbours exist ({keys.shape[0]} keys"
                         f"{', self excluded' if excluding else ''}); choose 1 <= k <= {available}.")
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
        q_sq, x_sq = queries.pow(2).sum(1, keepdim=True), keys.pow(2).sum(1, keepdim=True)   # [N, 1], [M, 1]
        rows = torch.cat([queries, -q_sq / 2, torch.full_like(q_sq, -0.5)], 1)
        cols = torch.cat([keys, torch.ones_like(x_sq), x_sq], 1)
    else:
        rows, cols = queries, keys
    # Pad the keys to whole groups; the padded columns' scores are set to -inf so they are never chosen.
    num_keys = keys.shape[0]
    padded = -(-num_keys // GROUP) * GROUP
    cols = torch.cat([cols, cols.new_zeros(padded - num_keys, cols.shape[1])])
    if chunk_size is None:
        chunk_size = max(1, min(4096, memory_mb * 2**20 // (4 * padded)))
    dist = torch.distributed
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if self_search:
        chunk = max(GROUP, chunk_size // GROUP * GROUP)  # whole groups: blocks start on group and row-group boundaries
        lo, hi = _bounds(num_keys, world, chunk, triangle=True)[rank:rank + 2]   # this rank's range
        best_vals = torch.full((padded, k), float("-inf"), device=cols.device)  # running top-k of every point
        best_idx = torch.full((padded, k), padded, dtype=torch.long, device=cols.device)
        _search_self(rows, cols, best_vals, best_idx, lo, hi, excluding, chunk)  # the range's triangle (all if W=1)
        if world > 1 and lo < hi:
            _search_self(rows, cols, best_vals, best_idx, lo, hi, False, chunk, later=num_keys)
        scores, indices = _merge(best_vals[:num_keys], best_idx[:num_keys], world)
    else:
        bounds = _bounds(len(rows), world, chunk_size)
        scores, indices = _search(rows[bounds[rank]:bounds[rank + 1]], cols, k, num_keys, chunk_size)  # [N_rank, k]
        if world > 1:
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            scores, indices = _gather(scores, sizes), _gather(indices, sizes)
    return ((-2 * scores).clamp_min(0) if metric == "l2" else scores), indices


def whitening(x, eps=None):
    """PCA whitening fitted on the rows of x [N, d]: f(z) = normalize((z - mean) @ V (Lambda + eps lambda_max)^-1/2),
    V, Lambda the eigenvectors and eigenvalues of x's covariance. Cosine neighbours then weigh every direction of
    variation alike, not the few largest (brightness, size, pose): H. Jegou, O. Chum, "Negative evidences and
    co-occurences in image retrieval: the benefit of PCA and whitening", ECCV 2012, https://hal.inria.fr/hal-00722622.
    eps keeps directions of little variance from being blown up; default d / N: with fewer rows per dimension a
    small eigenvalue is likelier noise. The eigh runs on the CPU in float64."""
    eps = x.shape[1] / x.shape[0] if eps is None else eps
    mean = x.float().mean(0)                                                   # [d]
    centered = x.float() - mean
    eigval, eigvec = torch.linalg.eigh((centered.T @ centered).cpu().double() / len(x))   # ascending [d], [d, d]
    eigval = eigval.clamp(min=0)
    scale = (eigvec / (eigval + eps * eigval.max()).sqrt()).float().to(x.device)          # [d, d]
    return lambda z: torch.nn.functional.normalize((z.float() - mean) @ scale, dim=1)


def search_space(z, pixels=None, whiten=True):
    """The space scan.py and profeat.py mine neighbours in: features z [N, d], PCA-whitened (whitening) unless whiten
    is False, and with pixels [N, D] (--mine-pixels) the raw pixels beside them, whitened alike. Each part is
    L2-normalised and the whole divided by sqrt(parts), so the cosine of two rows is the mean of the parts' cosines.
    Returns [N, d (+ D)], the features' part first."""
    parts = [torch.nn.functional.normalize(x.float(), dim=1) for x in ([z] if pixels is None else [z, pixels])]
    return torch.cat([whitening(x)(x) if whiten else x for x in parts], 1) / len(parts) ** 0.5   # [N, d (+ D)]


def _bounds(num_rows, world, step, triangle=False):
    """Boundaries of `world` contiguous ranges of rows 0..N on multiples of `step` (the single-process blocks):
    equal numbers of rows, or (triangle) equal parts of the upper triangle."""
    share = [1 - (1 - r / world) ** 0.5 if triangle else r / world for r in range(world)]
    return [min(num_rows, round(num_rows * s / step) * step) for s in share] + [num_rows]


def _gather(x, sizes):
    """all_gather of every rank's x [sizes[rank], ...] -> [sum(sizes), ...] in rank order (padded to the largest)."""
    x = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    torch.distributed.all_gather(parts, x)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _merge(best_vals, best_idx, world):
    """Each point's best k of the ranks' lists best_* [N, k] (their candidates are disjoint), gathered N / W points
    at a time so that the memory stays that of one list."""
    if world == 1:
        return best_vals, best_idx
    k, step, merged = best_vals.shape[1], -(-len(best_vals) // world), []
    for part in zip(best_vals.split(step), best_idx.split(step)):           # [n, k] each
        vals, idx = (_gather(x, [len(x)] * world).view(world, -1, k).transpose(0, 1).flatten(1) for x in part)
        merged.append([x[:, :k] for x in _order(vals, idx)])                # [n, W * k] -> [n, k]
    return [torch.cat(x) for x in zip(*merged)]


def _search(rows, cols, k, num_keys, chunk_size):
    """Top-k columns of every row of rows @ cols.T, one block of rows at a time."""
    buffer = torch.empty(min(chunk_size, rows.shape[0]), cols.shape[0], device=rows.device)  # reused by every block
    all_scores, all_indices = [rows.new_empty(0, k)], [rows.new_empty(0, k, dtype=torch.long)]  # (rows may be none)
    for start in range(0, rows.shape[0], chunk_size):
        block_rows = rows[start:start + chunk_size]
        block = torch.mm(block_rows, cols.T, out=buffer[:len(block_rows)])   # [R, M_padded]
        block[:, num_keys:] = float("-inf")
        scores, indices = _topk_block(block, k)
        all_scores.append(scores)
        all_indices.append(indices)
    return torch.cat(all_scores), torch.cat(all_indices)


def _search_self(rows, cols, best_vals, best_idx, lo, hi, excluding, chunk, later=None):
    """Self-search of the points lo..hi over the upper triangle of rows @ cols.T, into the lists best_* [M_padded, k];
    see the module docstring (1). With later=N, the points hi..N against the columns lo..hi instead (3): their rows
    are taken from `cols` and the columns from `rows`, so each score is the same sum of the same products as in one
    process's search (rows_i . cols_j, i < j)."""
    device, k = cols.device, best_vals.shape[1]
    a, b = (cols, rows) if later else (rows, cols)                          # row and column operands
    # Two buffers reused by every block: fresh large allocations would cost page faults each time.
    buffer = torch.empty(chunk * cols.shape[0], device=device)
    col_buffer = torch.empty(chunk // ROW_GROUP * cols.shape[0], device=device)
    for start in (range(hi, later, chunk) if later else reversed(range(lo, hi, chunk))):
        stop = min(start + chunk, len(a) if later else hi)                  # (later: to the padded end, whole groups)
        c0, first = (lo, lo) if later else (start, stop)                    # first column; first of the column side
        num_rows, width = stop - start, -(-(hi - c0) // GROUP) * GROUP      # columns c0..hi, padded to whole groups
        block = buffer[:num_rows * width].view(num_rows, width)             # [R, W]
        column_side = first < hi                                            # (then R is a multiple of ROW_GROUP)
        col_max = col_buffer[:num_rows // ROW_GROUP * width].view(-1, width) if column_side else None  # [R/G, W]
        # The product tile by tile, each tile's row-group maxima taken while it is still in the cache.
        for t0 in range(0, width, TILE):
            t1 = min(t0 + TILE, width)
            tile = block[:, t0:t1]
            torch.mm(a[start:stop], b[c0 + t0:c0 + t1].T, out=tile)
            tile[:, max(0, hi - c0 - t0):] = float("-inf")                  # padded columns, or past the range
            if later:
                tile[later - start:] = float("-inf")                        # padded rows
            if excluding and t0 < num_rows:                                  # each point's own column
                own = torch.arange(t0, min(t1, num_rows), device=device)
                tile[own, own - t0] = float("-inf")
            if column_side:
                torch.amax(tile.unflatten(0, (-1, ROW_GROUP)), 1, out=col_max[:, t0:t1])
        # Row side: rows start..stop have seen no column yet (blocks run last to first; later points have no list
        # on this rank), so this is their list.
        top = min(k, width)
        vals, idx = _topk_block(block, top)
        best_vals[start:stop, :top], best_idx[start:stop, :top] = vals, idx + c0
        if not column_side:
            continue
        # Column side: columns first..hi get the entries that reach their running k-th best.
        tau = best_vals[first:hi, k - 1]                                    # [C]
        group, col = (col_max[:, first - c0:hi - c0] >= tau).nonzero(as_tuple=True)  # [F] groups to read
        cand_vals = block.view(-1, ROW_GROUP, width)[group, :, col + first - c0]  # [F, ROW_GROUP]
        f, r = (cand_vals >= tau[col, None]).nonzero(as_tuple=True)         # per column: rows ascending
        _insert(best_vals, best_idx, col[f] + first, cand_vals[f, r], group[f] * ROW_GROUP + r + start)


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
    """Top-k of each row of block [R, M] (M a multiple of GROUP), ties to the lower index: (values, indices) [R, k]."""
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
