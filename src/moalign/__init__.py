"""moalign: motion-centric representation alignment (MoAlign, ICLR 2026) for video diffusion models."""

from moalign.errors import MoalignError

__version__ = "0.1.0"
__all__ = ["MoalignError", "__version__"]
