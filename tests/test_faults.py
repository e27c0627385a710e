"""Saves killed with SIGKILL at chosen points, in a subprocess: the previous output still loads,
and nothing half-written is left where a loader looks."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fault_models import new_bundle_parts

from edge_llm._io import atomic_directory
from edge_llm.export import export, verify_bundle
from edge_llm.luc import CompressionMethod, LUCPolicy

WORKER = Path(__file__).with_name("fault_worker.py")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def killed(kind: str, out: Path, point: str, n: int = 1, *flags: str) -> None:
    done = subprocess.run(
        [sys.executable, str(WORKER), kind, str(out), point, str(n), *flags], capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "bundle"
    export(*new_bundle_parts(seed=0), out)
    return out, verify_bundle(out)


@pytest.mark.parametrize(
    ("point", "flags", "swapped"),
    [
        ("fsync", (), False),  # every new file written, none switched in
        ("exchange", (), False),  # right before the switch
        ("rmtree", (), True),  # right after it, the old bundle not yet deleted
    ],
)
def test_an_export_killed_at_any_point_leaves_a_whole_bundle(old_bundle, tmp_path, point, flags, swapped):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(old_bundle[0], out)
    killed("bundle", out, point, 1, *flags)
    manifest = verify_bundle(out)  # every file present with its recorded hash
    assert (manifest == old_bundle[1]) is not swapped
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["bundle"]


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_repaired_by_the_next_write(old_bundle, tmp_path):
    import shutil

    out = tmp_path / "bundle"
    shutil.copytree(old_bundle[0], out)
    # Old bundle moved aside, new one not yet in place: the one window the fallback has.
    killed("bundle", out, "switch", 1, "--no-exchange")
    assert not out.exists() and list(tmp_path.glob(".bundle.previous-*"))
    with pytest.raises(RuntimeError), atomic_directory(out):
        raise RuntimeError("the next write fails too")
    assert verify_bundle(out) == old_bundle[1]
    # An export without overwrite after such a kill puts the old bundle back and keeps it.
    killed("bundle", out, "switch", 1, "--no-exchange")
    assert not out.exists()
    with pytest.raises(FileExistsError, match="interrupted write"):
        export(*new_bundle_parts(seed=1), out)
    assert verify_bundle(out) == old_bundle[1]


@pytest.mark.parametrize(("point", "swapped"), [("exchange", False), ("rmtree", True)])
def test_a_luc_save_pretrained_killed_midway_leaves_a_loadable_checkpoint(tmp_path, point, swapped):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "luc"
    old, _ = new_bundle_parts(seed=0)
    old.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")  # the user's file, kept by every save
    killed("luc", out, point)
    x = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
        assert torch.equal(logits, old(input_ids=x).logits) is not swapped
    assert (out / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("point", ["fsync", "replace"])
def test_a_json_write_killed_midway_keeps_the_old_file(tmp_path, point):
    out = tmp_path / "policy.json"
    old = LUCPolicy([(4, 0.5)] * 4, CompressionMethod(16, "rtn", "magnitude"))
    old.save(out)
    killed("policy", out, point)
    assert LUCPolicy.load(out) == old


def test_a_copied_luc_model_saves_itself_not_the_original(tmp_path):
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    model, _ = new_bundle_parts(seed=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.fill_(2.0)
    twin.save_pretrained(tmp_path / "twin")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "twin")
    assert (reloaded.model.norm.weight == 2.0).all() and not (model.model.norm.weight == 2.0).all()


def test_an_adapter_config_is_never_half_written(tmp_path, monkeypatch):
    import json
    import os

    from edge_llm import EdgeLLMConfig

    config = EdgeLLMConfig(r=2, target_modules=["q_proj"], exit_layers=[1])
    config.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies before the new config is switched in

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        EdgeLLMConfig(r=4, target_modules=["q_proj"], exit_layers=[1]).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_text() == before and json.loads(before)["r"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]


def test_a_luc_save_keeps_every_file_it_does_not_own_and_clears_what_killed_saves_left(tmp_path):
    out = tmp_path / "luc"
    out.mkdir()
    mine = {
        "adapter_model.safetensors": b"adapter",
        "adapter_config.json": b"{}",
        "training_args.bin": b"args",
        "my_embeddings.safetensors": b"embeddings",
    }
    for name, data in mine.items():
        (out / name).write_bytes(data)
    killed("luc", out, "exchange")  # leaves its staging folder behind
    assert list(tmp_path.glob(".luc.partial-*"))
    model, _ = new_bundle_parts(seed=0)
    model.save_pretrained(out)
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".luc.partial-*"))


def test_a_save_through_a_symlinked_folder_writes_where_it_points_and_keeps_the_link(tmp_path):
    disk = tmp_path / "bigger-disk" / "luc"
    disk.mkdir(parents=True)
    (disk / "notes.txt").write_text("mine")
    link = tmp_path / "luc"
    link.symlink_to(disk, target_is_directory=True)
    model, _ = new_bundle_parts(seed=0)
    model.save_pretrained(link)
    assert link.is_symlink() and (disk / "model.safetensors").is_file() and (disk / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger-disk", "luc"]  # nothing left beside the link


def test_saved_files_and_folders_get_the_modes_a_plain_write_gives(tmp_path):
    import os
    import stat

    from edge_llm._io import save_json

    previous = os.umask(0o022)
    try:
        model, _ = new_bundle_parts(seed=0)
        model.save_pretrained(tmp_path / "luc")
        save_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "luc").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "luc" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_json_files_with_non_numbers_or_deep_nesting_are_refused_by_name(tmp_path):
    from edge_llm._io import load_json

    cases = {
        "nan.json": ('{"bits": NaN}', "it holds NaN"),
        "inf.json": ('{"bits": -Infinity}', "it holds -Infinity"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "cut.json": ('{"bits": ', "is not a JSON LUC policy"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as refused:
            load_json(tmp_path / name, "LUC policy")
        assert name in str(refused.value)


def test_a_name_too_long_for_its_temporary_copy_is_refused_by_name_before_writing(tmp_path):
    from edge_llm._io import atomic_write_text

    long_name = "b" * 240  # the file system takes it, but not ".<name>.partial-<pid>-<random>" beside it
    refused = pytest.raises(ValueError, match=r"is 240 bytes; this file system allows 255 per name.* at most 229 bytes")
    with refused, atomic_directory(tmp_path / long_name):
        pass
    with pytest.raises(ValueError, match="at most 241 bytes"):
        atomic_write_text(tmp_path / ("c" * 250), "x")
    assert list(tmp_path.iterdir()) == []
