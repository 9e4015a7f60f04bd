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
            index, models = _next_step(runner.cfg, settings, _step_index(attempts[-1]) + 1 if attempts else 0,
                                       list(exc.models), log)
            if index is None:
                raise GateError(f"{exc}{tried}; no Backoff.steps left that change {', '.join(exc.models)}",
                                models=exc.models) from None
            spent = (clock() - started) / 60.0
            if settings.time_budget_min is not None and spent >= settings.time_budget_min:
                raise GateError(f"{exc}{tried}; Backoff.time_budget_min ({settings.time_budget_min:g}) spent "
                                f"({spent:.1f} min)", models=exc.models) from None
            attempt = {"number": len(attempts) + 2, "models": models, "step_index": index,
                       "step": dict(settings.steps[index]), "reason": str(exc),
                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            extra += step_overrides(attempt["step"], attempt["models"])
            # the step must make a valid config (every stage section parsed) before it is recorded
            runner = Runner(load_config(config_path, list(overrides) + extra, stage_sections))
            attempts.append(attempt)
            atomic_write_json(os.path.join(run_dir, RECORD_FILE), {"command": command, "attempts": attempts})


def _step_index(attempt):
    """The ``Backoff.steps`` index an attempt used (records written before steps could be skipped: in order)."""
    return attempt.get("step_index", attempt["number"] - 2)


def _next_step(cfg, settings, start, models, log):
    """The first step from ``start`` on that changes how at least one of ``models`` is compressed, and those
    models: ``(index, models)``, or ``(None, [])`` when no step is left. A step whose keys the models' stage
    configs ignore (``inert_keys``: e.g. ``Prune.flops_target`` for a model pruned with ``mode: uniform``) would
    only repeat the failed attempt; it is skipped with a log line."""
    for index in range(start, len(settings.steps)):
        step = settings.steps[index]
        changed = [model for model in models if any(_applies(cfg, key, model) for key in step)]
        if changed:
            return index, changed
        keys = ", ".join(step)
        log(f"back-off step {index + 1} ({keys}) skipped: it does not change {', '.join(models)} "
            f"(the {'key is' if len(step) == 1 else 'keys are'} not used with {_why_inert(cfg, step, models)})")
    return None, []


def _stage_config(cfg, section, model):
    from compress.config import parse_section
    from compress.stages.base import STAGES

    stage = next((STAGES.get(name) for name in cfg.pipeline if STAGES.get(name).section == section), None)
    if stage is None or stage.config_cls is None:
        return None
    return parse_section(stage.config_cls, cfg.stage_section(section, model), f"{cfg.source_file}: {section}")


def _applies(cfg, key, model):
    """Does ``Section.key`` change what the pipeline does for ``model``? False when the section's stage is not
    in the pipeline or the model's config ignores the key."""
    section, name = key.split(".")
    parsed = _stage_config(cfg, section, model)
    if parsed is None:
        return False
    inert = getattr(parsed, "inert_keys", None)
    return name not in (inert() if inert else ())


def _why_inert(cfg, step, models):
    reasons = []
    for key in step:
        section = key.split(".")[0]
        for model in models:
            parsed = _stage_config(cfg, section, model)
            reasons.append(f"{model}'s {section}.mode {parsed.mode}" if parsed is not None and hasattr(parsed, "mode")
                           else f"{section} for {model}")
    return ", ".join(dict.fromkeys(reasons))

