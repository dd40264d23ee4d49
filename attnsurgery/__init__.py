"""attnsurgery: attention surgery for diffusion pipelines, applied at runtime and undone exactly.

Example:
    >>> import attnsurgery as surg
    >>> handle = surg.apply(pipe, *plugins)
    >>> image = pipe("a castle").images[0]
    >>> handle.remove()          # or surg.remove(pipe), or `with surg.patched(pipe, *plugins):`
"""

from .context import StepContext
from .convfusion import ConvFusion
from .families import Family, detect_family
from .headhunter import HeadSet, Racing, hunt
from .inventory import AttentionLayer, ModelInfo, describe
from .plugins.agent import AgentAttention, AgentPhase
from .plugins.base import Plugin, plugin_from_dict
from .plugins.hidiffusion import HiDiffusion
from .plugins.neighborhood import NeighborhoodAttention
from .plugins.perturbation import PerturbedAttention
from .plugins.token_merging import TokenMerging
from .surgery import Surgery, active_surgeries, apply, patched, remove

__version__ = "0.1.0"

__all__ = [
    "AgentAttention",
    "AgentPhase",
    "AttentionLayer",
    "ConvFusion",
    "Family",
    "HeadSet",
    "HiDiffusion",
    "ModelInfo",
    "NeighborhoodAttention",
    "PerturbedAttention",
    "Plugin",
    "Racing",
    "StepContext",
    "Surgery",
    "TokenMerging",
    "active_surgeries",
    "apply",
    "describe",
    "hunt",
    "detect_family",
    "patched",
    "plugin_from_dict",
    "remove",
]
