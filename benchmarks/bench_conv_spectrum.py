"""How much of a model's 1x1-conv outputs a linear compression could keep: the spectrum of each conv's responses.

Closed-form recovery after pruning (``compress/pruning/reconstruction.py``) and any low-rank factorisation of a 1x1
conv ``W`` (``in -> r -> out``, Zhang et al. 2015) can at best keep the top principal directions of the conv's
output on real inputs. For each 1x1 conv this prints, from its outputs on unlabelled images of the model's demo data
(the unpruned baseline, no training): the rank holding 99% of the output variance, and the relative error
``sqrt(1 - energy(r))`` of the best rank-``r`` approximation at the rank that saves 20 / 35 / 50% of that conv's
multiply-adds (``r = (1 - saving) * in * out / (in + out)``). A layer whose outputs need a high rank cannot lose that
much compute without training, whatever the channel choice.

Measured (PP-OCRv4 rec, 128 unlabelled lines of ``data/demo/rec/unlabeled``): every backbone 1x1 conv of blocks 4-6
(75% of rec's FLOPs) keeps 9-18% relative error already at a 20% saving of its own MACs, 13-24% at 35%
(blocks6.3.pw_conv: 99% of the variance needs rank 262 of 480). Det's convs were not the problem (reconstruction
brings det back to the baseline's hmean at -35% FLOPs), so the default is rec.

Usage: python benchmarks/bench_conv_spectrum.py [--model rec] [--images 128] [--layers "backbone.blocks[456]*"]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import fnmatch  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

SAVINGS = (0.2, 0.35, 0.5)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default="configs/ppocr_prune_quant.yml", help="pipeline config")
    parser.add_argument("--model", default="rec", help="model name under Models")
    parser.add_argument("--images", type=int, default=128, help="unlabelled images the outputs are measured on")
    parser.add_argument("--layers", default="backbone.blocks[456]*", help="fnmatch glob over conv layer names")
    return parser.parse_args()


def main():
    import paddle

    from compress.config import load_config
    from compress.models import build_model
    from compress.stages import stage_sections
    from compress.tasks import make_task

    args = parse_args()
    cfg = load_config(args.config, stage_sections=stage_sections())
    model_cfg = cfg.models[args.model]
    task = make_task(model_cfg, show_progress=True)
    weights = {key: value for key, value in vars(model_cfg.Weights).items() if value not in (None, False)}
    model = build_model(dict(model_cfg.Architecture), weights, model_cfg.base_dir)
    folder = os.path.join(cfg.Global.demo_data, args.model, "unlabeled")
    convs = {name: layer for name, layer in model.named_sublayers()
             if isinstance(layer, paddle.nn.Conv2D) and tuple(layer.weight.shape[2:]) == (1, 1)
             and layer._groups == 1 and fnmatch.fnmatch(name, args.layers)}
    outputs = {name: [] for name in convs}
    for name, layer in convs.items():
        layer.register_forward_post_hook(lambda _layer, _inputs, out, name=name: outputs[name].append(out.numpy()))
    with paddle.no_grad():
        for batch in tqdm(list(task.image_batches(folder, limit=args.images)), desc="forward", leave=False):
            model(paddle.to_tensor(batch))
    print(f"{args.model}: {len(convs)} 1x1 convs matching {args.layers!r}, outputs on {args.images} unlabelled "
          f"images of {folder}")
    print("| conv | out x in | rank for 99% | " + " | ".join(f"rel. error, -{s:.0%} MACs" for s in SAVINGS) + " |")
    print("|---|---|---|" + "---|" * len(SAVINGS))
    for name, layer in convs.items():
        maps = np.concatenate(outputs[name])
        responses = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1]).astype("float64")
        out_channels, in_channels = layer.weight.shape[:2]
        variance = np.linalg.eigvalsh(np.cov(responses.T))[::-1].clip(min=0)
        kept = np.cumsum(variance) / variance.sum()
        cells = []
        for saving in SAVINGS:
            rank = max(1, int((1 - saving) * in_channels * out_channels / (in_channels + out_channels)))
            cells.append(f"r={rank}: {np.sqrt(max(0.0, 1 - kept[min(rank, len(kept)) - 1])):.3f}")
        print(f"| {name} | {out_channels}x{in_channels} | {int(np.searchsorted(kept, 0.99)) + 1} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
