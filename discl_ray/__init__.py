"""discl-ray: Diffusion Curriculum (DisCL) experiments on Ray."""

__version__ = "0.1.0"
