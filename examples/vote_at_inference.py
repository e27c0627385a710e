"""Exits and voting at inference: compare every exit and voting rule, then generate with the vote."""

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import edge_llm  # noqa: F401  (registers the EDGE_LLM method with peft)
from edge_llm.assets import smollm2_135m
from edge_llm.data import sonnets
from edge_llm.evaluation import perplexity

parser = argparse.ArgumentParser()
parser.add_argument("adapter", help="an Edge-LLM adapter folder (e.g. from adapt_with_edge_trainer.py)")
parser.add_argument("--model", help="the adapter's base model (default: SmolLM2-135M-Instruct, offline)")
parser.add_argument("--max-new-tokens", type=int, default=40)
args = parser.parse_args()

path = args.model or smollm2_135m()
tokenizer = AutoTokenizer.from_pretrained(path)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), args.adapter).eval()
held_out = tokenizer("\n\n".join(sonnets("test")), return_tensors="pt").input_ids[0]
held_out = held_out[: (len(held_out) // 128) * 128].view(-1, 128)[:8]
for name, value in perplexity(model, held_out).items():  # every exit, and every voting rule
    print(f"{name:>18}: perplexity {value:8.2f}")
prompt = tokenizer("Shall I compare thee to a summer's day?\n", return_tensors="pt")
with torch.no_grad():
    voted = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    with model.exit_at(model.exit_layers[0]):  # early exit: only the layers up to the first exit run
        early = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
print("voted:     ", tokenizer.decode(voted[0], skip_special_tokens=True))
print(f"exit {model.exit_layers[0]:>2}:   ", tokenizer.decode(early[0], skip_special_tokens=True))
