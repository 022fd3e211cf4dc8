"""The model as an fx graph with names: capture, roles, canonical naming, selection.

* ``capture``: a model -> fx GraphModule (generate mode with a static KV cache, or plain).
* ``roles``: graph facts (units, scopes, op tables) that naming reads.
* ``naming``: canonical, architecture-neutral node names and roles (``NamedGraph``).
* ``select``: glob / type / op selectors over named nodes.
* ``attrs``: the tensor behind a ``get_attr`` target.
"""
