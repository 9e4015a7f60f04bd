"""The stage interface.

A stage is one small class with ``run`` and ``restore``:

* ``run(model, cfg, ctx) -> StageResult`` does the work on one model and writes its extra files into
  ``ctx.out_dir`` (a staging directory the runner renames into place when the stage succeeds);
* a run-level stage (``scope = "run"``, e.g. ``compare``) runs once per run over every model instead:
  ``run_all(cfgs, ctx) -> StageResult`` with ``cfgs`` model name -> its config (``per_model`` overrides applied)
  and a :class:`RunContext`; it has its own checkpoint (``stages/<stage>/_run/v<N>``, manifest key
  :data:`RUN_KEY`) and never changes a model;
* ``restore(model, cfg, metadata) -> model`` rebuilds the architecture change the stage made from its recorded
  ``metadata`` alone (kept channel indices, quantization wrappers, ...), with no data and no search, so that the
  runner can rebuild any checkpoint in a fresh process: build the architecture, ``restore`` every finished stage
  in order, load the weights of the last stage that saved any.

Ordering rules live on the stage (``allowed_after``) and the runner checks the whole ``Pipeline`` list before any
work starts.
"""
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

from compress.registry import Registry

STAGES = Registry("stage")
# the manifest's model key of a run-level stage's one checkpoint
RUN_KEY = "_run"

# Stages that the roadmap names; listing one in Pipeline before its module registers it is an error.
PLANNED_STAGES = {
    "sensitivity": "per-layer pruning sensitivity analysis",
    "prune": "structured filter pruning",
    "finetune": "low-learning-rate recovery training",
    "quant": "post-training quantization / quantization-aware training",
    "export": "Paddle Inference / ONNX export with deploy configs",
    "compare": "A/B comparison report",
}


@dataclass(frozen=True)
class EmptyConfig:
    """For stages without settings."""


@dataclass
class StageResult:
    """What a stage hands back to the runner.

    Attributes:
        model: the model for the next stage (the same object when the stage does not change it).
        metrics: numbers to record and show (main metric, params, FLOPs, sizes, timings...).
        metadata: JSON-able facts ``restore`` needs to rebuild the architecture change.
        weights_changed: the runner saves ``model.pdparams`` into the checkpoint when true.
        passed: false when the stage's quality gate failed.
        message: one short phrase for the stage's summary line (e.g. why the gate failed and what to change).
        publish: run-directory names to point at folders of the checkpoint (e.g. ``{"delivered": "delivered"}``):
            after the checkpoint is committed, ``<run_dir>/<name>`` becomes a symlink to it, swapped atomically.
    """

    model: Any
    metrics: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)
    weights_changed: bool = False
    passed: bool = True
    message: str = ""
    publish: Dict[str, str] = field(default_factory=dict)


class Stage:
    """Base class. Subclasses set the class attributes and implement ``run`` (and ``restore`` if they change the
    architecture)."""

    name: ClassVar[str] = ""
    section: ClassVar[str] = ""  # the config section holding this stage's settings
    config_cls: ClassVar[type] = EmptyConfig
    # Stages that may come directly before this one; None means it must be first in the pipeline.
    allowed_after: ClassVar[Optional[Tuple[str, ...]]] = ()
    # Stages that must appear somewhere before this one.
    requires: ClassVar[Tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    # "model": ``run`` once per model; "run": ``run_all`` once per run over every model
    scope: ClassVar[str] = "model"

    def run(self, model, cfg, ctx) -> StageResult:
        raise NotImplementedError

    def run_all(self, cfgs, ctx) -> StageResult:
        """A run-level stage's work over every model (``cfgs``: model name -> config; ``ctx``: a RunContext)."""
        raise NotImplementedError

    def restore(self, model, cfg, metadata):
        """Rebuild the architecture change recorded in ``metadata``; the default is no change."""
        return model

    def on_gate_fail(self, cfg):
        """What the runner does when ``run`` returns ``passed=False``: 'stop' or 'continue' (from the input model)."""
        return getattr(cfg, "on_gate_fail", "stop")


def register_stage(cls):
    """Class decorator: add a Stage subclass to ``STAGES`` under ``cls.name``."""
    STAGES.register(cls.name, cls)
    return cls


@dataclass
class RunContext:
    """What a run-level stage may use: every model's config and task, the manifest, its own output folder."""

    models: list  # model names in run order
    model_cfgs: Dict[str, Any]
    tasks: Dict[str, Any]  # model name -> compress.tasks.Task
    global_cfg: Any
    out_dir: str  # the staging directory to write into
    run_dir: str
    manifest: Any
    stage_index: int
    stage_count: int
    work_dir: str = ""
    dry_run: bool = False
    config_file: str = ""  # the pipeline config the run was started with (for the commands a report quotes)
