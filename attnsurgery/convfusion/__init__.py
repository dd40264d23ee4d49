"""ConvFusion (Delta-ConvFusion): distilled depthwise-conv blocks in place of a UNet's self-attention (attn1).

- ``plugin``: the ``ConvFusion`` plugin and the ``ConvFusionAttention`` module it swaps in;
- ``format``: the saved folder (``convfusion.safetensors`` + ``convfusion.json``) and the architecture
  fingerprint that ties blocks to the model they were made for;
- ``convert``: the converter from the authors' released weights.

Training new blocks is ``attnsurgery.distill``.
"""

from .convert import convert_official
from .plugin import ConvFusion, ConvFusionAttention

__all__ = ["ConvFusion", "ConvFusionAttention", "convert_official"]
