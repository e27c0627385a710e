"""Run a GGUF file in llama.cpp (llama-cpp-python): the logits of a window, perplexity and the
next-token choices over windows, greedy generation, and the time of a request (a prompt, then
tokens one at a time).

The one place edge-llm runs llama.cpp — the demo, the speed profile of the llama.cpp target, the
benchmarks and the tests read it — so every figure measured in llama.cpp is computed one way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge_llm._warnings import quiet_native_output

logger = logging.getLogger(__name__)


class LlamaCppModel:
    """A GGUF file in llama.cpp, with a LoRA adapter GGUF (`lora_path`) applied if given.

    `context`: tokens the context holds (a window, or a request's prompt and generated tokens);
    `batch`: tokens llama.cpp evaluates per call (a prompt longer than it is split); `threads`:
    default torch's; `all_logits`: keep the logits of every position (for `logits`), or only the
    last (a request as an application makes it, for `time`)."""

    def __init__(
        self,
        path: str | Path,
        lora_path: str | Path | None = None,
        context: int = 256,
        batch: int = 512,
        threads: int | None = None,
        all_logits: bool = True,
    ) -> None:
        try:
            import llama_cpp
        except ImportError as error:
            raise ImportError('Running a GGUF file needs llama-cpp-python: pip install "edge-llm[gguf]"') from error
        threads = threads or torch.get_num_threads()
        with quiet_native_output(logger):  # a line per adapter tensor it places
            self.runtime = llama_cpp.Llama(
                model_path=str(path),
                lora_path=None if lora_path is None else str(lora_path),
                n_ctx=context,
                n_batch=batch,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=all_logits,
                verbose=False,
            )

    @classmethod
    def for_requests(
        cls, path: str | Path, prompt_tokens: int, decode_tokens: int, threads: int | None = None
    ) -> LlamaCppModel:
        """The file set up as an application runs a request (`time`): the prompt in one batch, the
        logits of the last position only."""
        context = prompt_tokens + decode_tokens
        return cls(path, context=context, batch=prompt_tokens, threads=threads, all_logits=False)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(tokens x vocabulary) float32 logits of every position of `tokens`, from an empty context."""
        self.runtime.reset()
        self.runtime.eval(tokens.tolist())
        return torch.from_numpy(np.array(self.runtime.scores[: len(tokens)], dtype=np.float32))

    def greedy(self, prompt: list[int], count: int, stop: int | None = None) -> list[int]:
        """Up to `count` tokens generated greedily after `prompt` (from an empty context), ending
        before `stop` (the end-of-sequence token): what an application decoding at temperature 0
        gets. The context must hold the prompt and `count` tokens."""
        self.runtime.reset()
        self.runtime.eval(prompt)
        generated: list[int] = []
        while len(generated) < count:
            token = int(np.argmax(self.runtime.scores[self.runtime.n_tokens - 1]))
            if token == stop:
                break
            generated.append(token)
            self.runtime.eval([token])
        return generated

    def time(self, prompt: list[int], decode: list[int]) -> dict[str, float]:
        """Seconds of a request from an empty context: the prompt ("prefill"), then `decode` fed
        one token at a time ("decode")."""
        self.runtime.reset()
        start = time.perf_counter()
        self.runtime.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for token in decode:
            self.runtime.eval([token])
        return {"prefill": prefill, "decode": time.perf_counter() - start}

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_windows(
    logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """(perplexity of every next token, the argmax at every position) of a model whose
    `logits_of(window)` gives (tokens x vocabulary) logits, over `windows` (count x tokens)."""
    nll, argmax = 0.0, []
    for window in windows:
        logp = logits_of(window).float().log_softmax(-1)
        nll -= logp[:-1].gather(-1, window[1:, None]).sum().item()
        argmax.append(logp.argmax(-1))
    return math.exp(nll / (windows.numel() - len(windows))), torch.stack(argmax)


def perplexity_in_llama_cpp(
    path: str | Path, windows: torch.Tensor, lora_path: str | Path | None = None, threads: int | None = None
) -> tuple[float, torch.Tensor, float]:
    """(perplexity, next-token argmax per position, tokens/s) of the GGUF at `path` (with the
    adapter at `lora_path`) in llama.cpp on `windows` (count x tokens), each from an empty context."""
    with LlamaCppModel(path, lora_path, context=windows.shape[1], threads=threads) as runner:
        began = time.perf_counter()
        perplexity, argmax = score_windows(runner.logits, windows)
        return perplexity, argmax, windows.numel() / (time.perf_counter() - began)
