"""memsched: run PyTorch models inside a memory budget.

    cm = memsched.compile(model, budget="8GB")
    out = cm(batch)          # same outputs as model(batch)
    print(cm.plan)           # the schedule it runs
"""
from .budget import format_bytes, parse_budget
from .api import CompiledModule, compile, plan
from .cost_models.hardware import PRESETS, Hardware, get_hardware, list_hardware, local_hardware
from .errors import BudgetExceededError, CaptureError, InfeasibleBudgetError, ModelTensorsChanged, UnsupportedModelError
from .generation import GenerationStats, Generator, generate, route_generate
from .plans import Plan
from .runtime.executor import RunStats
from .runtime.checkpoint import CheckpointError
from .runtime.stores import DiskIntegrityError
from .verify import PlanError, verify_schedule

__all__ = [
    "compile", "plan", "generate", "route_generate", "Generator", "GenerationStats", "CompiledModule", "Plan", "RunStats", "Hardware", "PRESETS",
    "get_hardware", "list_hardware", "local_hardware", "parse_budget", "format_bytes",
    "InfeasibleBudgetError", "CaptureError", "UnsupportedModelError", "BudgetExceededError",
    "PlanError", "verify_schedule", "DiskIntegrityError", "CheckpointError", "ModelTensorsChanged",
]
__version__ = "0.1.0"
