"""Evaluate a checkpoint: a thin wrapper over ``sparse-jax eval`` (sparse_jax/cli.py).

    python experiments/evaluate.py --checkpoint runs/main --tasks arc_easy.jsonl piqa.jsonl
    python experiments/evaluate.py --checkpoint /models/sparse-1.5b --compute-dtype bfloat16 --data "val/*.txt"
    python experiments/evaluate.py --help
"""
import os
import sys

# Run from a checkout without an install: this checkout's package comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main(["eval", *sys.argv[1:]]))
