"""Compress a causal LM with LUC: per-layer bits and sparsity under a budget, saved for real.

With --layer-by-layer the model is never loaded whole: each decoder layer is read from the
safetensors files, profiled and compressed in turn (for a model larger than memory); the saved
checkpoint is the same.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import edge_llm
from edge_llm.assets import smollm2_135m
from edge_llm.data import sonnets

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="model folder or Hub id (default: SmolLM2-135M-Instruct, offline)")
parser.add_argument("--avg-bits", type=float, default=3.5)
parser.add_argument("--avg-sparsity", type=float, default=0.25)
parser.add_argument("--samples", type=int, default=8, help="calibration windows of 128 tokens")
parser.add_argument("--output", default="out/luc-model")
parser.add_argument("--layer-by-layer", action="store_true", help="one decoder layer in memory at a time")
args = parser.parse_args()

path = args.model or smollm2_135m()
tokenizer = AutoTokenizer.from_pretrained(path)
config = edge_llm.LUCConfig(
    avg_bits=args.avg_bits,
    avg_sparsity=args.avg_sparsity,
    dataset=sonnets("train"),
    tokenizer=tokenizer,
    num_samples=args.samples,
    seq_len=128,
    group_size=64,
    metric="output_mse",
    sparsities=(0.0, 0.25, 0.5),
)
if args.layer_by_layer:
    from edge_llm.luc.streaming import compress_checkpoint

    print(compress_checkpoint(path, args.output, config).summary())  # profile, search, compress, save
else:
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)  # profile, search, compress
    print(model.config.quantization_config.policy.summary())
    model.save_pretrained(args.output)
tokenizer.save_pretrained(args.output)
reloaded = AutoModelForCausalLM.from_pretrained(args.output)  # packed weights load back as they are
print(f"saved to {args.output}; reloaded {type(reloaded.model.layers[0].mlp.down_proj).__name__} layers")
