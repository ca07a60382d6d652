"""Hugging Face folders (config.json + weights): built in code, loaded offline, never running their code."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import run_captured
from compressadvise.errors import BadModel, InputNotFound, UntrustedPickle
from compressadvise.model.analysis import analyze
from compressadvise.model.hf import HF_HINT, is_hf_folder, load_hf_folder
from compressadvise.model.loading import load_model

BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(transformers, tmp_path_factory):
    """A tiny BertModel saved as one safetensors file, and its parameter count."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT))
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def llama(transformers, tmp_path_factory):
    """A tiny decoder with its LM head tied to the embedding; a short position limit (8 < 16 tokens)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, model


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def _weight_folder(tmp_path, config: dict | str | bytes) -> tuple:
    """A folder with a hand-written config and a small safetensors file (no transformers needed)."""
    tensors = {"embed.weight": torch.randn(50, 8), "layer.0.attention.q.weight": torch.randn(8, 8),
               "layer.0.attention.q.bias": torch.randn(8), "head.weight": torch.randn(4, 8)}
    save_file(tensors, tmp_path / "model.safetensors")
    raw = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (tmp_path / "config.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)
    return tmp_path, sum(t.numel() for t in tensors.values())


def test_bert_folder_loads_runs_and_analyzes(bert, capsys):
    folder, saved = bert
    assert is_hf_folder(folder)
    loaded = load_model(folder)
    assert loaded.format == "hf_folder" and loaded.module is not None and loaded.has_graph
    assert not loaded.module.training
    (ids,) = loaded.example_inputs
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (1, 16) and int(ids.max()) < BERT["vocab_size"]
    out = loaded.module(*loaded.example_inputs)
    assert isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out)
    assert any("bert" in n and "transformers" in n for n in loaded.notes)
    report = analyze(loaded)
    print("roles_source:", report.roles_source)
    assert report.roles_source
    assert report.total_params == _params(saved)
    inventoried = {t for layer in report.layers for t in layer.tensors}
    two_d = {n for n, p in saved.named_parameters() if p.dim() == 2}
    assert two_d and two_d <= inventoried
    assert report.family == "transformer_encoder"
    assert report.macs_total and report.macs_total > 0  # the example input ran through the model


def test_recommend_cli_on_a_folder(bert, capsys):
    folder, _ = bert
    code, out, err = run_captured(capsys, "recommend", folder, "--target", "ane-a17", "--no-measure", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"]["format"] == "hf_folder" and plan["steps"]
    assert "Loading weights" not in err  # transformers' progress bars stay off the terminal


def test_digest_covers_config_and_weights(bert, tmp_path):
    folder, _ = bert
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    same = load_hf_folder(tmp_path, trust_pickle=False).sha256
    assert same == load_model(folder).sha256
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.2}))
    assert load_hf_folder(tmp_path, trust_pickle=False).sha256 != same


def test_decoder_tie_found_and_positions_bound_the_example(llama):
    folder, saved = llama
    loaded = load_model(folder)
    assert type(loaded.module).__name__ == type(saved).__name__  # the LM head is kept (not the bare AutoModel)
    (ids,) = loaded.example_inputs
    assert tuple(ids.shape) == (1, 8) and int(ids.max()) < 100
    report = analyze(loaded)
    assert report.tied_groups and any("lm_head.weight" in g for g in report.tied_groups)
    assert report.total_params == _params(saved)
    assert report.family == "decoder_lm"


def test_sharded_safetensors_with_and_without_transformers(bert, tmp_path, monkeypatch):
    _, saved = bert
    saved.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert analyze(load_model(tmp_path)).total_params == _params(saved)
    monkeypatch.setitem(sys.modules, "transformers", None)
    weights = load_model(tmp_path)
    assert weights.module is None and weights.tensor_count == len(saved.state_dict())
    assert analyze(weights).total_params == _params(saved)


def test_without_transformers_weight_inventory_and_hint(bert, monkeypatch):
    folder, saved = bert
    monkeypatch.setitem(sys.modules, "transformers", None)
    loaded = load_model(folder)
    assert loaded.module is None and loaded.weight_only and not loaded.has_graph
    assert loaded.format == "hf_folder" and any(HF_HINT in n for n in loaded.notes)
    report = analyze(loaded)
    assert report.total_params == _params(saved)
    assert {n for n, p in saved.named_parameters() if p.dim() == 2} <= {t for x in report.layers for t in x.tensors}


def test_custom_code_is_never_imported(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    folder, total = _weight_folder(tmp_path, {
        "model_type": "evil", "architectures": ["EvilModel"], "vocab_size": 50,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}})
    loaded = load_model(folder)
    assert not marker.exists()
    assert loaded.module is None and any("custom modeling code" in n and "not run" in n for n in loaded.notes)
    assert analyze(loaded).total_params == total
    assert not marker.exists()


def test_unknown_model_type_falls_back_to_weights(transformers, tmp_path):
    folder, total = _weight_folder(tmp_path, {"model_type": "no-such-architecture", "vocab_size": 50})
    loaded = load_model(folder)
    assert loaded.module is None and any("could not build" in n for n in loaded.notes)
    assert analyze(loaded).total_params == total


@pytest.mark.parametrize("config", ["{not json", "[1, 2, 3]", b"\xff\xfe{}", "{}" + " " * (1 << 20), "[" * 100_000])
def test_hostile_config_is_one_line_bad_model(tmp_path, capsys, config):
    folder, _ = _weight_folder(tmp_path, config)
    with pytest.raises(BadModel) as e:
        load_model(folder)
    assert "config.json" in str(e.value) and "\n" not in e.value.one_line() and len(e.value.one_line()) < 300
    code, _, err = run_captured(capsys, "analyze", folder)
    assert code == BadModel.exit_code == 4
    assert "Traceback" not in err


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "missing.safetensors", 7])
def test_hostile_shard_index(tmp_path, shard):
    folder, _ = _weight_folder(tmp_path, {"model_type": "bert"})
    (folder / "model.safetensors").rename(folder / "part.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"embed.weight": "part.safetensors", "head.weight": shard}}))
    with pytest.raises(BadModel, match="shard"):
        load_model(folder)


def test_corrupt_weights_in_a_folder(tmp_path):
    folder, _ = _weight_folder(tmp_path, {"model_type": "bert"})
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-20])  # a tensor now runs past the end
    with pytest.raises(BadModel, match="safetensors"):
        load_model(folder)


def test_folder_without_weights_is_still_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_hf_folder(tmp_path)
    with pytest.raises(InputNotFound, match="directory"):
        load_model(tmp_path)


def test_pytorch_bin_state_dict_and_pickled_code(bert, tmp_path, monkeypatch):
    folder, saved = bert
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(saved.state_dict(), tmp_path / "pytorch_model.bin")
    assert load_model(tmp_path).module is not None
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)
        weights = load_model(tmp_path)
        assert weights.module is None and analyze(weights).total_params == _params(saved)
    marker = tmp_path / "ran"
    torch.save({"w": _Evil(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UntrustedPickle):
        load_model(tmp_path)
    assert not marker.exists()


class _Evil:
    """Unpickling it would create the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_vision_example_input(transformers, tmp_path):
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(cfg).save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    (x,) = loaded.example_inputs
    assert tuple(x.shape) == (1, 3, 16, 16) and x.is_floating_point()


def test_a_decoders_kv_cache_joins_its_weights_in_the_runtime_memory(llama, bert, capsys):
    """The cache shape comes from config.json (2 layers, 2 KV heads, head dim 32 / 2 = 16): at C
    tokens it holds 2 x 2 x 2 x 16 x C fp16 values; an encoder has none; a context over the
    position limit (8) is refused before any work."""
    import json as _json

    from cli_helpers import run_captured

    folder, _ = llama
    report = analyze(load_model(str(folder)), stats=False)
    assert (report.kv.layers, report.kv.kv_heads, report.kv.head_dim, report.kv.max_context) == (2, 2, 16, 8)
    code, out, err = run_captured(capsys, "recommend", folder, "--no-measure", "--context-length", "4", "--json")
    assert code == 0, err
    m = _json.loads(out)["memory"]
    assert m["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * 2 and m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"]
    assert m["weights_bytes"] == _json.loads(out)["prediction"]["bytes_after"] and m["label"] == "estimate"
    code, out, _ = run_captured(capsys, "recommend", folder, "--no-measure")
    assert code == 0 and "runtime memory at 8 tokens" in out  # the model's own limit by default
    code, _, err = run_captured(capsys, "recommend", folder, "--no-measure", "--context-length", "9")
    assert code == 2 and "position limit (8)" in err
    assert analyze(load_model(str(bert[0])), stats=False).kv is None


def test_kv_shape_from_config_keys_of_either_naming():
    """GPT-2 names its sizes n_layer/n_head/n_embd/n_positions: 12 x 12 heads x 64 at 1,024 tokens is the
    well-known 36 MiB fp16 cache; grouped-query attention (Llama 3 8B: 8 KV heads of 32) counts the KV heads."""
    from compressadvise.model.decoder import from_config

    gpt2 = from_config({"architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_head": 12, "n_embd": 768,
                        "n_positions": 1024}, "config.json")
    assert gpt2.bytes_at(1024) == 2 * 12 * 12 * 64 * 1024 * 2 == 36 * 2**20
    llama3 = from_config({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
                          "num_key_value_heads": 8, "hidden_size": 4096}, "config.json")
    assert (llama3.kv_heads, llama3.head_dim, llama3.max_context) == (8, 128, None)
    assert from_config({"architectures": ["BertModel"], "num_hidden_layers": 2}, "x") is None
