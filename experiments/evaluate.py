"""Evaluate a checkpoint: a thin wrapper over ``sparse-jax eval`` (sparse_jax/cli.py).

    python experiments/evaluate.py --checkpoint runs/main --tasks arc_easy.jsonl piqa.jsonl
    python experiments/evaluate.py --checkpoint /models/sparse-1.5b --compute-dtype bfloat16 --data "val/*.txt"
    python experiments/evaluate.py --help
"""
import sys

from sparse_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["eval", *sys.argv[1:]]))
