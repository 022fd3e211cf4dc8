"""``qdsl search``: the mixed-precision recipe for a size or speed budget (issue 21).

* ``candidates``: the ``--candidates`` text -> specs, parsed by the recipe grammar;
* ``units``: what the search decides (the linears reading one tensor, tied; the other
  activations) and each choice's exact storage;
* ``sensitivity``: a Fisher score per (unit, choice) from one backward per window batch,
  and the direct loss change of a sample of them;
* ``allocate``: the exact allocation (multiple-choice knapsack as an integer linear
  program, scipy's HiGHS);
* ``write``: the allocation as a readable recipe;
* ``measure``: the found recipe compiled and its loss measured as ``qdsl eval`` does;
* ``state``: the progress saved after every scored batch and check pair, for resuming;
* ``run``: the whole search.

Rank: the same as ``study`` (a client of the compiler and eval; neither imports the other).
"""
