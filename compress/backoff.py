"""Accuracy-aware back-off: a model whose compressed variants all miss a gate is compressed again, milder.

Top-level config section ``Backoff``::

    Backoff:
      steps:                          # tried in order, for the models that missed
        - {Prune.flops_target: 0.25}
        - {Prune.flops_target: 0.15, Quant.max_skipped: 3}
      time_budget_min: 90             # no new attempt starts after this many minutes of the command (null: none)

A step's keys are stage-section keys (``Section.key: value``). They are applied to the models that missed only,
as ``Section.per_model.<model>.key`` overrides after the command line's ``-o``, and stay for the next attempts
(a model that passes keeps the step it passed with). The runner then resumes as always: a stage whose chained
config did not change is reused (baseline, sensitivity), the changed one and every later one run again into new
checkpoint versions; the earlier attempt's checkpoints stay on disk (``--rollback-to`` and ``--list`` see them).

Which models missed comes from the :class:`~compress.errors.GateError` (``models``): a model-level stage that
stops on its gate, or a run-level stage (``compare``: every compressed variant of the model missed, so its
baseline was delivered). Each attempt is recorded in ``<run>/backoff.json`` (atomically, before it starts), so a
killed command resumes inside the attempt it was in. The record belongs to the command that wrote it (the hash of
the config file's merged content and the ``-o`` overrides); another command starts without it.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from compress.checkpoint import atomic_write_json
from compress.config import load_config, parse_section, stable_hash
from compress.errors import CheckpointError, ConfigError, GateError

RECORD_FILE = "backoff.json"
SECTION = "Backoff"


@dataclass(frozen=True)
class BackoffConfig:
    """``Backoff`` section (see the module docstring)."""

    steps: List[Dict[str, Any]] = ()
    time_budget_min: Optional[float] = None


def backoff_config(cfg):
    """The parsed ``Backoff`` section of a PipelineConfig (no steps when absent)."""
    settings = parse_section(BackoffConfig, cfg.merged.get(SECTION), f"{cfg.source_file}: {SECTION}")
    for index, step in enumerate(settings.steps):
        where = f"{cfg.source_file}: {SECTION}.steps[{index}]"
        if not isinstance(step, dict) or not step:
            raise ConfigError(f"{where}: expected a mapping Section.key: value, e.g. {{Prune.flops_target: 0.25}}")
        for key in step:
            if not isinstance(key, str) or key.count(".") != 1 or key.split(".")[0] not in cfg.stage_sections:
                raise ConfigError(f"{where}: {key!r} is not Section.key of a stage section in this config "
                                  f"({', '.join(sorted(cfg.stage_sections))})")
    if settings.time_budget_min is not None and settings.time_budget_min <= 0:
        raise ConfigError(f"{cfg.source_file}: {SECTION}.time_budget_min: must be > 0 minutes or null")
    return settings


def step_overrides(step, models):
    """``-o`` strings that apply one step to ``models``: ``Section.per_model.<model>.key=<value>``."""
    return [f"{key.split('.')[0]}.per_model.{model}.{key.split('.')[1]}={json.dumps(value)}"
            for model in models for key, value in step.items()]


def load_attempts(run_dir, command=None):
    """The back-off attempts recorded in a run folder: ``[]`` when none, or when ``command`` is given and the
    record belongs to another command.

    Raises:
        CheckpointError: when the record cannot be read.
    """
    path = os.path.join(run_dir, RECORD_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        attempts = list(data["attempts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable back-off record ({exc}); delete it to start the back-off "
                              f"over") from None
    return attempts if command is None or data.get("command") == command else []


def describe(attempt):
    """One line for an attempt, e.g. ``attempt 2: det with Prune.flops_target=0.25 (after: ...)``."""
    step = ", ".join(f"{k}={v}" for k, v in attempt["step"].items())
    return f"attempt {attempt['number']}: {', '.join(attempt['models'])} with {step} (after: {attempt['reason']})"


def run_with_backoff(config_path, overrides, stage_sections, dry_run=False, log=None, clock=time.time):
    """Run the pipeline; on a gate that names models, retry those models with the next ``Backoff`` step.

    Returns:
        the manifest of the last attempt.

    Raises:
        GateError: when the gate still fails after the last step, or the time budget is spent (the message
            lists the attempts); any other error of the runner unchanged.
    """
    from compress.runner import Runner  # the runner imports the stages, and compare imports this module

    log = log or (lambda line: print(line, flush=True))
    started = clock()
    cfg = load_config(config_path, overrides, stage_sections)
    settings = backoff_config(cfg)
    run_dir = os.path.abspath(cfg.Global.run_dir)
    command = stable_hash("backoff", cfg.merged)  # the merged config holds the -o overrides
    attempts = load_attempts(run_dir, command)
    extra = [o for attempt in attempts for o in step_overrides(attempt["step"], attempt["models"])]
    runner = Runner(load_config(config_path, list(overrides) + extra, stage_sections) if extra else cfg)
    while True:
        if attempts:
            log(f"back-off {describe(attempts[-1])}")
        try:
            return runner.run(dry_run=dry_run)
        except GateError as exc:
            if dry_run or not exc.models or not settings.steps:
                raise
            tried = f"; back-off tried: {'; '.join(describe(a) for a in attempts)}" if attempts else ""
            if len(attempts) >= len(settings.steps):
                raise GateError(f"{exc}{tried}; no Backoff.steps left", models=exc.models) from None
            spent = (clock() - started) / 60.0
            if settings.time_budget_min is not None and spent >= settings.time_budget_min:
                raise GateError(f"{exc}{tried}; Backoff.time_budget_min ({settings.time_budget_min:g}) spent "
                                f"({spent:.1f} min)", models=exc.models) from None
            attempt = {"number": len(attempts) + 2, "models": list(exc.models),
                       "step": dict(settings.steps[len(attempts)]), "reason": str(exc),
                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            extra += step_overrides(attempt["step"], attempt["models"])
            # the step must make a valid config (every stage section parsed) before it is recorded
            runner = Runner(load_config(config_path, list(overrides) + extra, stage_sections))
            attempts.append(attempt)
            atomic_write_json(os.path.join(run_dir, RECORD_FILE), {"command": command, "attempts": attempts})

