"""Run by test_trainer.py under torchrun with 2 CPU processes (gloo)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from trainer_helpers import adapter_state, counting_dataset, edge_model, training_args

from edge_llm import EdgeTrainer

out = Path(sys.argv[1])
model = edge_model(exit_sampling="round_robin")
trainer = EdgeTrainer(model=model, args=training_args(out, max_steps=6), train_dataset=counting_dataset())
trainer.train()
rank = torch.distributed.get_rank()
torch.save(adapter_state(model), out / f"rank{rank}.pt")
torch.save(trainer.state.log_history, out / f"log{rank}.pt")
