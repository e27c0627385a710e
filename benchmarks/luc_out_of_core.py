"""LUC on a model larger than memory: `compress_checkpoint` (`edge-llm compress --layer-by-layer`)
on a Llama-shaped config whose float32 decoder weights are 8 GiB, under a stated memory limit.

The checkpoint has random weights (this measures memory and time, not quality) and is written
one decoder layer per safetensors shard, so writing it never holds the model either. Then, each
in a process of its own:

1. `compress`: profile (output_mse, every candidate bit-width) and compress layer by layer at
   `--avg-bits`, with calibration tokens, writing the LUC checkpoint;
2. `load`: load the compressed checkpoint with `from_pretrained` and run one forward pass.

Each reports its peak resident memory (`ru_maxrss`; it counts the pages of memory-mapped files
the process has touched, such as a checkpoint `from_pretrained` maps). With `--cgroup DIR` (a
cgroup v1 memory controller folder or a cgroup v2 folder this user may create groups in), each
runs inside a new group limited to `--limit`: a run whose memory does not fit is killed by the
kernel, not reported. The group's own peak is recorded too; it counts the page cache of the files
read and written, which the kernel reclaims at the limit, so it sits at the limit on a run that
streams more data than the limit.

    python benchmarks/luc_out_of_core.py --workdir /big/disk --json benchmarks/results/luc_out_of_core.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine

GIB = 2**30


def write_random_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """A Llama-shaped checkpoint of random float32 weights, one decoder layer per shard (written
    layer by layer); returns the decoder's float32 bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
        dtype="float32",
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.intermediate
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shards = args.layers + 1
    weight_map, decoder_bytes = {}, 0
    for layer in range(args.layers):
        tensors = {
            f"model.layers.{layer}.{name}": torch.randn(shape, generator=generator) * 0.02
            for name, shape in shapes.items()
        }
        decoder_bytes += sum(t.numel() * 4 for t in tensors.values())
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(h)
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h)
        name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"  wrote layer {layer + 1}/{args.layers}", file=sys.stderr, flush=True)
    rest = {
        "model.embed_tokens.weight": torch.randn(args.vocab, h, generator=generator) * 0.02,
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": torch.randn(args.vocab, h, generator=generator) * 0.02,
    }
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return decoder_bytes


def compress_worker(args: argparse.Namespace) -> dict:
    from edge_llm.luc import LUCConfig
    from edge_llm.luc.streaming import compress_checkpoint

    tokens = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    config = LUCConfig(
        avg_bits=args.avg_bits, metric="output_mse", bits=(2, 3, 4, 8), sparsities=(0.0,), dataset=tokens
    )
    start = time.perf_counter()
    policy = compress_checkpoint(args.source, args.out, config)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    return {"seconds": seconds, "bits": [b for b, _ in policy.layers], "checkpoint_bytes": size}


def load_worker(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    import edge_llm  # noqa: F401  (registers LUC with transformers)

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.out)
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits
    return {"seconds": time.perf_counter() - start, "finite": bool(torch.isfinite(logits).all())}


WORKERS = {"compress": compress_worker, "load": load_worker}


class _Group:
    """A new memory cgroup under `parent` limited to `limit` bytes (v1 or v2), for one child."""

    def __init__(self, parent: Path, name: str, limit: int) -> None:
        self.path = parent / name
        self.path.mkdir()
        self.v1 = (self.path / "memory.limit_in_bytes").exists()
        (self.path / ("memory.limit_in_bytes" if self.v1 else "memory.max")).write_text(str(limit))
        if self.v1 and (self.path / "memory.memsw.limit_in_bytes").exists():
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping past the limit

    def enter(self) -> None:  # runs in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        file = self.path / ("memory.max_usage_in_bytes" if self.v1 else "memory.peak")
        return int(file.read_text()) if file.exists() else None

    def remove(self) -> None:
        self.path.rmdir()


def run_child(step: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--worker", step, "--source", str(args.source), "--out", str(args.out)]
    argv += ["--vocab", str(args.vocab), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    argv += ["--avg-bits", str(args.avg_bits)]
    group = _Group(Path(args.cgroup), f"luc-out-of-core-{step}-{os.getpid()}", args.limit) if args.cgroup else None
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, preexec_fn=group.enter if group else None, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{step} failed with status {done.returncode} (a kill by the memory limit is -9)")
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        if group is not None:  # resident and page cache together: at the limit, the kernel reclaims the cache
            result["cgroup_peak_with_page_cache_bytes"] = group.peak()
    finally:
        if group is not None:
            group.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the 8 GiB checkpoint and its compressed copy go")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--avg-bits", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=2 * GIB, help="memory limit in bytes (with --cgroup)")
    parser.add_argument("--cgroup", help="a memory cgroup folder to create the limited groups in")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    if args.workdir is None:
        parser.error("--workdir is required")
    args.source, args.out = args.workdir / "float32", args.workdir / "luc"
    start = time.perf_counter()
    decoder_bytes = write_random_checkpoint(args.source, args)
    seconds = time.perf_counter() - start
    print(f"random checkpoint: {decoder_bytes / GIB:.2f} GiB of float32 decoder weights, written in {seconds:.0f} s")
    results = {
        "machine": machine(),
        "decoder_float32_bytes": decoder_bytes,
        "limit_bytes": args.limit if args.cgroup else None,
    }
    results["settings"] = {
        k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab", "avg_bits", "samples", "seq_len")
    }
    for step in WORKERS:
        results[step] = run_child(step, args)
        peak = results[step]["peak_rss_bytes"] / GIB
        within = f", inside a memory cgroup limited to {args.limit / GIB:.2f} GiB" if args.cgroup else ""
        print(f"{step}: {results[step]['seconds']:.0f} s, peak RSS {peak:.2f} GiB{within}")
    print(f"compressed checkpoint: {results['compress']['checkpoint_bytes'] / GIB:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
