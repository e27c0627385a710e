"""Adapt a causal LM to a small instruction dataset with Edge-LLM (default: SmolLM2-135M, sonnet instructions)."""

import argparse

from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

import edge_llm
from edge_llm.assets import smollm2_135m
from edge_llm.data import sonnet_instructions

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="model folder or Hub id (default: SmolLM2-135M-Instruct, offline)")
parser.add_argument("--data", help="JSON/JSONL file with 'instruction' and 'response' fields")
parser.add_argument("--max-steps", type=int, default=120)
parser.add_argument("--output", default="out/edge-adapter")
args = parser.parse_args()
model_path = args.model or smollm2_135m()
tokenizer = AutoTokenizer.from_pretrained(model_path)
rows = load_dataset("json", data_files=args.data)["train"] if args.data else Dataset.from_list(sonnet_instructions())


def tokenize(row):  # the loss covers the response only
    prompt = tokenizer(row["instruction"] + "\n")["input_ids"]
    response = tokenizer(row["response"] + tokenizer.eos_token)["input_ids"]
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


data = rows.map(tokenize, remove_columns=rows.column_names).train_test_split(test_size=0.1, seed=0)
config = edge_llm.EdgeLLMConfig(r=8, lora_alpha=16, target_modules="all-linear")
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
# No Trainer checkpoints or reports: the adapter folder holds the adapter only.
training = TrainingArguments(
    args.output,
    max_steps=args.max_steps,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    save_strategy="no",
    report_to=[],
)
collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
trainer = edge_llm.EdgeTrainer(model, training, collator, data["train"], data["test"])
trainer.train()  # one exit per step; ends by fitting the exit weights of the vote on data["test"]
print({k: round(v, 4) for k, v in trainer.evaluate().items() if "loss" in k or "accuracy" in k})
model.save_pretrained(args.output)
