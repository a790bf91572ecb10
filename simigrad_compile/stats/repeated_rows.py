"""Parameters whose gradient one backward pass sums over several backward nodes.

A compiled graph called twice in one forward, or one parameter used by two compiled graphs (tied weights across
a graph break), gives the parameter one gradient from each backward node: ``g = g(1) + g(2)``, each node with
its own halves. Each node records its own ``(g1(k).g2(k), |g1(k)|^2, |g2(k)|^2)``; their sum misses the cross
terms ``g1(1).g2(2) + g1(2).g2(1)`` (and ``2 g1(1).g1(2)`` in the norms), which no node sees. So such a
parameter's rows are not its statistics: the read leaves them out and names the parameter in ``unsplit``, and the
runtime then takes the ``microsteps`` statistics, as for any parameter the split pass left whole.

Backward passes are told apart by autograd's graph-task id: two ``backward()`` calls (accumulation, or
``retain_graph``) add their statistics, as documented for :func:`~.gradient_stats.gradient_stats`.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Optional, Sequence, Set, Tuple

REASON = ("its gradient sums several backward nodes of one backward pass (a compiled graph called twice, or a "
          "parameter shared by graphs that a graph break separates): the statistics of that sum need cross terms "
          "no node sees. Fix: remove the graph break between the uses (torch._dynamo.explain names it), compile "
          "with fullgraph=True, or use group_mode='microsteps'")

Add = Tuple[int, Optional[Tuple[int, ...]]]
"""One :meth:`Sink.add` inside a backward pass: ``(graph task id, rows)``, rows None for every row."""


def repeated_parameters(entries: Iterable[Tuple[int, Sequence[Add], Dict[int, Tuple[int, ...]]]]) -> Set[int]:
    """The ids of the parameters that received rows more than once within one backward pass.

    ``entries``: per sink, ``(number of rows, its adds since the reset, row -> parameter ids)``."""
    seen: Counter = Counter()
    for n_rows, adds, ids_of in entries:
        for task, rows in adds:
            for row in range(n_rows) if rows is None else rows:
                for pid in ids_of.get(row, ()):
                    seen[pid, task] += 1
    return {pid for (pid, _), count in seen.items() if count > 1}
