"""The perturbation engine, shared by `PerturbedAttention` (``plugins/perturbation.py``) and the head search.

- ``headset``: the head-set format (heads, their ``"path:head"`` names, the model fingerprint, the JSON file).

It sits below both users and imports neither; this face imports nothing, so reading the head-set format
loads no more than that module.
"""
