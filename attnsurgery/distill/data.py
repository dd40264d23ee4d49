"""Training data for distillation: a folder of latent shards, built from prompts, images or given as is.

Every source ends as the same thing, a *latent folder*: safetensors shards holding ``latents``
``[n, channels, height, width]`` in the denoiser's own latent space (VAE-scaled) and their captions in the
shard metadata. Prompts are turned into latents by the teacher pipeline itself (as CLEAR does), images by
its VAE; both are written once and reused by later runs and by resumed ones.

The order of samples is a pure function of ``(seed, step)``, so a resumed run sees exactly the batches
the uninterrupted run would have seen without saving any sampler state.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

SHARD_FORMAT = "attnsurgery-latents/1"
CACHE_MARKER = "cache-complete.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    """One captioned training image before encoding."""

    image: Path
    caption: str


def write_shard(path: Path, latents: torch.Tensor, captions: Sequence[str]) -> None:
    """Write one shard: ``latents`` [n, c, h, w] (stored as float32) with its n captions."""
    if latents.shape[0] != len(captions):
        raise ValueError(f"{latents.shape[0]} latents but {len(captions)} captions for shard {path.name}.")
    metadata = {"format": SHARD_FORMAT, "captions": json.dumps(list(captions))}
    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(path), metadata=metadata)


def _source_key(kind: str, items: Sequence[str], *settings: object) -> str:
    """A short digest naming what a cache was built from."""
    digest = hashlib.sha256(json.dumps([kind, list(items), [str(x) for x in settings]]).encode()).hexdigest()
    return f"{kind}:{len(items)}:{digest[:16]}"


def _reusable_cache(folder: Path, source_key: str) -> bool:
    """True when ``folder`` holds a finished cache of the same source; a cache of another source is an
    error (it would silently train on the wrong data), an unfinished one is rebuilt."""
    marker = folder / CACHE_MARKER
    if not marker.exists():
        return False
    cached = json.loads(marker.read_text(encoding="utf-8")).get("source")
    if cached != source_key:
        raise ValueError(
            f"The cache folder {folder} was built from other data ({cached}, now {source_key}). "
            "Pass another cache folder or delete this one."
        )
    return True


def _mark_complete(folder: Path, source_key: str, count: int) -> None:
    (folder / CACHE_MARKER).write_text(json.dumps({"source": source_key, "samples": count}), encoding="utf-8")


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"The prompts file {path} holds no prompts; write one prompt per line.")
    return prompts


def find_captioned_images(folder: Path) -> list[Sample]:
    """Images in ``folder`` with their captions: a ``metadata.jsonl`` (``file_name`` + ``text`` or
    ``caption`` per line, the Hugging Face imagefolder convention) or a ``<stem>.txt`` beside each image."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(
            f"The folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}). Point --data at a folder of "
            "captioned images, a prompts .txt file, or a folder of latent shards."
        )
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                captions[row["file_name"]] = row.get("text", row.get("caption", ""))
    samples, missing = [], []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = captions.get(image.name)
        if caption is None and sidecar.exists():
            caption = sidecar.read_text(encoding="utf-8").strip()
        if caption is None:
            missing.append(image.name)
        else:
            samples.append(Sample(image, caption))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} of {len(images)} images in {folder} have no caption ({shown}). Add a "
            "<name>.txt beside each image or a metadata.jsonl with file_name and text per line."
        )
    return samples


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image resized (shorter side) and centre-cropped to a square, as [3, res, res] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0


class LatentFolder:
    """The shards of a latent folder, indexed row by row; a few shards stay loaded at a time.

    Args:
        folder: a directory of ``*.safetensors`` shards written by ``write_shard``.

    Example:
        >>> data = LatentFolder(Path("cache"))          # doctest: +SKIP
        >>> latents, captions = data.batch(seed=0, step=0, batch_size=4)  # doctest: +SKIP
    """

    def __init__(self, folder: Path, max_loaded: int = 4) -> None:
        shards = sorted(Path(folder).glob("*.safetensors"))
        if not shards:
            raise ValueError(
                f"The latent folder {folder} holds no .safetensors shards. Build it from prompts or images "
                "(pass a prompts .txt file or an image folder as --data)."
            )
        self._rows: list[tuple[Path, int]] = []
        self.latent_shape: tuple[int, ...] | None = None
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != SHARD_FORMAT or "latents" not in handle.keys():
                    raise ValueError(f"{shard} is not a latent shard ({SHARD_FORMAT}); remove it or rebuild.")
                shape = tuple(handle.get_slice("latents").get_shape())
            if self.latent_shape is None:
                self.latent_shape = shape[1:]
            elif shape[1:] != self.latent_shape:
                raise ValueError(
                    f"Shard {shard.name} holds latents of shape {shape[1:]}, others {self.latent_shape}; "
                    "one latent folder must hold a single resolution."
                )
            self._rows.extend((shard, row) for row in range(shape[0]))
        self._loaded: dict[Path, tuple[torch.Tensor, list[str]]] = {}
        self._max_loaded = max_loaded

    def __len__(self) -> int:
        return len(self._rows)

    def _shard(self, path: Path) -> tuple[torch.Tensor, list[str]]:
        if path not in self._loaded:
            if len(self._loaded) >= self._max_loaded:
                self._loaded.pop(next(iter(self._loaded)))
            with safe_open(str(path), framework="pt") as handle:
                self._loaded[path] = (handle.get_tensor("latents"), json.loads(handle.metadata()["captions"]))
        return self._loaded[path]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of all rows used in ``epoch``; a pure function of (seed, epoch)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=generator)

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """The batch of training step ``step`` (0-based): latents [batch_size, c, h, w] and captions."""
        positions = range(step * batch_size, (step + 1) * batch_size)
        orders: dict[int, torch.Tensor] = {}
        latents, captions = [], []
        for position in positions:
            epoch, index = divmod(position, len(self))
            if epoch not in orders:
                orders[epoch] = self.order(seed, epoch)
            shard, row = self._rows[int(orders[epoch][index])]
            shard_latents, shard_captions = self._shard(shard)
            latents.append(shard_latents[row])
            captions.append(shard_captions[row])
        return torch.stack(latents), captions


def cache_from_prompts(
    pipe,
    prompts: Sequence[str],
    folder: Path,
    resolution: int,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    shard_size: int = 256,
    seed: int = 0,
) -> Path:
    """Let the (unmodified) teacher pipeline generate one latent per prompt and cache them as shards.

    Args:
        pipe: the teacher diffusers pipeline (it must accept ``output_type="latent"``).
        prompts: the prompts, one sample each.
        folder: where the shards go (created; existing shards are kept and reused).
        resolution: image side in pixels.
        num_inference_steps, guidance_scale: the teacher's sampling settings.
        batch_size: prompts per pipeline call.
        shard_size: samples per shard file.
        seed: seed of the private generator; sample i always gets the same noise.

    Example:
        >>> cache_from_prompts(pipe, ["a red cube"], Path("cache"), 512)  # doctest: +SKIP
    """
    folder.mkdir(parents=True, exist_ok=True)
    source_key = _source_key("prompts", list(prompts), resolution, num_inference_steps, guidance_scale, seed)
    if _reusable_cache(folder, source_key):
        return folder
    num_shards = math.ceil(len(prompts) / shard_size)
    progress = tqdm(total=len(prompts), desc="teacher latents", unit="prompt")
    for shard_index in range(num_shards):
        shard_prompts = list(prompts[shard_index * shard_size : (shard_index + 1) * shard_size])
        chunks = []
        for start in range(0, len(shard_prompts), batch_size):
            chunk = shard_prompts[start : start + batch_size]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + shard_index * shard_size + start)
            output = pipe(
                chunk,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="latent",
            )
            chunks.append(output.images.float().cpu())
            progress.update(len(chunk))
        write_shard(folder / f"shard-{shard_index:05d}.safetensors", torch.cat(chunks), shard_prompts)
    progress.close()
    _mark_complete(folder, source_key, len(prompts))
    return folder


@torch.no_grad()
def cache_from_images(
    vae,
    samples: Sequence[Sample],
    folder: Path,
    resolution: int,
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    seed: int = 0,
) -> Path:
    """Encode captioned images with the pipeline's VAE (sampled posterior, scaled and shifted into the
    denoiser's space) and cache them as shards. Existing shards in ``folder`` are reused as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    source_key = _source_key("images", [f"{s.image.name}\t{s.caption}" for s in samples], resolution, seed)
    if _reusable_cache(folder, source_key):
        return folder
    scaling = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device, dtype = vae.device, vae.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    progress = tqdm(total=len(samples), desc="encoding images", unit="image")
    for shard_index, start in enumerate(range(0, len(samples), shard_size)):
        shard = samples[start : start + shard_size]
        chunks = []
        for offset in range(0, len(shard), batch_size):
            chunk = shard[offset : offset + batch_size]
            pixels = torch.stack([load_image(s.image, resolution) for s in chunk]).to(device, dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
            chunks.append(((latents - shift) * scaling).float().cpu())
            progress.update(len(chunk))
        captions = [s.caption for s in shard]
        write_shard(folder / f"shard-{shard_index:05d}.safetensors", torch.cat(chunks), captions)
    progress.close()
    _mark_complete(folder, source_key, len(samples))
    return folder


def prepare_latents(
    pipe,
    data: Path,
    cache: Path,
    resolution: int,
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> LatentFolder:
    """Turn ``data`` (prompts file, captioned image folder or latent folder) into a latent folder.

    Args:
        pipe: the teacher pipeline (it samples latents from prompts, its VAE encodes images).
        data: a prompts file, a folder of captioned images, or a folder of latent shards (used as is).
        cache: where latents made from prompts or images go.
        resolution: image side in pixels.
        seed: seed of the teacher's sampling or of the VAE posterior.
        num_inference_steps, guidance_scale: the teacher's sampling settings (prompts only).
    """
    if data.is_file():
        prompts = read_prompts(data)
        folder = cache_from_prompts(
            pipe,
            prompts,
            cache,
            resolution,
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        return LatentFolder(folder)
    if not data.is_dir():
        raise ValueError(f"--data {data} does not exist; pass a prompts .txt file, an image folder or a latent folder.")
    if any(data.glob("*.safetensors")):
        return LatentFolder(data)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in data.iterdir()):
        raise ValueError(
            f"The folder {data} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no latent shards "
            "(.safetensors); point --data at captioned images, latents or a prompts file."
        )
    samples = find_captioned_images(data)
    return LatentFolder(cache_from_images(pipe.vae, samples, cache, resolution, seed=seed))
