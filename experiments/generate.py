"""Generate text from a checkpoint: a thin wrapper over ``sparse-jax generate`` (sparse_jax/cli.py).

    python experiments/generate.py --checkpoint runs/main --prompt 'def main(' --max-new-tokens 200
    python experiments/generate.py --checkpoint /models/sparse-1.5b --prompt 'The' --temperature 0.8 --top-p 0.95
    python experiments/generate.py --help
"""
import sys

from sparse_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["generate", *sys.argv[1:]]))
