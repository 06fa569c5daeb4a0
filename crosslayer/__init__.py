"""crosslayer: Cross-Layer Attention (Brandon et al., NeurIPS 2024) for transformers users.

`import crosslayer` registers `CLAConfig` / `CLAForCausalLM` with transformers' Auto classes, so a
saved crosslayer model loads with `AutoModelForCausalLM.from_pretrained`. Every saved model also
carries its own code (config.py, modeling.py, errors.py beside the weights, named in config.json's
`auto_map`), so `from_pretrained(folder, trust_remote_code=True)` loads it where crosslayer is not
installed: lm-eval's CLI, a serving stack, a colleague's notebook.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import PRESETS, CLAConfig, kv_sources_for
from .errors import CrossLayerError
from .modeling import CLAForCausalLM, CLAModel

AutoConfig.register(CLAConfig.model_type, CLAConfig, exist_ok=True)
AutoModel.register(CLAConfig, CLAModel, exist_ok=True)
AutoModelForCausalLM.register(CLAConfig, CLAForCausalLM, exist_ok=True)
# save_pretrained copies the defining modules beside the weights and names them in config.json's auto_map
CLAConfig.register_for_auto_class()
CLAModel.register_for_auto_class("AutoModel")
CLAForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = ["CLAConfig", "CLAForCausalLM", "CLAModel", "CrossLayerError", "PRESETS", "kv_sources_for"]
