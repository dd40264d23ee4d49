"""Helpers the tests share: runners, peer shims, small plugins, the ComfyUI snapshot. No tests live here.

Tests and conftest files import from ``tests.support``; nothing imports a ``test_*`` module or a conftest
(``tests/test_layout.py`` checks it).
"""
