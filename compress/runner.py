"""The stage runner: checks the pipeline, runs stages model by model, resumes, rolls back and lists.

For each model the config hash of a stage is ``hash(stage section for that model, parent hash)``; the parent of the
first stage is the model config itself. On re-run a finished stage is skipped when its hash matches; the first
stage that does not match (or is stale after a rollback, or failed) and every stage after it run again.
"""
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np

from compress.checkpoint import DONE, FAILED, STALE, WEIGHTS_FILE, Manifest, StagingDir, atomic_write_json, \
    checksum_tree, next_version_dir
from compress.config import dump_config, parse_section, stable_hash, to_plain
from compress.errors import CheckpointError, ConfigError, GateError
from compress.stages.base import PLANNED_STAGES, RUN_KEY, STAGES, RunContext



def format_seconds(seconds):
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


def check_pipeline(cfg):
    """Validate the ``Pipeline`` list (names, order, requirements) before any work starts.

    Returns:
        list of Stage instances in pipeline order.
    """
    where = f"{cfg.source_file}: Pipeline"
    stages = []
    for name in cfg.pipeline:
        if name in PLANNED_STAGES and name not in STAGES:
            raise ConfigError(f"{where}: stage '{name}' is not available yet ({PLANNED_STAGES[name]}); "
                              f"remove it from Pipeline")
        stages.append(STAGES.get(name, where)())
    for i, stage in enumerate(stages):
        before = [s.name for s in stages[:i]]
        if stage.allowed_after is None:
            if i != 0:
                raise ConfigError(f"{where}: stage '{stage.name}' must be first, but comes after '{before[-1]}'; "
                                  f"move it to the front")
        elif i == 0:
            raise ConfigError(f"{where}: stage '{stage.name}' cannot be first; start the pipeline with baseline")
        elif before[-1] not in stage.allowed_after:
            raise ConfigError(f"{where}: stage '{stage.name}' cannot run after '{before[-1]}'; it may follow: "
                              f"{', '.join(stage.allowed_after)}")
        for needed in stage.requires:
            if needed not in before:
                raise ConfigError(f"{where}: stage '{stage.name}' needs '{needed}' earlier in the pipeline; add it")
    return stages


@dataclass
class StageContext:
    """What a stage may use besides its model and config."""

    model_name: str
    model_cfg: Any
    global_cfg: Any
    task: Any  # compress.tasks.Task
    out_dir: str  # the staging directory to write extra files into
    run_dir: str
    manifest: Manifest
    stage_index: int
    stage_count: int
    work_dir: str = ""  # persistent scratch space for progress inside the stage (keyed by the config hash)
    dry_run: bool = False
    extras: Dict[str, Any] = field(default_factory=dict)

    def baseline_metrics(self):
        entry = self.manifest.entry("baseline", self.model_name)
        return (entry or {}).get("metrics", {})

    def stage_dir(self, stage):
        """The verified checkpoint directory of an earlier stage for this model."""
        return self.manifest.verified_dir(stage, self.model_name)

    def stage_entry(self, stage):
        return self.manifest.entry(stage, self.model_name)

    def baseline_model(self, what="baseline"):
        """The baseline model rebuilt from its verified checkpoint, in eval mode (``what`` names it in errors)."""
        from compress.models import build_model
        model = build_model(dict(self.model_cfg.Architecture), {"random": True}, self.model_cfg.base_dir)
        load_weights(model, os.path.join(self.stage_dir("baseline"), WEIGHTS_FILE), f"model '{self.model_name}' "
                                                                                   f"({what})")
        model.eval()
        return model


@dataclass
class _ModelState:
    model: Any = None
    upto: int = -1  # index of the last stage whose effect ``model`` holds
    forced: bool = False  # a stage for this model has run in this invocation: later stages must run too
    parent_hash: str = ""


class Runner:
    """Runs a parsed PipelineConfig.

    Args:
        cfg: compress.config.PipelineConfig.
        log: callable for summary lines (default: print to stdout).
    """

    def __init__(self, cfg, log=None):
        self.cfg = cfg
        self.stages = check_pipeline(cfg)
        self.run_dir = os.path.abspath(cfg.Global.run_dir)
        self.log = log or (lambda line: print(line, flush=True))
        self.stage_cfgs = {}
        for stage in self.stages:
            for model_name in cfg.models:
                raw = cfg.stage_section(stage.section, model_name) if stage.section else {}
                where = f"{cfg.source_file}: {stage.section}"
                stage_cfg = parse_section(stage.config_cls, raw, where)
                self.stage_cfgs[stage.name, model_name] = stage_cfg
                requires = getattr(stage_cfg, "pipeline_requires", lambda: ())()
                before = [s.name for s in self.stages[:self.stages.index(stage)]]
                for needed in requires:
                    if needed not in before:
                        raise ConfigError(f"{where}: with these settings stage '{stage.name}' needs '{needed}' "
                                          f"earlier in the Pipeline; add it, or change {stage.section}.mode")
        self._tasks = {}
        # CPU results differ in the last bits between thread counts: every process of a run uses the same.
        set_threads(cfg.Global.threads)

    # ------------------------------------------------------------------------------------------ helpers

    def task(self, model_name):
        if model_name not in self._tasks:
            from compress.tasks import make_task
            self._tasks[model_name] = make_task(self.cfg.models[model_name], self.cfg.Global.show_progress)
        return self._tasks[model_name]

    def _model_hash(self, model_name):
        model_cfg = to_plain(self.cfg.models[model_name])
        model_cfg.pop("source_file", None)
        model_cfg.pop("base_dir", None)
        return stable_hash("model", model_cfg)

    def _seed(self):
        seed = self.cfg.Global.seed
        random.seed(seed)
        np.random.seed(seed)
        import paddle
        paddle.seed(seed)

    def materialize(self, manifest, model_name, upto):
        """Rebuild the model as it was after stage index ``upto`` from checkpoints alone (no data, no search)."""
        from compress.models import build_model
        model_cfg = self.cfg.models[model_name]
        model = build_model(dict(model_cfg.Architecture), {"random": True}, model_cfg.base_dir)
        weights_dir = None
        for stage in self.stages[:upto + 1]:
            entry = manifest.entry(stage.name, model_name)
            if entry is None or entry.get("status") != DONE:
                continue
            model = stage.restore(model, self.stage_cfgs[stage.name, model_name], entry.get("metadata", {}))
            if WEIGHTS_FILE in entry.get("files", {}):
                weights_dir = manifest.verified_dir(stage.name, model_name)
        if weights_dir is None:
            raise CheckpointError(f"model '{model_name}': no stage up to '{self.stages[upto].name}' saved weights; "
                                  f"run the pipeline from baseline")
        load_weights(model, os.path.join(weights_dir, WEIGHTS_FILE), f"model '{model_name}'")
        model.eval()
        return model

    # ------------------------------------------------------------------------------------------ commands

    def run(self, dry_run=False):
        """Run (or resume) the pipeline. Returns the manifest.

        Raises:
            GateError: when a stage's quality gate fails and the stage's policy is to stop.
        """
        manifest = Manifest.load(self.run_dir)
        if not is_writer():
            manifest.save = lambda: None  # other ranks of a data-parallel run compute, rank 0 writes
        if not dry_run and is_writer():
            os.makedirs(self.run_dir, exist_ok=True)
            dump_config(self.cfg, os.path.join(self.run_dir, "config.yml"))
            manifest.data["pipeline"] = [s.name for s in self.stages]
            manifest.data["models"] = list(self.cfg.models)
        states = {name: _ModelState(parent_hash=self._model_hash(name)) for name in self.cfg.models}
        for index, stage in enumerate(self.stages):
            if stage.scope == "run":
                self._run_level(manifest, stage, states, index, dry_run)
            else:
                self._model_level(manifest, stage, states, index, dry_run)
            if not dry_run:
                manifest.data["head"] = stage.name
                manifest.save()
        return manifest

    def _prefix(self, index, stage, key):
        return f"[{index + 1}/{len(self.stages)}] {stage.name:<11} {key:<4}"

    def _reusable(self, entry, config_hash, forced, stage, stage_cfg):
        """A finished checkpoint with the same config hash, unless a failed gate must stop (then it re-runs)."""
        return entry is not None and entry.get("config_hash") == config_hash and not forced and \
            entry.get("status") in (DONE, FAILED) and \
            not (entry["status"] == FAILED and stage.on_gate_fail(stage_cfg) == "stop")

    def _log_finished(self, prefix, manifest, key, entry, result, seconds):
        status = "" if result.passed else "  GATE FAILED: " + result.message
        note = f"  {result.message}" if result.passed and result.message else ""
        self.log(f"{prefix} {self._metric_text(manifest, key, entry)}{note}  {format_seconds(seconds)}{status}")

    def _model_level(self, manifest, stage, states, index, dry_run):
        """A stage per model; its gate failures stop the pipeline once every model has run it."""
        stopping = []
        for model_name, state in states.items():
            stage_cfg = self.stage_cfgs[stage.name, model_name]
            config_hash = stable_hash(stage.name, stage_cfg, state.parent_hash)
            state.parent_hash = config_hash
            entry = manifest.entry(stage.name, model_name)
            prefix = self._prefix(index, stage, model_name)
            if self._reusable(entry, config_hash, state.forced, stage, stage_cfg):
                self.log(f"{prefix} {self._metric_text(manifest, model_name, entry)}  (finished earlier, skipped)")
                continue
            if dry_run:
                self._dry_run_stage(manifest, stage, stage_cfg, model_name, state, index, prefix)
                state.forced = True
                continue
            passed = self._run_stage(manifest, stage, stage_cfg, model_name, state, index, config_hash, prefix)
            if not passed and stage.on_gate_fail(stage_cfg) == "stop":
                stopping.append(model_name)
        if stopping:
            first = stopping[0]
            others = f" (also: {', '.join(stopping[1:])})" if len(stopping) > 1 else ""
            raise GateError(f"stage '{stage.name}' failed its gate for model '{first}'{others}: "
                            f"{manifest.entry(stage.name, first).get('message', '')}; head stays on "
                            f"'{manifest.head}'", models=stopping)

    def _run_level(self, manifest, stage, states, index, dry_run):
        """A run-level stage: one checkpoint for the run, re-run when any model's chain (or its config) changed."""
        cfgs = {name: self.stage_cfgs[stage.name, name] for name in self.cfg.models}
        config_hash = stable_hash(stage.name, [cfgs[n] for n in cfgs], [states[n].parent_hash for n in cfgs])
        forced = any(state.forced for state in states.values())
        for state in states.values():
            state.parent_hash = config_hash
        first_cfg = next(iter(cfgs.values()))
        entry = manifest.entry(stage.name, RUN_KEY)
        prefix = self._prefix(index, stage, "run")
        if self._reusable(entry, config_hash, forced, stage, first_cfg):
            self.log(f"{prefix} {self._metric_text(manifest, RUN_KEY, entry)}  (finished earlier, skipped)")
            return
        if dry_run:
            self.log(f"{prefix} would run")
            return
        final_dir = next_version_dir(os.path.join(self.run_dir, "stages", stage.name, RUN_KEY))
        started = time.time()
        with StagingDir(final_dir) as staging:
            ctx = RunContext(models=list(self.cfg.models), model_cfgs=dict(self.cfg.models),
                             tasks={name: self.task(name) for name in self.cfg.models}, global_cfg=self.cfg.Global,
                             out_dir=staging.path, run_dir=self.run_dir, manifest=manifest, stage_index=index,
                             stage_count=len(self.stages),
                             work_dir=os.path.join(self.run_dir, "work", stage.name, RUN_KEY, config_hash),
                             config_file=self.cfg.source_file)
            result = stage.run_all(cfgs, ctx)
            seconds = time.time() - started
            entry = self._commit(staging, final_dir, stage, RUN_KEY, {n: to_plain(c) for n, c in cfgs.items()},
                                 config_hash, result, seconds)
        manifest.set_entry(stage.name, RUN_KEY, entry)
        manifest.save()
        for state in states.values():
            state.forced = True
        self._log_finished(prefix, manifest, RUN_KEY, entry, result, seconds)
        if not result.passed and stage.on_gate_fail(first_cfg) == "stop":
            raise GateError(f"stage '{stage.name}' failed its gate: {result.message}; head stays on "
                            f"'{manifest.head}'", models=(result.metadata or {}).get("failing_models", ()))

    def _commit(self, staging, final_dir, stage, key, config, config_hash, result, seconds):
        """Write ``stage.json``, checksum the staging folder, rename it into place; the manifest entry."""
        atomic_write_json(os.path.join(staging.path, "stage.json"), {
            "stage": stage.name, "model": key, "config": config, "metrics": result.metrics,
            "metadata": result.metadata, "passed": result.passed, "message": result.message,
            "seconds": round(seconds, 2)})
        files = checksum_tree(staging.path)
        if is_writer():
            staging.commit()
            for name, inside in result.publish.items():
                publish_link(os.path.join(self.run_dir, name), os.path.join(final_dir, inside))
        return {"status": DONE if result.passed else FAILED,
                "dir": os.path.relpath(final_dir, self.run_dir).replace(os.sep, "/"),
                "config_hash": config_hash, "files": files, "metrics": result.metrics,
                "metadata": result.metadata, "message": result.message, "seconds": round(seconds, 2),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _run_stage(self, manifest, stage, stage_cfg, model_name, state, index, config_hash, prefix):
        if state.model is None or state.upto != index - 1:
            state.model = self.materialize(manifest, model_name, index - 1) if index > 0 else None
            state.upto = index - 1
        self._seed()
        final_dir = next_version_dir(os.path.join(self.run_dir, "stages", stage.name, model_name))
        started = time.time()
        with StagingDir(final_dir) as staging:
            ctx = StageContext(model_name=model_name, model_cfg=self.cfg.models[model_name],
                               global_cfg=self.cfg.Global, task=self.task(model_name), out_dir=staging.path,
                               run_dir=self.run_dir, manifest=manifest, stage_index=index,
                               stage_count=len(self.stages),
                               work_dir=os.path.join(self.run_dir, "work", stage.name, model_name, config_hash))
            result = stage.run(state.model, stage_cfg, ctx)
            seconds = time.time() - started
            if result.weights_changed and result.passed:
                import paddle
                weights_path = os.path.join(staging.path, WEIGHTS_FILE)
                paddle.save(result.model.state_dict(), weights_path)
                result.metrics.setdefault("weights_bytes", os.path.getsize(weights_path))
                result.metadata.setdefault("output_sha256", output_digest(result.model, ctx.task))
            entry = self._commit(staging, final_dir, stage, model_name, to_plain(stage_cfg), config_hash, result,
                                 seconds)
        manifest.set_entry(stage.name, model_name, entry)
        manifest.save()
        state.forced = True
        if result.passed:
            state.model, state.upto = result.model, index
        self._log_finished(prefix, manifest, model_name, entry, result, seconds)
        return result.passed

    def _dry_run_stage(self, manifest, stage, stage_cfg, model_name, state, index, prefix):
        plan = getattr(stage, "dry_run", None)
        if plan is None or state.forced:
            self.log(f"{prefix} would run")
            return
        if state.model is None or state.upto != index - 1:
            state.model = self.materialize(manifest, model_name, index - 1) if index > 0 else None
            state.upto = index - 1
        ctx = StageContext(model_name=model_name, model_cfg=self.cfg.models[model_name], global_cfg=self.cfg.Global,
                           task=self.task(model_name), out_dir="", run_dir=self.run_dir, manifest=manifest,
                           stage_index=index, stage_count=len(self.stages), dry_run=True)
        self.log(f"{prefix} would run; plan:\n{plan(state.model, stage_cfg, ctx)}")

    def _metric_text(self, manifest, model_name, entry):
        from compress.tasks import TASKS
        metrics = entry.get("metrics", {})
        if model_name == RUN_KEY:
            return ", ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:4]) or "-"
        main = TASKS[self.cfg.models[model_name].task].main_metric
        if main not in metrics:
            return ", ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:3]) or "-"
        text = f"{main}={metrics[main]:.4f}"
        base = (manifest.entry("baseline", model_name) or {}).get("metrics", {})
        if main in base and entry is not manifest.entry("baseline", model_name):
            text += f" ({(metrics[main] - base[main]) * 100:+.1f} pt)"
        return text

    def _keys(self, stage):
        """The manifest keys of a stage's checkpoints: every model, or the one run-level key."""
        return [RUN_KEY] if stage.scope == "run" else list(self.cfg.models)

    def rollback(self, stage_name):
        """Move the head back to ``stage_name``: later stages become stale (nothing is deleted)."""
        names = [s.name for s in self.stages]
        if stage_name not in names:
            raise ConfigError(f"--rollback-to {stage_name}: not in Pipeline; choose one of: {', '.join(names)}")
        manifest = Manifest.load(self.run_dir)
        for model_name in self._keys(self.stages[names.index(stage_name)]):
            entry = manifest.entry(stage_name, model_name)
            if entry is None or entry.get("status") != DONE:
                raise CheckpointError(f"--rollback-to {stage_name}: model '{model_name}' has no finished "
                                      f"checkpoint for that stage in {self.run_dir}; pick a finished stage "
                                      f"(see --list)")
            manifest.verified_dir(stage_name, model_name)
        marked = []
        for stage in self.stages[names.index(stage_name) + 1:]:
            for model_name in self._keys(stage):
                entry = manifest.entry(stage.name, model_name)
                if entry is not None and entry.get("status") != STALE:
                    entry["status"] = STALE
                    marked.append(f"{stage.name}/{model_name}")
        manifest.data["head"] = stage_name
        manifest.save()
        self.log(f"head -> {stage_name}; marked stale: {', '.join(marked) or 'nothing'} (checkpoints kept)")
        return manifest

    def listing(self):
        """Rows (stage, model, status, metrics text, seconds, dir) for ``--list``."""
        manifest = Manifest.load(self.run_dir)
        rows = []
        for stage in self.stages:
            for model_name in self._keys(stage):
                entry = manifest.entry(stage.name, model_name)
                if entry is None:
                    rows.append((stage.name, model_name, "pending", "-", "-", "-"))
                    continue
                rows.append((stage.name, model_name, entry["status"],
                             self._metric_text(manifest, model_name, entry),
                             format_seconds(entry.get("seconds", 0)), entry["dir"]))
        return manifest.head, rows


def publish_link(link, target):
    """Make ``link`` a relative symlink to ``target``, replacing an older link atomically (a reader sees the old
    folder or the new one, never none)."""
    if os.path.exists(link) and not os.path.islink(link):
        raise CheckpointError(f"{link}: exists and is not a link this project made; move it away to publish "
                              f"{target} there")
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def is_writer():
    """True in a plain run and on rank 0 of ``paddle.distributed.launch``: only it writes checkpoints."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0


def output_digest(model, task):
    """sha256 of the model's output on the task's example input: a restored checkpoint must reproduce it."""
    import hashlib

    from compress.tasks import dygraph_predictor
    return hashlib.sha256(dygraph_predictor(model)(task.example_input()).tobytes()).hexdigest()


def set_threads(threads):
    """CPU math threads for dygraph execution (:func:`compress.threads.set_threads`)."""
    from compress import threads as math_threads
    math_threads.set_threads(threads)


def load_weights(model, path, what):
    """Load a state dict saved by the runner; every parameter must be present with the same shape."""
    import paddle
    try:
        state = paddle.load(path)
    except Exception as exc:  # paddle raises assorted errors on truncated files
        raise CheckpointError(f"{what}: cannot read weights {path} ({type(exc).__name__}); re-run the stage "
                              f"that wrote them") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and list(state[k].shape) != list(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{what}: weights {path} do not fit the rebuilt architecture (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {wrong[:3]}); the "
                              f"recorded stage metadata and weights disagree: re-run from the stage that wrote them")
    model.set_state_dict(state)
    return model


def print_listing(runner, out=None):
    out = out or sys.stdout
    head, rows = runner.listing()
    widths = [max(len(str(r[i])) for r in rows + [("stage", "model", "status", "metric", "time", "dir")])
              for i in range(6)]
    header = ("stage", "model", "status", "metric", "time", "dir")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    print(f"head: {head or '-'}  run dir: {runner.run_dir}", file=out)
