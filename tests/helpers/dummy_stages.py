"""Tiny stages and configs for testing the runner on a small ppocr-built network (seconds per test)."""
import os
import signal
import textwrap
from dataclasses import dataclass

import numpy as np

from compress.stages import stage_sections
from compress.stages.base import STAGES, Stage, StageResult

CALLS = []  # (stage, model) of every run() in this process

TINY_DET_ARCH = {
    "model_type": "det", "algorithm": "DB",
    "Backbone": {"name": "MobileNetV3", "scale": 0.35, "model_name": "small"},
    "Neck": {"name": "DBFPN", "out_channels": 16},
    "Head": {"name": "DBHead", "k": 50},
}


def tiny_input():
    return np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype("float32")


def forward(model):
    import paddle
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(tiny_input()))["maps"].numpy()


@dataclass(frozen=True)
class PerturbConfig:
    delta: float = 0.01


@dataclass(frozen=True)
class NoConfig:
    pass


class TInit(Stage):
    name, section, config_cls, allowed_after = "t_init", "TInit", NoConfig, None

    def run(self, model, cfg, ctx):
        from compress.models import build_model
        CALLS.append((self.name, ctx.model_name))
        model = build_model(dict(ctx.model_cfg.Architecture), {"random": True})
        return StageResult(model=model, metrics={"out_mean": float(forward(model).mean())}, weights_changed=True)


class TPerturb(Stage):
    name, section, config_cls, allowed_after = "t_perturb", "TPerturb", PerturbConfig, ("t_init", "t_perturb2")

    def run(self, model, cfg, ctx):
        import paddle
        CALLS.append((self.name, ctx.model_name))
        _maybe_die(self.name, ctx)
        for p in model.parameters():
            p.set_value(p + paddle.full_like(p, cfg.delta))
        return StageResult(model=model, metrics={"out_mean": float(forward(model).mean())}, weights_changed=True)


class TPerturb2(TPerturb):
    name, section, allowed_after = "t_perturb2", "TPerturb2", ("t_init", "t_perturb")


class TCheck(Stage):
    name, section, config_cls, allowed_after = "t_check", "TCheck", NoConfig, ("t_perturb", "t_perturb2", "t_gate")

    def run(self, model, cfg, ctx):
        CALLS.append((self.name, ctx.model_name))
        _maybe_die(self.name, ctx)
        return StageResult(model=model, metrics={"out_sum": float(forward(model).sum())})


@dataclass(frozen=True)
class GateConfig:
    fail_for: str = ""
    on_gate_fail: str = "stop"


class TGate(Stage):
    name, section, config_cls, allowed_after = "t_gate", "TGate", GateConfig, ("t_perturb", "t_check")

    def run(self, model, cfg, ctx):
        CALLS.append((self.name, ctx.model_name))
        failed = ctx.model_name == cfg.fail_for
        return StageResult(model=model, metrics={"out_sum": 1.0}, passed=not failed,
                           message="out_sum too low" if failed else "")


@dataclass(frozen=True)
class LevelConfig:
    level: float = 1.0
    mode: str = "level"  # fixed: level 1.0 whatever ``level`` says (as Prune.mode uniform ignores flops_target)

    def inert_keys(self):
        return {"level"} if self.mode == "fixed" else set()


class TLevel(Stage):
    """Perturbs the weights by ``level`` (a stand-in for a compression strength, e.g. a FLOPs target)."""

    name, section, config_cls, allowed_after = "t_level", "TLevel", LevelConfig, ("t_init",)

    def run(self, model, cfg, ctx):
        import paddle
        CALLS.append((self.name, ctx.model_name))
        _maybe_die(self.name, ctx)
        level = 1.0 if cfg.mode == "fixed" else cfg.level
        for p in model.parameters():
            p.set_value(p + paddle.full_like(p, level * 1e-3))
        return StageResult(model=model, metrics={"level": level}, weights_changed=True)


@dataclass(frozen=True)
class LevelGateConfig:
    max_level: float = 0.3
    on_gate_fail: str = "stop"


class TLevelGate(Stage):
    """Passes the models whose ``t_level`` was at most ``max_level``."""

    name, section, config_cls, allowed_after = "t_level_gate", "TLevelGate", LevelGateConfig, ("t_level",)

    def run(self, model, cfg, ctx):
        CALLS.append((self.name, ctx.model_name))
        level = ctx.stage_entry("t_level")["metrics"]["level"]
        if os.environ.get("DIE_AT_LEVEL") == str(level):
            os.kill(os.getpid(), signal.SIGKILL)
        return StageResult(model=model, metrics={"level": level}, passed=level <= cfg.max_level,
                           message=f"level {level} > {cfg.max_level}" if level > cfg.max_level else "")


def _maybe_die(name, ctx):
    if os.environ.get("DIE_IN_STAGE") == name:
        with open(os.path.join(ctx.out_dir, "partial.bin"), "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("RAISE_IN_STAGE") == name:
        raise RuntimeError(f"simulated crash in {name}")


for _cls in (TInit, TPerturb, TPerturb2, TCheck, TGate, TLevel, TLevelGate):
    if _cls.name not in STAGES:
        STAGES.register(_cls.name, _cls)

SECTIONS = stage_sections()


def write_config(folder, pipeline=("t_init", "t_perturb", "t_check"), extra=""):
    """A pipeline config with two tiny models; returns its path."""
    import yaml
    model = {"Global": {"task": "det"}, "Architecture": TINY_DET_ARCH, "Weights": {"random": True},
             "PostProcess": {"name": "DBPostProcess"}, "Metric": {"name": "DetMetric"},
             "Eval": {"data_dir": "none", "label_file": "none.txt"}, "Input": {"example_shape": [3, 64, 64]}}
    text = textwrap.dedent(f"""
        Global: {{run_dir: {os.path.join(folder, 'run')}, show_progress: false}}
        Models:
          a: {yaml.safe_dump(model, default_flow_style=True, width=10**6).strip()}
          b: {yaml.safe_dump(model, default_flow_style=True, width=10**6).strip()}
        Pipeline: [{', '.join(pipeline)}]
    """) + extra
    path = os.path.join(folder, "pipeline.yml")
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv):
    """Entry point for subprocess tests: ``python -m tests.helpers.dummy_stages -c CONFIG``."""
    import runpy
    import sys
    run_tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "tools", "run.py"))
    return run_tool["main"](argv)


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
