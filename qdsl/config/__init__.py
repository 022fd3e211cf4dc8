"""What a recipe means, as frozen dataclasses (torch-free; imports only ``qdsl.errors``).

* ``spec``: ``TensorSpec`` / ``TensorPatch`` and the granularity and observer configs.
* ``recipe``: ``Recipe``, ``Rule``, ``Selector``, ``Settings``, ``Loc``.

The language (``qdsl.lang``) builds these from text; everything after it reads them.
"""
