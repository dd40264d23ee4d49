"""Backends of :func:`attnsurgery.ops.neighborhood.neighborhood_attention`, one module each.

Every backend module has ``check(q, spec, text_key_mask) -> Exception | None`` (the reason it cannot run
this call, as the exception to raise when a user insisted on it) and
``run(q, k, v, spec, scale, text_key_mask) -> Tensor``; ``reference`` is the one the others are tested
against.
"""
