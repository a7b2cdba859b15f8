"""Best-fit-decreasing packing of variable-length examples into rows of bounded length.

Rows are capped at ``capacity`` tokens (normally ``max_seq_len``) because with a dense-mask
attention kernel (sdpa, eager) attention cost grows with the square of the row length: one long
row of many examples is slower than several short ones.
"""

from __future__ import annotations

import bisect


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows whose summed length is at most ``capacity`` tokens.

    Best-fit decreasing (Johnson 1973): longest first, each into the fullest row it still fits.
    O(n log n) using a sorted list of remaining capacities.

    Args:
        lengths: tokens per example.
        capacity: tokens per row.

    Returns:
        Rows as lists of indices into ``lengths``, each row's examples in decreasing length.

    Raises:
        ValueError: an example is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining tokens, row id), sorted ascending
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, row_id = free.pop(pos)
            rows[row_id].append(i)
            bisect.insort(free, (remaining - n, row_id))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows
