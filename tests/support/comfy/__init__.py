"""The ComfyUI side of the node tests: the real snapshot, a tiny ComfyUI model, and diffusers twins for parity."""
