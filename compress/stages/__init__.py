"""Pipeline stages. Importing this package registers every available stage in ``STAGES``."""
from compress.stages import evaluation, pruning  # noqa: F401
from compress.stages.base import PLANNED_STAGES, STAGES, Stage, StageResult, register_stage  # noqa: F401
