"""Exact, deterministic 1-D k-means (optimal partition by dynamic programming).

In one dimension an optimal k-means partition consists of contiguous runs of the sorted values,
so the global optimum of the within-cluster sum of squares is found exactly by dynamic
programming over the sorted values (Wang & Song, *Ckmeans.1d.dp*, R Journal 2011), in
``O(k n^2)`` time. There is no random initialisation: the result depends only on the input.
Ties (equal costs) are broken towards the earliest split, values that compare equal keep their
input order, so the output is fully deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["kmeans_1d"]


def kmeans_1d(values: Sequence[float], k: int) -> tuple[list[int], list[float]]:
    """Optimal k-means of 1-D ``values`` into ``k`` clusters.

    :returns: ``(labels, centroids)``: ``labels[i]`` is the cluster of ``values[i]``; clusters
        are numbered by increasing centroid; ``centroids[j]`` is the mean of cluster ``j``.
    :raises ValueError: ``k < 1``, ``k > len(values)`` or a non-finite value.
    """
    xs_in = [float(v) for v in values]
    n = len(xs_in)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"kmeans_1d: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"kmeans_1d: need 1 <= k <= len(values) = {n}, got k = {k}")
    if not all(math.isfinite(v) for v in xs_in):
        raise ValueError(f"kmeans_1d: values must be finite, got {xs_in}")
    order = sorted(range(n), key=lambda i: (xs_in[i], i))
    xs = [xs_in[i] for i in order]

    # cost[i][j] = sum of squared deviations of xs[i:j] from their mean (Welford, stable)
    cost = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        mean = 0.0
        m2 = 0.0
        for j in range(i, n):
            cnt = j - i + 1
            delta = xs[j] - mean
            mean += delta / cnt
            m2 += delta * (xs[j] - mean)
            cost[i][j + 1] = max(m2, 0.0)

    inf = math.inf
    # best[m][j]: minimal cost of xs[:j] in m clusters; arg[m][j]: start of the last cluster
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for m in range(1, k + 1):
        for j in range(m, n - (k - m) + 1):
            b, a = inf, m - 1
            for i in range(m - 1, j):
                c = best[m - 1][i] + cost[i][j]
                if c < b:
                    b, a = c, i
            best[m][j] = b
            arg[m][j] = a

    bounds = []
    j = n
    for m in range(k, 0, -1):
        i = arg[m][j]
        bounds.append((i, j))
        j = i
    bounds.reverse()

    labels = [0] * n
    centroids = []
    for c, (i, j) in enumerate(bounds):
        centroids.append(math.fsum(xs[i:j]) / (j - i))
        for pos in range(i, j):
            labels[order[pos]] = c
    return labels, centroids
