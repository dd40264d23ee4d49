"""attnsurgery: attention surgery for diffusion pipelines, applied at runtime and undone exactly."""

__version__ = "0.1.0"
