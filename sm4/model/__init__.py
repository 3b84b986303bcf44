"""The SM4 multi-modal multi-task model: configuration (``config``), modality tokenisation
(``tokenize``) and the model itself (``sm4_model``)."""

from .config import SETTINGS, ModelConfig, Setting, TrainConfig, get_setting
from .sm4_model import PerceiverEncoder, SM4Model
from .tokenize import Tokenizer, fourier_encode, frequencies

__all__ = ["SETTINGS", "ModelConfig", "PerceiverEncoder", "SM4Model", "Setting", "Tokenizer", "TrainConfig",
           "fourier_encode", "frequencies", "get_setting"]
