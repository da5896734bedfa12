"""Train the document embedder: ``python train.py`` runs the built-in synthetic default on CPU or GPU.

Under ``torchrun --nproc-per-node N train.py ...`` the backbone runs under DDP and the class
centers are sharded over the ranks (``--batch-size`` is per rank).

Every option is a field of ``fastpfc.doc.config.TrainConfig``; ``python train.py --help`` lists
them with their defaults. A run lives in ``--run-dir`` (config, checkpoint, metrics.jsonl,
eval.json, loss.png, roc.png); running again with the same folder resumes it exactly.
"""

import argparse
import dataclasses

import torch.distributed as dist

from fastpfc.doc.config import TrainConfig
from fastpfc.doc.evaluation import summary_table
from fastpfc.doc.training import train


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for option in dataclasses.fields(TrainConfig):
        name = "--" + option.name.replace("_", "-")
        help = option.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
        if option.type == "bool":  # annotations are strings here
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=option.default, help=help)
        else:
            kind = {"int": int, "float": float}.get(option.type, str)
            parser.add_argument(name, type=kind, default=option.default, help=help)
    return TrainConfig(**vars(parser.parse_args()))


def main() -> None:
    config = parse_args()
    try:
        results = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if results:  # rank 0
        print(summary_table(results, "unseen synthetic" if config.eval_data is None else config.eval_data))
        print(f"results in {config.run_dir}/: eval.json (the numbers above), checkpoint.pt (for fastpfc-doc -m; "
              "running again resumes), metrics.jsonl and loss.png (loss and learning rate per step), roc.png")


if __name__ == "__main__":
    main()
