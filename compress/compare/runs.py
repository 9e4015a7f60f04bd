"""Comparing whole runs or checkpoints (``tools/compare.py``): rows of every model of one or more runs, exported
models measured side by side, deltas against a reference run."""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import os
from dataclasses import dataclass

from compress.compare.e2e import e2e_for
from compress.compare.measure import MeasureSettings, measure_variants
from compress.compare.rows import finish_rows, load_run_config, manifest_rows, model_facts_from_manifest
from compress.compare.variants import baseline_folders, discover_variants, drop_unavailable
from compress.errors import CheckpointError
from compress.fidelity import baseline_reference


@dataclass
class RunSource:
    """A run, or one checkpoint of it, to compare (``tools/compare.py``).

    Attributes:
        label: run label in the rows (empty when only one run is compared).
        manifest: the run's Manifest.
        config: the run's PipelineConfig (``config.yml``).
        models: model names to compare.
        export_dirs: model name -> export checkpoint dir (None: nothing exported).
        until_stage: manifest rows stop before this stage.
    """

    label: str
    manifest: object
    config: object
    models: list
    export_dirs: dict
    until_stage: str = "compare"


def open_source(path, label=""):
    """A RunSource for a run directory or for a checkpoint directory inside one (``stages/<stage>/<model>/v<N>``).

    A checkpoint selects its model; an export checkpoint also selects that version's exported models, any other
    stage limits the manifest rows to the stages up to it.

    Raises:
        CheckpointError: when ``path`` is neither a run directory nor inside one.
    """
    from compress.checkpoint import MANIFEST_NAME, Manifest

    path = os.path.abspath(path)
    run_dir = next((folder for folder in _self_and_parents(path, 4)
                    if os.path.exists(os.path.join(folder, MANIFEST_NAME))), None)
    if run_dir is None:
        raise CheckpointError(f"{path}: not a run directory (no {MANIFEST_NAME} in it or up to 4 levels above); "
                              f"pass the Global.run_dir of a run, or a checkpoint dir inside one")
    inside = os.path.relpath(path, run_dir) if run_dir != path else None
    manifest = Manifest.load(run_dir)
    config = load_run_config(run_dir)
    models = list(manifest.data.get("models") or config.models)
    export_dirs = {m: manifest.checkpoint_dir("export", m) for m in models}
    if inside is None:
        return RunSource(label, manifest, config, models, export_dirs)
    parts = inside.split(os.sep)
    if len(parts) != 4 or parts[0] != "stages":
        raise CheckpointError(f"{path}: expected a run dir or a checkpoint dir <run>/stages/<stage>/<model>/v<N>")
    stage, model = parts[1], parts[2]
    if model not in models:
        raise CheckpointError(f"{path}: model '{model}' is not in the run's models ({', '.join(models)})")
    pipeline = manifest.data.get("pipeline", [])
    until = pipeline[pipeline.index(stage) + 1] if stage in pipeline and pipeline.index(stage) + 1 < len(pipeline) \
        else "compare"
    exported = {model: path if stage == "export" else None}
    return RunSource(label, manifest, config, [model], exported, until)


def _self_and_parents(path, levels):
    yield path
    for _ in range(levels):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
        yield path


def compare_sources(sources, cfg, reference=0, log=print):
    """Rows for every model of one or more runs: manifest rows plus exported models measured side by side.

    Models exported by several runs are timed in one interleaved loop; every run is evaluated on the Eval split
    of the reference run's model config. Deltas are against the reference run's baseline rows.

    Args:
        sources: list of RunSource (labels must differ when there are several).
        cfg: CompareConfig (``threads`` None: the reference run's Global.threads).
        reference: index of the reference run in ``sources``.
        log: progress lines.

    Returns:
        (rows, notes)
    """
    from compress.tasks import make_task

    ref = sources[reference]
    settings = MeasureSettings.from_config(cfg, ref.config.Global.threads, ref.config.Global.show_progress)
    rows, notes, variants_by_model = [], [], {}
    models = list(dict.fromkeys(m for source in sources for m in source.models))
    for model in models:
        owner = ref if model in ref.models else next(s for s in sources if model in s.models)
        model_cfg = owner.config.models[model]
        task = make_task(model_cfg, settings.show_progress)
        variants, facts = [], {}
        for source in sources:
            if model not in source.models:
                continue
            rows += manifest_rows(source.manifest, model, task.main_metric, source.until_stage, source.label)
            facts[source.label] = model_facts_from_manifest(source.manifest, model, source.until_stage)
            export_dir = source.export_dirs.get(model)
            if export_dir:
                variants += discover_variants(export_dir, cfg.backends, source.label, model_cfg.task,
                                              baseline_folders(source.manifest, model, export_dir))
            else:
                notes.append(f"{source.label or 'run'} {model}: nothing exported; manifest rows only")
        variants = drop_unavailable(variants, settings.threads, notes)
        variants_by_model[model] = (model_cfg, variants)
        rows += measure_variants(model, variants, task, settings, model_cfg.Input.max_batch_size,
                                 lambda v, facts=facts: facts[v.run](v), log,
                                 reference=baseline_reference(owner.manifest, model, model_cfg, required=False))
    if cfg.e2e:
        rows += e2e_for(variants_by_model, cfg, settings, notes, log)
    reference_label = ref.label if len(sources) > 1 else None
    return finish_rows(rows, reference_label), notes
