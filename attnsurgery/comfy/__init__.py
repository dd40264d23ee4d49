"""attnsurgery's ComfyUI node pack: attention surgery on ComfyUI's MODEL through its own patch points.

Every node clones the MODEL it receives and registers patches on the clone (attn1 patches, post-CFG
functions, block and object patches, model wrappers), so the input model samples exactly as before. The maths is
attnsurgery's (``attnsurgery.ops``), the settings are validated by the plugin configs.

Install: with attnsurgery installed in ComfyUI's Python, create ``ComfyUI/custom_nodes/attnsurgery_nodes/
__init__.py`` holding these two lines (the folder must not be called ``attnsurgery``: ComfyUI registers a
node folder under its own name in ``sys.modules``, which would hide the library)::

    from attnsurgery.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
"""

from __future__ import annotations

from .agent_attention import AttnSurgeryAgentAttention
from .convfusion import AttnSurgeryConvFusion
from .hidiffusion import AttnSurgeryHiDiffusion
from .neighborhood_attention import AttnSurgeryNeighborhoodAttention
from .perturbed_attention import AttnSurgeryPerturbedAttention
from .token_merging import AttnSurgeryTokenMerging
from .window_attention import AttnSurgeryWindowAttention

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "AttnSurgeryPerturbedAttention": AttnSurgeryPerturbedAttention,
    "AttnSurgeryTokenMerging": AttnSurgeryTokenMerging,
    "AttnSurgeryAgentAttention": AttnSurgeryAgentAttention,
    "AttnSurgeryWindowAttention": AttnSurgeryWindowAttention,
    "AttnSurgeryHiDiffusion": AttnSurgeryHiDiffusion,
    "AttnSurgeryConvFusion": AttnSurgeryConvFusion,
    "AttnSurgeryNeighborhoodAttention": AttnSurgeryNeighborhoodAttention,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "AttnSurgeryPerturbedAttention": "Perturbed Attention, head level (attnsurgery)",
    "AttnSurgeryTokenMerging": "Token Merging (attnsurgery)",
    "AttnSurgeryAgentAttention": "Agent Attention (attnsurgery)",
    "AttnSurgeryWindowAttention": "HiDiffusion Window Attention, MSW-MSA (attnsurgery)",
    "AttnSurgeryHiDiffusion": "HiDiffusion RAU-Net (attnsurgery)",
    "AttnSurgeryConvFusion": "ConvFusion distilled blocks (attnsurgery)",
    "AttnSurgeryNeighborhoodAttention": "Neighborhood Attention, DiT (attnsurgery)",
}
