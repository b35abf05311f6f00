"""Hugging Face Llama-format checkpoints: import into the Flax model, export back.

A checkpoint directory holds ``config.json`` (LlamaConfig fields), the weights as
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and optionally the
tokenizer as ``tokenizer.json``. One module per job:

* ``config``: ``config.json`` <-> ``ModelConfig`` (every field checked, unknown ones refused);
* ``weights``: HF tensor names and layouts <-> parameters, safetensors reading and writing;
* ``load``: ``load_hf`` (config, then headers, then tensors: nothing is read before every check
  has passed, so a bad checkpoint fails with the tensor or field named, never half-loaded);
* ``export``: ``export_hf`` writes a model as a checkpoint directory transformers loads.

Loading a checkpoint of either kind (run directory or HF directory) goes through
``sparse_jax.checkpoints.load_model``.
"""
from sparse_jax.hf.config import (CONFIG_FILE, HOT_NEURONS_FIELD, TOKENIZER_FILE, hf_config,
                                  model_config_from_hf, read_config)
from sparse_jax.hf.export import byte_tokenizer_json, export_hf
from sparse_jax.hf.load import has_tokenizer, load_hf
from sparse_jax.hf.weights import (TensorSpec, hf_tensors, is_hf_checkpoint,
                                   model_from_hf_tensors, read_hf_tensors, tensor_specs)

__all__ = ["CONFIG_FILE", "HOT_NEURONS_FIELD", "TOKENIZER_FILE", "TensorSpec", "byte_tokenizer_json", "export_hf", "has_tokenizer", "hf_config",
           "hf_tensors", "is_hf_checkpoint", "load_hf", "model_config_from_hf",
           "model_from_hf_tensors", "read_config", "read_hf_tensors", "tensor_specs"]
