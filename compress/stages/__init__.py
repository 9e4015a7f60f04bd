"""Pipeline stages. Importing this package registers every available stage in ``STAGES``."""
from compress.stages import compare, evaluation, pruning, quant  # noqa: F401
import export.stage  # noqa: F401,E402
import finetune.stage  # noqa: F401,E402
from compress.stages.base import PLANNED_STAGES, STAGES, Stage, StageResult, register_stage  # noqa: F401


def stage_sections():
    """Config sections of the registered stages, plus those of planned stages (accepted, never silently used)."""
    return {STAGES.get(name).section for name in STAGES.names()} | {name.capitalize() for name in PLANNED_STAGES}
