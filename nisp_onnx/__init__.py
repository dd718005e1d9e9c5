"""nisp-onnx: prune ONNX CNNs with Neuron Importance Score Propagation.

`prune()` runs the whole pipeline, `finetune()` distils one model from another; the stages
are usable on their own: `load_model`, `analyze` (channel groups), `collect` (calibration
responses), `infs_scores`, `propagate`, `select`, `rewrite`.
"""

from .analyze import analyze, find_frl
from .api import finetune, prune
from .calibrate import collect
from .criteria import CRITERIA, Context
from .distillation import FineTune, Trained
from .errors import EXIT_GATE, EXIT_INTERNAL, EXIT_OK, EXIT_USER, GateFailed, NispError
from .infs import infs_scores
from .model_io import load_model, save_model
from .propagate import propagate
from .readers import ArrayReader, ImageFolderReader, Preprocess
from .report import Report
from .rewrite import rewrite, zero_removed
from .select import select

__version__ = "0.1.0"
__all__ = [
    "CRITERIA",
    "Context",
    "EXIT_GATE",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USER",
    "FineTune",
    "GateFailed",
    "ArrayReader",
    "ImageFolderReader",
    "NispError",
    "Preprocess",
    "Report",
    "Trained",
    "analyze",
    "collect",
    "find_frl",
    "finetune",
    "infs_scores",
    "load_model",
    "propagate",
    "prune",
    "rewrite",
    "save_model",
    "select",
    "zero_removed",
]
