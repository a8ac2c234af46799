"""stlm_train: the PyTorch side of STLM — model, checkpoints, training and evaluation."""
from .checkpoint import CheckpointError, load_model, load_official_stlm, save_checkpoint
from .config import CONFIGS, STLMConfig, get_config
from .modeling import STLM, InferenceOutput

__all__ = ["STLM", "STLMConfig", "InferenceOutput", "CONFIGS", "get_config", "load_model", "load_official_stlm",
           "save_checkpoint", "CheckpointError"]
__version__ = "0.1.0"
