"""`python -m edge_llm_cli`: the `edge-llm` command."""

from edge_llm_cli import console

console()
