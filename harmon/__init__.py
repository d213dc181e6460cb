"""harmon: Harmon (unified multimodal understanding and generation) in plain PyTorch."""

from .configs import HarmonConfig, LLMConfig, MARConfig, VAEConfig, preset
from .models.harmon import HarmonModel
from .pipeline import Harmon

__version__ = "0.1.0"
__all__ = ["Harmon", "HarmonModel", "HarmonConfig", "LLMConfig", "MARConfig", "VAEConfig",
           "preset", "__version__"]
