"""Roofline cost model: latency and memory of each decoder layer under each kernel and placement.

Every term is `max(work / rate, bytes / bandwidth)` with the rates of a `DeviceProfile`:

- a Linear with kernel k on N tokens: `max(2 N out in (1 - s_k) / flops_k, weight_bytes_k / memory_bw)`
  plus `out * in (1 - s) / dequant_per_s_k` for kernels that dequantize the kept packed weights on
  every call, and `out * in / unmask_per_s_k` more for a pruned layer (expanding them through its mask)
  (`s_k` is the sparsity the kernel skips: 0.5 for 2:4, the layer's for unstructured);
- attention: `4 B T^2 heads head_dim / 2` FLOP for causal prefill, reading the KV cache at decode;
- norms, activations, rotary and residuals: about `B T (12 hidden + 3 intermediate)` float32
  values moved at `elementwise_bandwidth`;
- fixed per-call costs: `layer_overhead_s` per decoder layer plus `call_overhead_s` per Linear of
  a dequantizing kernel (measured by `profile_this_machine`). Launching work overlaps doing it
  (a GPU runs asynchronously), so a layer takes the larger of its launch costs and its work; on a
  CPU the launch costs are small next to the work;
- a streamed layer (weights not resident) also reads its packed weights from storage on every
  pass, overlapped with its compute (double buffering): `max(compute, bytes / storage_bw)`.

Workloads: inference (prefill a prompt, then decode tokens one at a time with the KV cache; every
exit's head runs on each new token for voting) and one Edge-LLM tuning step (forward to the
active exit, backward through its window, averaged over how often each exit is sampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from edge_llm.luc.facts import layer_setting, policy_of
from edge_llm.luc.ggml_linear import GGMLEmbedding, GGMLLinear
from edge_llm.luc.linear import LUCLinear
from edge_llm.luc.policy import LUCPolicy
from edge_llm.modeling import find_decoder_parts
from edge_llm.scheduling.devices import DeviceProfile, Kernel
from edge_llm.scheduling.kernels import FP16_BYTES, KERNELS, kernel_type
from edge_llm.scheduling.spec import LayerSpec
from edge_llm.tuner.model import edge_config_of

ACTIVATION_BYTES = 4


@dataclass(frozen=True)
class ModelSpec:
    layers: tuple[LayerSpec, ...]
    vocab_size: int
    hidden_size: int
    other_bytes: int  # embeddings, final norm, LM head and anything else always resident
    exits: tuple[int, ...] = ()
    backprop_depth: int = 0
    exit_sampling: str = "curriculum"
    window_input: str = "adapted"
    lora_params: int = 0

    @classmethod
    def from_model(cls, model: nn.Module, policy: LUCPolicy | None = None, edge_config: object = None) -> ModelSpec:
        """Describe a transformers causal LM (a real model, or one built on the meta device).

        Bits and sparsity come from `policy` (default: the policy the model was compressed with,
        `policy_of(model)`), or from its `LUCLinear` layers, or are 16/0. `edge_config` (default:
        the model's Edge-LLM adapter, `edge_config_of(model)`) adds exits, windows and adapters.
        """
        policy = policy if policy is not None else policy_of(model)
        edge_config = edge_config if edge_config is not None else edge_config_of(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        parts = find_decoder_parts(base)
        decoder_layers = list(parts.layers(base))
        if policy is not None and len(policy.layers) != len(decoder_layers):
            raise ValueError(f"The LUC policy has {len(policy.layers)} layers; the model has {len(decoder_layers)}.")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = []
        float_linear_bytes = 0
        for index, layer in enumerate(decoder_layers):
            blocks = [m for m in layer.modules() if isinstance(m, GGMLLinear)]
            compressed = [m for m in layer.modules() if isinstance(m, LUCLinear)]
            stored = None
            if blocks:  # compressed for llama.cpp: the blocks' bytes exactly, the width `layer_setting` gives
                linears = tuple((m.out_features, m.in_features) for m in blocks)
                (bits, sparsity), structure = layer_setting(layer), "unstructured"
                group_size, stored = min(m.kind.block for m in blocks), sum(m.weight.numel() for m in blocks)
            else:
                targets = policy.targets if policy is not None else None
                linears, left_in_float = _layer_linears(layer, compressed, targets)
                float_linear_bytes += sum(o * i for o, i in left_in_float) * FP16_BYTES
                if policy is not None:
                    bits, sparsity = policy.layers[index]
                    structure, group_size = policy.method.prune_structure, policy.method.group_size
                else:
                    (bits, sparsity), structure = layer_setting(layer), "unstructured"
                    group_size = compressed[0].group_size if compressed else 128
            layers.append(
                LayerSpec(
                    index=index,
                    linears=linears,
                    bits=bits,
                    sparsity=sparsity,
                    structure=structure,
                    group_size=group_size,
                    hidden_size=config.hidden_size,
                    intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
                    num_heads=config.num_attention_heads,
                    num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                    head_dim=head_dim,
                    luc=policy is not None or bool(compressed or blocks),
                    stored_bytes=stored,
                )
            )
        layer_param_ids = {id(p) for layer in decoder_layers for p in layer.parameters()}
        other = sum(
            p.numel() * FP16_BYTES
            for p in {id(p): p for p in base.parameters()}.values()
            if id(p) not in layer_param_ids
        )
        # llama.cpp blocks outside the layers (the token table, a head: buffers), a tied pair once.
        in_layers = {id(m) for layer in decoder_layers for m in layer.modules()}
        blocks = {
            id(m.weight): m.weight.numel()
            for m in base.modules()
            if isinstance(m, (GGMLLinear, GGMLEmbedding)) and id(m) not in in_layers
        }
        other += sum(blocks.values())
        # The Linears a targeted policy leaves in float are resident like the embeddings: no
        # kernel choice applies to them, but their bytes count.
        spec = dict(
            layers=tuple(layers),
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            other_bytes=other + float_linear_bytes,
        )
        if edge_config is not None:
            r = edge_config.r
            lora = sum(r * (o + i) for layer in layers for o, i in layer.linears) if edge_config.r else 0
            spec.update(
                exits=tuple(edge_config.exit_layers),
                backprop_depth=edge_config.backprop_depth,
                exit_sampling=edge_config.exit_sampling,
                window_input=edge_config.window_input,
                lora_params=lora,
            )
        return cls(**spec)


def _layer_linears(
    layer: nn.Module, compressed: list[LUCLinear], targets: list[str] | None
) -> tuple[tuple[tuple[int, int], ...], list[tuple[int, int]]]:
    """(out, in) of a decoder layer's Linears that LUC compresses (its `LUCLinear`s, or, where it is
    not compressed yet, those `targets` names: all without targets) and of those it leaves in float."""
    shapes = {name: shape for name, module in layer.named_modules() if (shape := _linear_shape(module)) is not None}
    if compressed:
        return tuple((m.out_features, m.in_features) for m in compressed), list(shapes.values())
    chosen = {name for name in shapes if targets is None or name.rsplit(".", 1)[-1] in targets}
    return tuple(shapes[name] for name in shapes if name in chosen), [s for n, s in shapes.items() if n not in chosen]


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return None


@dataclass(frozen=True)
class Workload:
    """What the schedule is optimised for.

    - `mode="inference"`: prefill `prompt_tokens`, then generate `decode_tokens` one by one, for
      `batch_size` sequences; objective: total time.
    - `mode="tuning"`: Edge-LLM training steps on `batch_size x seq_len` tokens; objective: the
      mean step time over the exits (weighted by how often `exit_sampling` picks each).
    """

    mode: str = "inference"
    batch_size: int = 1
    prompt_tokens: int = 512
    decode_tokens: int = 128
    seq_len: int = 512

    def __post_init__(self) -> None:
        if self.mode not in ("inference", "tuning"):
            raise ValueError(f"Workload.mode must be 'inference' or 'tuning', got {self.mode!r}.")
        for name, least in (("batch_size", 1), ("prompt_tokens", 1), ("seq_len", 1), ("decode_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"Workload.{name} must be an integer of at least {least}, got {value!r}.")


@dataclass(frozen=True)
class Option:
    """One way to run one layer, with its predicted cost."""

    kernel: str
    placement: str  # "resident" or "streamed"
    memory_bytes: int  # resident weight bytes (0 when streamed)
    stream_bytes: int  # bytes read from storage per pass when streamed (else 0)
    seconds: float  # contribution to the workload objective
    detail: dict[str, float] = field(default_factory=dict)


def weight_bytes(layer: LayerSpec, kernel: str) -> int:
    """Bytes of the layer's weights in the memory format `kernel` computes from."""
    return kernel_type(kernel).storage_bytes(layer)


def compatible_kernels(layer: LayerSpec, device: DeviceProfile) -> list[str]:
    """Kernels that can run this layer on this device."""
    return [name for name in device.kernels if KERNELS[name].fits(layer)]


def _linear_seconds(layer: LayerSpec, kernel: str, spec: Kernel, tokens: int, device: DeviceProfile) -> float:
    flops = 2 * tokens * layer.params * KERNELS[kernel].work(layer)
    seconds = max(flops / spec.flops, weight_bytes(layer, kernel) / device.memory_bandwidth)
    if KERNELS[kernel].dequantizes and spec.dequant_per_s:
        # Only the kept weights are stored packed; a pruned layer then expands them through its mask.
        seconds += layer.params * (1 - layer.sparsity) / spec.dequant_per_s
        if layer.sparsity and spec.unmask_per_s:
            seconds += layer.params / spec.unmask_per_s
    return seconds


def _attention_and_elementwise(
    layer: LayerSpec, batch: int, tokens: int, context: int, device: DeviceProfile, flops_rate: float
) -> float:
    """Seconds of the non-Linear work of a layer for `tokens` new tokens attending to `context`."""
    attention_flops = 4 * batch * tokens * context * layer.num_heads * layer.head_dim
    kv_bytes = batch * context * 2 * layer.num_kv_heads * layer.head_dim * FP16_BYTES
    attention = max(attention_flops / flops_rate, kv_bytes / device.memory_bandwidth)
    moved = batch * tokens * (12 * layer.hidden_size + 3 * layer.intermediate_size) * ACTIVATION_BYTES
    return attention + moved / device.elementwise_bandwidth


def _compute_rate(device: DeviceProfile) -> float:
    dense = [device.kernels[k].flops for k in ("dense_fp16", "dense_bf16", "dense_fp32") if k in device.kernels]
    return max(dense) if dense else max(k.flops for k in device.kernels.values())


def layer_forward_seconds(
    layer: LayerSpec, kernel: str, device: DeviceProfile, batch: int, tokens: int, context: int
) -> float:
    """Predicted seconds of one forward pass of the layer (resident weights)."""
    spec = device.kernels[kernel]
    work = _linear_seconds(layer, kernel, spec, batch * tokens, device) + _attention_and_elementwise(
        layer, batch, tokens, context, device, _compute_rate(device)
    )
    launch = device.layer_overhead_s + len(layer.linears) * spec.call_overhead_s
    return max(work, launch)


def exit_frequencies(spec: ModelSpec) -> dict[int, float]:
    """How often each exit is the active one over a run: equally, for every sampling rule."""
    if not spec.exits:
        return {len(spec.layers) - 1: 1.0}
    return {e: 1.0 / len(spec.exits) for e in spec.exits}


def layer_options(layer: LayerSpec, spec: ModelSpec, device: DeviceProfile, workload: Workload) -> list[Option]:
    """Every (kernel, placement) of one layer with its latency contribution and memory."""
    options = []
    for kernel in compatible_kernels(layer, device):
        if workload.mode == "inference":
            context = workload.prompt_tokens + workload.decode_tokens // 2
            prefill = layer_forward_seconds(
                layer, kernel, device, workload.batch_size, workload.prompt_tokens, workload.prompt_tokens // 2
            )
            decode = layer_forward_seconds(layer, kernel, device, workload.batch_size, 1, context)
            passes = {"prefill": prefill, "decode": decode}
            counts = {"prefill": 1, "decode": workload.decode_tokens}
            if spec.window_input == "backbone" and spec.exits:
                # The backbone stream plus the stream of each exit whose window holds the layer.
                repeats = 1 + sum(1 for e in spec.exits if e - spec.backprop_depth < layer.index <= e)
                counts = {k: v * repeats for k, v in counts.items()}
        else:
            forward = layer_forward_seconds(
                layer, kernel, device, workload.batch_size, workload.seq_len, workload.seq_len // 2
            )
            backward = 2 * forward  # gradients w.r.t. inputs and adapters, and the re-run of dequantization
            frequencies = exit_frequencies(spec)
            runs_forward = sum(f for e, f in frequencies.items() if e >= layer.index)
            runs_backward = sum(f for e, f in frequencies.items() if e - max(spec.backprop_depth, 1) < layer.index <= e)
            passes = {"forward": forward, "backward": backward}
            counts = {"forward": runs_forward, "backward": runs_backward}
        resident = weight_bytes(layer, kernel)
        compute = sum(passes[k] * counts[k] for k in passes)
        options.append(Option(kernel, "resident", resident, 0, compute, dict(passes)))
        # The runtime streams LUCLinear tensors from the bundle's file; a plain float layer stays resident.
        if layer.luc and KERNELS[kernel].streamable(layer):
            stream = layer.packed_bytes()
            read = stream / device.storage_bandwidth
            seconds = sum(max(passes[k], read) * counts[k] for k in passes)
            options.append(Option(kernel, "streamed", 0, stream, seconds, {**passes, "stream_read": read}))
    if not options:
        raise ValueError(
            f"Device {device.name!r} has no kernel for layer {layer.index} ({layer.bits} bits, sparsity "
            f"{layer.sparsity}); its kernels: {sorted(device.kernels)}."
        )
    return options


def fixed_costs(spec: ModelSpec, device: DeviceProfile, workload: Workload) -> tuple[float, int]:
    """Seconds and resident bytes outside the decoder layers' weights: LM heads of the exits, KV
    cache (inference) or activations, adapters and optimizer state (tuning)."""
    head_flops_per_token = 2 * spec.vocab_size * spec.hidden_size
    rate = _compute_rate(device)
    head_bytes = spec.vocab_size * spec.hidden_size * FP16_BYTES
    exits = max(len(spec.exits), 1)
    if workload.mode == "inference":
        tokens = workload.decode_tokens + 1  # every new token, and the last prompt token, go through every exit head
        seconds = (
            tokens
            * exits
            * max(workload.batch_size * head_flops_per_token / rate, head_bytes / device.memory_bandwidth)
        )
        kv = sum(
            workload.batch_size
            * (workload.prompt_tokens + workload.decode_tokens)
            * 2
            * layer.num_kv_heads
            * layer.head_dim
            * FP16_BYTES
            for layer in spec.layers
        )
        working = workload.batch_size * workload.prompt_tokens * spec.hidden_size * ACTIVATION_BYTES * 8
        working += workload.batch_size * spec.vocab_size * ACTIVATION_BYTES * exits
        return seconds, spec.other_bytes + kv + working
    tokens = workload.batch_size * workload.seq_len
    seconds = 3 * tokens * head_flops_per_token / rate  # forward and backward through the head, in chunks
    depth = max(spec.backprop_depth, 1) if spec.exits else len(spec.layers)
    layer = spec.layers[0]
    saved_per_layer = tokens * (10 * layer.hidden_size + 4 * layer.intermediate_size) * ACTIVATION_BYTES
    optimizer = spec.lora_params * 4 * 4  # weights, gradients and two AdamW moments in float32
    chunk = 1024 * spec.vocab_size * ACTIVATION_BYTES * 2
    return seconds, spec.other_bytes + depth * saved_per_layer + optimizer + chunk
