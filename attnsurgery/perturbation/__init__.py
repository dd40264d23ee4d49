"""The perturbation engine, shared by `PerturbedAttention` (``plugins/perturbation.py``) and the head search.

- ``headset``: the head-set format (heads, their ``"path:head"`` names, the model fingerprint, the JSON file).
- ``processor``: the head-perturbation processor and the per-call state that says which rows and heads it edits.
- ``guidance``: the denoiser wrapper that adds the perturbed rows and folds them into the pipeline's own CFG.

It sits below both users and imports neither; this face imports nothing, so reading the head-set format
loads no more than that module.
"""
