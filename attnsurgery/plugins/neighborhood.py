"""Neighborhood attention for DiTs as a plugin: native-sized local windows over the image tokens above
native size, text tokens global (the DiT counterpart of HiDiffusion's MSW-MSA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..ops.neighborhood import BACKENDS
from ..ops.rope_scaling import ROPE_SCALINGS, ScaledRope
from ..processors.neighborhood import NeighborhoodProcessor, NeighborhoodSchedule
from ..selectors import LayerSelector
from .base import Plugin, check_number, normalize_layers
from .dit_layers import IMAGE_KINDS, image_layers

if TYPE_CHECKING:
    from ..surgery import Surgery

__all__ = ["NeighborhoodAttention", "BACKEND_CHOICES"]

Size = int | tuple[int, int]
#: What ``backend=`` takes: the op's backends, or "auto" to let it choose per call.
BACKEND_CHOICES = ("auto", *BACKENDS)
#: Families whose position embedding ``ScaledRope`` understands: the id axes that hold rows and cols.
ROPE_SPATIAL_AXES = {"flux": (1, 2), "chroma": (1, 2), "flux2": (1, 2)}


def _pair(name: str, value: object) -> tuple[int, int]:
    """``value`` as a (rows, cols) pair of positive ints, or a ValueError naming the field."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise ValueError(
            f"NeighborhoodAttention {name} must be a positive int or a (rows, cols) pair of them, got {value!r}"
        )
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class NeighborhoodAttention(Plugin):
    """Each image token attends its native-sized neighbourhood of image tokens plus every text token.

    Above the family's native size a dense DiT sees more tokens than in training and its attention
    spreads (the DiT form of HiDiffusion's duplication problem) while costing ``N^2``. A native-sized
    neighbourhood keeps each query's view as trained and cuts the cost to ``N * window``. At or below native
    size the plugin does nothing (unless ``force``), so it can stay applied.

    Args:
        window: ``"native"`` (the family's native image-token grid) or the window in tokens, an int or a
            (rows, cols) pair. A window larger than the grid is clamped to it (that axis attends densely).
        stride: GNA's stride: queries of one ``stride`` group share one window (1: every query centred).
        dilation: attend every ``dilation``-th token (sub-grids).
        layers: layer selector (default every image-attending layer; see :mod:`attnsurgery.selectors`).
        start: progress in ``[0, 1)`` where local attention begins (earlier steps stay global: the layout forms).
        stop: progress in ``(0, 1]`` where it ends.
        backend: the op's backend: "auto", "reference", "tiles", "flex" or "natten".
        force: act at or below the native size too.
        proportional: scale the logits of calls that stay global above native size (unselected layers,
            steps outside ``[start, stop)``) by ``sqrt(log N / log N_native)`` (Jin et al. 2023).
        rope: None, "ntk" or "yarn": stretch FLUX-family RoPE beyond the native grid (the embedding module is
            swapped for one that holds the original).

    Example (the 2048 px image is not generated when the examples run as tests: minutes on a CPU):
        >>> handle = attnsurgery.apply(pipe, attnsurgery.NeighborhoodAttention())
        >>> image = pipe("a castle", height=2048, width=2048).images[0]  # doctest: +SKIP
        >>> handle.remove()
    """

    window: str | Size = "native"
    stride: Size = 1
    dilation: Size = 1
    layers: LayerSelector = "all"
    start: float = 0.0
    stop: float = 1.0
    backend: str = "auto"
    force: bool = False
    proportional: bool = False
    rope: str | None = None

    def __post_init__(self) -> None:
        if self.window != "native":
            object.__setattr__(self, "window", _pair("window", self.window))
        object.__setattr__(self, "stride", _pair("stride", self.stride))
        object.__setattr__(self, "dilation", _pair("dilation", self.dilation))
        if isinstance(self.window, tuple):
            self._check_stride(self.window)
        for name in ("start", "stop"):
            check_number("NeighborhoodAttention", name, getattr(self, name), 0.0, 1.0, "progress in [0, 1]")
        if self.start >= self.stop:
            raise ValueError(
                f"NeighborhoodAttention start ({self.start}) must be below stop ({self.stop}): local attention runs "
                "for steps in [start, stop)"
            )
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"NeighborhoodAttention backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.rope is not None and self.rope not in ROPE_SCALINGS:
            raise ValueError(f"NeighborhoodAttention rope must be None or one of {ROPE_SCALINGS}, got {self.rope!r}")
        normalize_layers(self, self.layers)

    def _check_stride(self, window: tuple[int, int]) -> None:
        if self.stride[0] > window[0] or self.stride[1] > window[1]:
            raise ValueError(
                f"NeighborhoodAttention stride {self.stride} exceeds the window {window}; give a stride of at "
                "most the window per axis (stride == window is blocked attention)"
            )

    def attach(self, surgery: Surgery) -> None:
        family = surgery.model.family
        if family.kind == "unet":
            raise ValueError(
                f"NeighborhoodAttention is for DiTs; {family.name} is a U-Net. Use HiDiffusion() there (its "
                "MSW-MSA is the U-Net form of local attention)."
            )
        side = family.native_latent // family.patch_size
        native = (side, side)
        window = native if self.window == "native" else self.window
        self._check_stride(window)
        selected = image_layers(surgery, self.layers)
        schedule = NeighborhoodSchedule(
            surgery.context,
            native,
            window,
            self.stride,
            self.dilation,
            self.start,
            self.stop,
            self.force,
            self.proportional,
            self.backend,
        )
        chosen = {layer.path for layer in selected}
        targets = list(selected)
        if self.proportional:  # the layers that stay global get the entropy-keeping scale too
            everything = surgery.model.select("all", kinds=IMAGE_KINDS)
            targets += [layer for layer in everything if layer.path not in chosen and layer.text_placement]
        for layer in targets:
            processor = NeighborhoodProcessor(
                layer.module.processor,
                path=layer.path,
                text_first=layer.text_placement == "first",
                schedule=schedule,
                local=layer.path in chosen,
            )
            surgery.set_processor(layer, processor, role="tokens")
        if self.rope is not None:
            self._swap_rope(surgery, native)

    def _swap_rope(self, surgery: Surgery, native: tuple[int, int]) -> None:
        family = surgery.model.family
        embedding = getattr(surgery.denoiser, "pos_embed", None)
        axes = ROPE_SPATIAL_AXES.get(family.name)
        if axes is None or not (hasattr(embedding, "theta") and hasattr(embedding, "axes_dim")):
            raise ValueError(
                f"NeighborhoodAttention rope={self.rope!r} rescales FLUX-family RoPE ({', '.join(ROPE_SPATIAL_AXES)}); "
                f"{family.name} has none it understands. Leave rope=None."
            )
        context = surgery.context

        def alphas() -> dict[int, float]:
            grid = context.image_grid()
            return {axes[0]: grid[0] / native[0], axes[1]: grid[1] / native[1]}

        spatial = {axes[0]: native[0], axes[1]: native[1]}
        surgery.swap_module("pos_embed", ScaledRope(embedding, self.rope, spatial, alphas), role="module")
