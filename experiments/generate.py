"""Generate text from a checkpoint: a thin wrapper over ``sparse-jax generate`` (sparse_jax/cli.py).

    python experiments/generate.py --checkpoint runs/main --prompt 'def main(' --max-new-tokens 200
    python experiments/generate.py --checkpoint /models/sparse-1.5b --prompt 'The' --temperature 0.8 --top-p 0.95
    python experiments/generate.py --help
"""
import os
import sys

# Run from a checkout without an install: this checkout's package comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_jax.cli import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main(["generate", *sys.argv[1:]]))
