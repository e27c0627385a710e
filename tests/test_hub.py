"""push_to_hub against a fake Hub HTTP server (no network): repository creation, upload, model card."""

import base64
import json

import httpx2
import pytest
import torch
from huggingface_hub.utils import set_client_factory
from peft import get_peft_model
from tiny_models import tiny_model

import edge_llm
from edge_llm.hub import push_to_hub
from edge_llm.luc import CompressionMethod, compress_model


class FakeHub:
    """Answers the Hub API calls an upload makes and keeps the committed files."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.created: list[str] = []
        self.calls: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.calls.append(f"{request.method} {path}")
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"])
            return httpx2.Response(200, json={"url": "https://huggingface.co/" + self.created[-1]})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if path.endswith("/commit/main"):
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return httpx2.Response(
                200,
                json={
                    "commitUrl": "https://huggingface.co/someone/repo/commit/" + "1" * 40,
                    "commitOid": "1" * 40,
                    "success": True,
                },
            )
        if path.startswith("/api/models/") and request.method == "GET":
            return httpx2.Response(200, json={"id": path.split("/api/models/")[1], "sha": "0" * 40, "siblings": []})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        return httpx2.Response(404, json={"error": f"not faked: {request.method} {path}"})


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    set_client_factory(lambda: httpx2.Client())


def test_push_an_edge_llm_adapter(hub):
    model = get_peft_model(
        tiny_model("llama", 4),
        edge_llm.EdgeLLMConfig(
            r=4, target_modules=["q_proj"], exit_layers=[1], voting="weighted", exit_weights=[0.25, 0.75]
        ),
    )
    push_to_hub(model, "someone/tiny-edge")
    assert hub.created == ["someone/tiny-edge"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= hub.files.keys()
    config = json.loads(hub.files["adapter_config.json"])
    assert config["peft_type"] == "EDGE_LLM" and config["exit_weights"] == [0.25, 0.75]
    card = hub.files["README.md"].decode()
    assert "library_name: peft" in card and "import edge_llm" in card and "AutoPeftModelForCausalLM" in card
    assert "| 1 | 0.250 |" in card and "| 3 | 0.750 |" in card


def test_push_a_luc_model(hub):
    model = tiny_model("llama", 4)
    compress_model(
        model, [(4, 0.5), (3, 0.0), (4, 0.5), (8, 0.0)], CompressionMethod(16, "rtn", "magnitude"), progress=False
    )
    push_to_hub(model, "someone/tiny-luc")
    assert {"config.json", "model.safetensors", "README.md"} <= hub.files.keys()
    assert json.loads(hub.files["config.json"])["quantization_config"]["quant_method"] == "edge_llm_luc"
    card = hub.files["README.md"].decode()
    assert "library_name: transformers" in card and "## LUC policy" in card
    assert "| 4 | 0.50 | 0, 2 |" in card and "| 3 | 0.00 | 1 |" in card
    # The uploaded weights are the packed ones.
    from safetensors.torch import load

    weights = load(hub.files["model.safetensors"])
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
