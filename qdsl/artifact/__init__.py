"""The compiled artifact on disk, read and written (no compiling, no loading a model).

* ``store``: ``write_artifact`` / ``read_artifact`` (atomic directory, sha256 records),
  a graph's tensors in and out of safetensors.
* ``files``: regular files only, recorded sizes and hashes, bounded JSON reads.
* ``schema``: qdsl_artifact.json and plan.json against hand-written schemas; the
  recorded recipe against recipe.qrec.
* ``tensors``: safetensors headers, finite scales and zero points on their grid,
  model/config.json bounds.
"""
