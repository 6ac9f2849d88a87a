"""plop: where to put LoRA adapters, measured before you fine-tune (PLoP, arXiv 2506.20629)."""

__version__ = "0.1.0"

from .diagnose import DiagnoseConfig, diagnose  # noqa: E402
from .report import Report, ReportError  # noqa: E402

__all__ = ["DiagnoseConfig", "Report", "ReportError", "diagnose", "__version__"]
