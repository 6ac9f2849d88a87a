"""plop: where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629)."""

__version__ = "0.1.0"

from .diagnose import DiagnoseConfig, diagnose  # noqa: E402
from .report import Report, ReportError  # noqa: E402
from .trainer import TrainConfig, TrainResult, train  # noqa: E402
from .compare import Comparison, compare  # noqa: E402  (binds plop.compare to the function, not the module)

__all__ = ["Comparison", "DiagnoseConfig", "Report", "ReportError", "TrainConfig", "TrainResult", "compare",
           "diagnose", "train", "__version__"]
