"""Text data: tokenizers, document sources, packed and resumable training batches."""
from sparse_jax.data.dataset import Batches, Corpus, build_corpus, validation_batches
from sparse_jax.data.sources import (expand_paths, iter_documents, stdlib_files,
                                     stdlib_prose_documents)
from sparse_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["Batches", "ByteTokenizer", "Corpus", "HFTokenizer", "build_corpus", "expand_paths",
           "iter_documents", "load_tokenizer", "stdlib_files", "stdlib_prose_documents",
           "validation_batches"]
