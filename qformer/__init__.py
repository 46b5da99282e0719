"""qformer: BLIP-2 style Q-Former adapters between a frozen vision tower and a frozen LLM."""

from qformer.config import QFormerConfig
from qformer.export import SoftVisualPrompt
from qformer.model import QFormer, QFormerOutput
from qformer.stage1 import Stage1Model

__all__ = ["QFormer", "QFormerConfig", "QFormerOutput", "SoftVisualPrompt", "Stage1Model"]
__version__ = "0.1.0"
