"""crosslayer: Cross-Layer Attention (Brandon et al., NeurIPS 2024) for transformers users.

`import crosslayer` registers `CLAConfig` / `CLAForCausalLM` with transformers' Auto classes, so a
saved crosslayer model loads with `AutoModelForCausalLM.from_pretrained`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import PRESETS, CLAConfig, kv_sources_for
from .errors import CrossLayerError
from .modeling import CLAForCausalLM, CLAModel

AutoConfig.register(CLAConfig.model_type, CLAConfig, exist_ok=True)
AutoModel.register(CLAConfig, CLAModel, exist_ok=True)
AutoModelForCausalLM.register(CLAConfig, CLAForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["CLAConfig", "CLAForCausalLM", "CLAModel", "CrossLayerError", "PRESETS", "kv_sources_for"]
