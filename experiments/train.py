"""Train a sparse language model: a thin wrapper over ``sparse-jax train`` (sparse_jax/cli.py).

    python experiments/train.py --config tiny --max-minutes 3 --out runs/tiny
    PYTHONPATH=$PWD python3 experiments/train.py --config small --steps 2000 --max-minutes 8 --out runs/small
    python experiments/train.py --help
"""
import os
import sys

# Run from a checkout without an install: this checkout's package comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main(["train", *sys.argv[1:]]))
