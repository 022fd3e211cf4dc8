"""The reproduction of the seed papers, a client of the library: sweeps of recipes
(``sweep``, ``sweepjob``, ``sweepcache``), the paper tables (``tables``), their
verdicts (``findings``), plots, the results document (``report``) and per-layer
activation statistics (``layerstats``). Nothing in the library imports it."""
