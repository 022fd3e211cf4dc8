"""Graph passes, one per module: each takes a named fx graph and a plan and rewrites
the graph (insert_observers, calibrate, freeze, lower_fake, lower_int8, fuse_attention,
simplify, record, validate; int8_exec reports what an int8 graph runs); ``pipeline``
holds the named pass sequences and the runner every caller uses."""
