"""Clustering metrics for unsupervised image classification (algorithm-free, shared).

Everything is computed from the contingency table with numpy/scipy only, so the functions can be pasted
into any codebase. Inputs may be numpy arrays, lists or torch tensors (moved to the CPU).

- cluster_acc:      Hungarian one-to-one matching of clusters to classes (SCAN, DeepCluster, ProFeat tables).
- overcluster_acc:  many-to-one majority vote, SCAN's overclustering protocol (report it with K).
- nmi, ari:         equal to scikit-learn's normalized_mutual_info_score (arithmetic) / adjusted_rand_score.
- topk_acc:         clusters remapped by the Hungarian match, then top-k (SCAN's top-5).
- neighbor_acc:     share of mined neighbours with the anchor's label (SCAN, Sec. 3.1 of the paper).
- neighbor_agreement: share of one k-NN graph's neighbours that another graph shares (e.g. pretext vs pixels).
- pixel_check:      do a mined graph's neighbours beat the raw pixels' own (scan.py's check after mining; searches
                    with knn.py, so torch tensors in)?
- ratio_edge_intra_class: k-NN graph quality of Caron's thesis (Sec. 4.1), mean over classes.
- evaluate, report:  all of the above for one clustering; report() adds the confusion table as text.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_labels(x):
    """Any 1-D label container -> int64 numpy array."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {x.shape}")
    return x.astype(np.int64, copy=False)


def _contingency(a, b):
    """Counts table [n_distinct(a), n_distinct(b)] over the values that occur (not over 0..max)."""
    a, b = _as_labels(a), _as_labels(b)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.shape[0]} vs {b.shape[0]}")
    _, a_idx = np.unique(a, return_inverse=True)
    _, b_idx = np.unique(b, return_inverse=True)
    n_a, n_b = (a_idx.max() + 1, b_idx.max() + 1) if a.size else (0, 0)
    table = np.bincount(a_idx * n_b + b_idx, minlength=n_a * n_b).reshape(n_a, n_b)
    return table


def _hungarian_map(pred, target):
    """Cluster id -> class id for the one-to-one match maximising agreement; unmatched clusters -> -1."""
    pred, target = _as_labels(pred), _as_labels(target)
    clusters, classes = np.unique(pred), np.unique(target)
    table = _contingency(pred, target)  # [K, C]
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = {int(c): -1 for c in clusters}
    mapping.update({int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)})
    return mapping


def cluster_acc(pred, target):
    """Accuracy under the best one-to-one cluster -> class map (rectangular when K != C: extra clusters are errors)."""
    table = _contingency(pred, target)
    if table.size == 0:
        raise ValueError("cluster_acc needs at least one sample")
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def overcluster_acc(pred, target):
    """Accuracy when every cluster is labelled with its majority class (many-to-one)."""
    table = _contingency(pred, target)
    if table.size == 0:
        raise ValueError("overcluster_acc needs at least one sample")
    return float(table.max(axis=1).sum() / table.sum())


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a, b):
    """Normalised mutual information, I(a; b) / ((H(a) + H(b)) / 2), natural log (scikit-learn's default)."""
    table = _contingency(a, b).astype(np.float64)
    if table.shape[0] == table.shape[1] == 1 or table.size == 0:
        return 1.0  # both labelings put everything in one group: identical partitions
    n = table.sum()
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * (np.log(table[nz] * n) - np.log(outer[nz]))).sum())
    if mi <= 0.0:
        return 0.0
    return mi / ((_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2.0)


def ari(a, b):
    """Adjusted Rand index from the pair-counting table (exact integer arithmetic, then one float division)."""
    table = _contingency(a, b).astype(np.int64)
    n = int(table.sum())
    sum_sq = int((table.astype(object) ** 2).sum())
    # pairs (ordered) in the same group in both / only in a / only in b / in neither
    same_both = sum_sq - n
    same_a = int((table.sum(1).astype(object) ** 2).sum()) - sum_sq
    same_b = int((table.sum(0).astype(object) ** 2).sum()) - sum_sq
    neither = n * n - same_a - same_b - sum_sq
    if same_a == 0 and same_b == 0:
        return 1.0  # identical partitions (including all-singletons and one group)
    num = 2 * (same_both * neither - same_a * same_b)
    den = (same_both + same_a) * (same_a + neither) + (same_both + same_b) * (same_b + neither)
    return float(num / den)


def topk_acc(probs, target, k=5):
    """Top-k accuracy after mapping each cluster to its Hungarian-matched class. probs: [N, K]."""
    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    probs, target = np.asarray(probs), _as_labels(target)
    k = min(k, probs.shape[1])
    mapping = _hungarian_map(probs.argmax(1), target)
    lut = np.full(probs.shape[1], -1, dtype=np.int64)  # cluster -> class, -1 for unmatched
    for cluster, cls in mapping.items():
        lut[cluster] = cls
    top_clusters = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # [N, k]
    return float((lut[top_clusters] == target[:, None]).any(1).mean())


def confusion(pred, target, num_clusters=None, num_classes=None):
    """Counts [num_clusters, num_classes]: row = predicted cluster, column = true class."""
    pred, target = _as_labels(pred), _as_labels(target)
    num_clusters = num_clusters or int(pred.max()) + 1
    num_classes = num_classes or int(target.max()) + 1
    return np.bincount(pred * num_classes + target, minlength=num_clusters * num_classes).reshape(
        num_clusters, num_classes)


def evaluate(pred, target, probs=None):
    """All the headline numbers: acc, nmi, ari (+ top5 with probs, + acc_overcluster when K > C), K, n.

    Samples whose target is negative (unknown label) are ignored for the label-based scores.
    K counts the non-empty clusters, so a degenerate clustering shows up as K=1.
    """
    pred, target = _as_labels(pred), _as_labels(target)
    known = target >= 0
    out = {"K": int(np.unique(pred).size), "n": int(known.sum())}
    if not known.any():
        return out
    pred_k, target_k = pred[known], target[known]
    out.update(acc=cluster_acc(pred_k, target_k), nmi=nmi(pred_k, target_k), ari=ari(pred_k, target_k))
    if out["K"] > np.unique(target_k).size:
        out["acc_overcluster"] = overcluster_acc(pred_k, target_k)
    if probs is not None:
        probs = probs.detach().float().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
        out["top5"] = topk_acc(probs[known], target_k, k=5)
    return out


def report(probs, target, classes, title, max_rows=30):
    """evaluate() of the clustering probs [N, K] (argmax = cluster) plus num_clusters = K, and the text a script
    prints: the numbers and the confusion table (a row per cluster, a column per class). Returns (dict, text)."""
    probs = probs.detach().float().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    pred, target = probs.argmax(1), _as_labels(target)
    res = {"num_clusters": probs.shape[1], **evaluate(pred, target, probs)}
    lines = [f"== {title}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in res.items())]
    if res["K"] < probs.shape[1]:                                              # said, not only counted
        lines.append(f"WARNING: {probs.shape[1] - res['K']} of the {probs.shape[1]} clusters hold none of these "
                     f"{len(pred)} images (scan.py, profeat.py: a larger --entropy-weight spreads them).")
    known = target >= 0
    if known.any():
        table = confusion(pred[known], target[known], probs.shape[1], max(len(classes), int(target.max()) + 1))
        lines.append("cluster " + " ".join(f"{str(c)[:6]:>6}" for c in classes[:table.shape[1]]))
        lines += [f"{i:>7} " + " ".join(f"{v:>6d}" for v in row) for i, row in enumerate(table[:max_rows])]
    return res, "\n".join(lines)


def neighbor_acc(indices, labels, anchors=None):
    """Share of neighbours that carry their anchor's label. indices: [A, k] into labels: [N]; row i holds the
    neighbours of image anchors[i] (default: of image i). Anchors with an unknown label (-1) are skipped."""
    indices, labels = np.asarray(_to_numpy(indices)), _as_labels(labels)
    anchor_labels = labels if anchors is None else labels[_as_labels(anchors)]
    known = anchor_labels >= 0
    return float((labels[indices[known]] == anchor_labels[known, None]).mean())


def neighbor_agreement(indices_a, indices_b):
    """Share of the neighbours in indices_a [A, k] that are also among indices_b [A, k'] of the same row: how much
    two neighbour graphs of the same images agree (1: the same neighbours)."""
    a, b = np.asarray(_to_numpy(indices_a)), np.asarray(_to_numpy(indices_b))
    return float((a[:, :, None] == b[:, None, :]).any(2).mean())


def pixel_check(neighbor_idx, pixels, labels, anchors, pretext_z=None):
    """Do the mined neighbours know more than the pixels? neighbor_idx [N, K]: the mined graph; pixels [N, D]: the raw
    pixels as vectors; labels [N] (-1: unknown); anchors [A]: the sample of images checked; pretext_z [N, d]: the
    pretext's features when the graph was mined on them and the pixels together (--mine-pixels); scan.py gives both
    as it searches them (whitened unless --no-whiten), so neither is compared in a space it is not mined in. Gives
    the share of the mined neighbours that are also the pixels' cosine neighbours and, with labels, the neighbour
    accuracy of each graph at top-5 and top-K. Returns (info, lines to print): SCAN learns to agree with its
    neighbours, so where the pixels' are purer, expect it to do no better than clustering the pixels, and a line
    says so."""
    from knn import knn  # the one function here that searches (torch tensors); the module stays numpy/scipy
    K, anchors, labels = neighbor_idx.shape[1], anchors.cpu(), labels.cpu()

    def others(z):  # [N, D] -> the K nearest other images of each anchor by cosine, [A, K]
        idx = knn(z[anchors.to(z.device)], z, k=K + 1, exclude_self=False)[1].cpu()   # [A, K + 1]
        return idx.gather(1, (idx == anchors[:, None]).int().argsort(dim=1, stable=True)[:, :K])
    found = {"mined": neighbor_idx[anchors.to(neighbor_idx.device)].cpu(),
             **({"pretext": others(pretext_z)} if pretext_z is not None else {}), "raw pixels": others(pixels)}
    names = {"mined": ("", "pretext + pixels" if pretext_z is not None else "pretext"),   # (info key, printed)
             "pretext": ("pretext_", "pretext"), "raw pixels": ("pixel_", "raw pixels")}
    info = {"pixel_agreement": neighbor_agreement(found["mined"], found["raw pixels"])}
    lines = [f"{100 * info['pixel_agreement']:.0f}% of the {K} mined neighbours are also the raw pixels' (over "
             f"{len(anchors)} images)"]
    if (labels >= 0).all():
        for k in sorted({5, K}):
            acc = {name: neighbor_acc(idx[:, :k], labels, anchors) for name, idx in found.items()}
            info.update({f"{names[name][0]}neighbor_acc_top{k}": a for name, a in acc.items()})
            lines.append(f"top-{k} neighbours with the anchor's label: " + ", ".join(
                f"{names[name][1]} {a:.3f}" for name, a in acc.items()))
        if acc.get("pretext", acc["mined"]) < acc["raw pixels"]:
            lines.append("WARNING: the pretext's neighbours are less pure than the raw pixels'. SCAN learns to agree "
                         "with its neighbours, so a longer pretext (--pretext-epochs) or another augmentation would "
                         "help more than a longer SCAN stage" + ("." if pretext_z is not None else
                                                                 ", and --mine-pixels would mine on both."))
    return info, lines


def ratio_edge_intra_class(indices, labels):
    """Caron's thesis Sec. 4.1: per class C_k, #{edges (i, j): i, j in C_k} / #{edges (i, j): i in C_k}, mean over
    the classes."""
    indices, labels = np.asarray(_to_numpy(indices)), _as_labels(labels)
    known = labels >= 0
    same = (labels[indices[known]] == labels[known, None]).mean(1)  # [N_known] intra-class share per node
    classes, inverse = np.unique(labels[known], return_inverse=True)
    per_class = np.bincount(inverse, weights=same) / np.bincount(inverse)  # every node has k edges
    return float(per_class.mean())


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
