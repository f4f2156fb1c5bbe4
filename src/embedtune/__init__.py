"""embedtune: fine-tune text-embedding models fast, and save folders every serving stack loads.

Importing embedtune applies one narrow compatibility patch to sentence-transformers 6 (see
`embedtune.st.install_compat`) so the guide's own wrapper code keeps working.
"""

from .errors import DataError, EmbedtuneError, SaveError
from .loading import FastModel
from .save import save_adapter, save_hf, save_merged
from .st import install_compat, to_sentence_transformer
from .train import TrainConfig, train

__version__ = "0.1.0"

install_compat()

__all__ = [
    "FastModel",
    "to_sentence_transformer",
    "train",
    "TrainConfig",
    "save_merged",
    "save_hf",
    "save_adapter",
    "EmbedtuneError",
    "DataError",
    "SaveError",
    "__version__",
]
