"""Schedule a (compressed, adapted) model for an edge device, export a bundle and GGUF, run the bundle."""

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import edge_llm
from edge_llm.runtime import load_bundle
from edge_llm.scheduling import Workload, builtin_device, schedule

parser = argparse.ArgumentParser()
parser.add_argument("model", help="model folder, e.g. from compress_with_luc.py")
parser.add_argument("--adapter", help="an Edge-LLM adapter folder")
parser.add_argument("--device", default="jetson-orin-nano-8gb")
parser.add_argument("--memory-mib", type=int, help="pretend the device has this much memory (forces streaming)")
parser.add_argument("--output", default="out/bundle")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
if args.adapter:
    model = PeftModel.from_pretrained(model, args.adapter)
device = builtin_device(args.device)
if args.memory_mib:
    device = device.with_memory(args.memory_mib * 2**20)
plan = schedule(model.eval(), device, Workload(prompt_tokens=256, decode_tokens=64))  # its policy and adapter
print(plan.summary())
edge_llm.export(model, plan, args.output, tokenizer=tokenizer, targets=["gguf"])
bundle = load_bundle(args.output)  # the reference executor runs it exactly as scheduled
ids = tokenizer("Shall I compare thee to a summer's day?", return_tensors="pt").input_ids
with torch.no_grad():
    gap = (bundle(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
print(f"bundle in {args.output} (model.gguf for llama.cpp); executor vs model max |logit difference| {gap:.2e}")
