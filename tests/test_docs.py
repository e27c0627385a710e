"""Every relative link and image in the README and docs/ points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


# docs/api.md's name column, as `callable(param, param=default, ...)`: every parameter it names must
# be the callable's, and every default it states must be the code's. The callables it documents:
def _api_callables() -> dict:
    import edge_llm
    from edge_llm.export import bundle, executorch, gguf, gguf_lora, gguf_run
    from edge_llm.luc import calibration_tokens, compress_model, profile_sensitivity
    from edge_llm.luc.ggml import llama_quantize
    from edge_llm.runtime import load_bundle
    from edge_llm.scheduling import Workload, profile_this_machine, schedule
    from edge_llm.tuner.planning import plan_training

    return {
        "EdgeLLMConfig": edge_llm.EdgeLLMConfig,
        "LUCConfig": edge_llm.LUCConfig,
        "EdgeTrainer": edge_llm.EdgeTrainer,
        "calibration_tokens": calibration_tokens,
        "compress_model": compress_model,
        "profile_sensitivity": profile_sensitivity,
        "edge_llm.enable_chunked_loss": edge_llm.enable_chunked_loss,
        "edge_llm.tuner.planning.plan_training": plan_training,
        "Workload": Workload,
        "profile_this_machine": profile_this_machine,
        "schedule": schedule,
        "export": bundle.export,
        "write_gguf": gguf.write_gguf,
        "write_gguf_lora": gguf_lora.write_gguf_lora,
        "load_gguf": edge_llm.export.load_gguf,
        "llama_quantize": llama_quantize,
        "gguf_fixed_bytes": gguf.gguf_fixed_bytes,
        "perplexity_in_llama_cpp": gguf_run.perplexity_in_llama_cpp,
        "LlamaCppModel": gguf_run.LlamaCppModel,
        "write_pte": executorch.write_pte,
        "write_program": executorch.write_program,
        "load_bundle": load_bundle,
    }


SIGNATURE = re.compile(r"`([\w.]+)\(([^`]*)\)`")


def _api_signatures() -> list[tuple[str, str]]:
    """(name, arguments) of every `name(arguments)` in the name column of docs/api.md's tables."""
    rows = [
        line.split("|")[1] for line in (ROOT / "docs" / "api.md").read_text().splitlines() if line.startswith("| `")
    ]
    return [match.groups() for row in rows for match in SIGNATURE.finditer(row)]


def test_the_api_page_names_real_parameters_and_the_codes_defaults():
    import ast
    import inspect

    callables = _api_callables()
    documented, wrong = set(), []
    for name, arguments in _api_signatures():
        if name not in callables:
            continue
        documented.add(name)
        parameters = inspect.signature(callables[name]).parameters
        for argument in (a.strip() for a in arguments.split(",")):
            if argument in ("...", "") or argument.startswith("**"):
                continue
            parameter, _, default = argument.partition("=")
            if parameter not in parameters:
                wrong.append(f"{name}: no parameter {parameter!r}")
            elif default:
                stated, actual = ast.literal_eval(default), parameters[parameter].default
                if stated != actual:
                    wrong.append(f"{name}: {parameter} defaults to {actual!r}, the page says {stated!r}")
    assert documented == set(callables), f"api.md lost the rows of {sorted(set(callables) - documented)}"
    assert not wrong, wrong


@pytest.mark.parametrize("name", ["EdgeLLMConfig", "LUCConfig"])
def test_the_api_page_lists_every_field_of_the_two_configs(name):
    import inspect

    target = _api_callables()[name]
    arguments = next(arguments for documented, arguments in _api_signatures() if documented == name)
    listed = {a.strip().partition("=")[0] for a in arguments.split(",")}
    own = set(inspect.signature(target).parameters) - {"self", "kwargs"}
    if name == "EdgeLLMConfig":  # a LoraConfig: the page lists LoRA's own fields as "..."
        from peft import LoraConfig

        own -= set(inspect.signature(LoraConfig).parameters) - {"r", "lora_alpha", "target_modules"}
    assert own <= listed, f"api.md does not list {sorted(own - listed)}"
