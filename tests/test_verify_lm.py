"""Language-model quality in verify: next-token agreement, KL and perplexity, overall and per
bucket of positions; `--text` tokenized by a Hugging Face folder's tokenizer.json."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import run_captured
from compressadvise.measure.verify_lm import _buckets, find_lm, lm_report


def _hand_case():
    """Two sequences of 4 tokens over a vocabulary of 3; the compressed logits differ at one position."""
    ids = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    ref = torch.zeros(2, 4, 3)
    ref[..., 0] = 2.0  # the original always prefers token 0
    test = ref.clone()
    test[0, 1] = torch.tensor([0.0, 0.0, 3.0])  # one position flips to token 2
    return ids, ref, test


def test_metrics_match_a_hand_computation():
    ids, ref, test = _hand_case()
    rep = lm_report([ids], {"logits": ref}, {"logits": test})
    assert rep.output == "logits" and rep.input_index == 0 and (rep.sequences, rep.length) == (2, 4)
    assert rep.next_token_agreement == pytest.approx(7 / 8)
    p = torch.softmax(torch.tensor([2.0, 0, 0]), -1)
    q = torch.softmax(torch.tensor([0.0, 0, 3.0]), -1)
    assert rep.kl_divergence == pytest.approx(float((p * (p / q).log()).sum()) / 8)
    # teacher forcing: positions 0..2 score the next token; under the original p(0) and p(1)=p(2)
    nll = {0: -math.log(p[0]), 1: -math.log(p[1]), 2: -math.log(p[2])}
    nexts = [1, 2, 1, 2, 0, 1]
    assert rep.perplexity_original == pytest.approx(math.exp(sum(nll[t] for t in nexts) / 6))
    nll_q = [nll[1], -math.log(q[2]), nll[1], nll[2], nll[0], nll[1]]  # position (0, 1) scores token 2 under q
    assert rep.perplexity_compressed == pytest.approx(math.exp(sum(nll_q) / 6))
    assert rep.perplexity_change == pytest.approx(rep.perplexity_compressed / rep.perplexity_original - 1)


def test_buckets_cut_at_the_edges_inside_the_sequence():
    assert _buckets(40) == [(0, 8), (8, 32), (32, 40)]
    assert _buckets(8) == [(0, 8)]
    ids = torch.randint(0, 50, (3, 40))
    ref, test = torch.randn(3, 40, 50), torch.randn(3, 40, 50)
    rep = lm_report([ids], {"o": ref}, {"o": test})
    assert [(b.start, b.stop, b.tokens) for b in rep.buckets] == [(0, 8, 24), (8, 32, 72), (32, 40, 24)]
    late = rep.buckets[-1]
    agree = (ref[:, 32:].argmax(-1) == test[:, 32:].argmax(-1)).double().mean()
    assert late.next_token_agreement == pytest.approx(float(agree))


def test_found_from_the_data_not_the_names():
    assert find_lm([torch.randn(4, 16)], {"logits": torch.randn(4, 10)}) is None  # a classifier
    assert find_lm([torch.randint(0, 9, (4, 16))], {"x": torch.randn(4, 10)}) is None
    assert find_lm([torch.randn(4, 3), torch.randint(0, 9, (4, 16))], {"a": torch.randn(4, 16, 9)}) == (1, "a")
    rep = lm_report([torch.randint(20, 30, (2, 8))], {"a": torch.randn(2, 8, 10)}, {"a": torch.randn(2, 8, 10)})
    assert rep.perplexity_original is None and "no perplexity" in rep.notes[0]


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """A 2-layer GPT-2 in a Hugging Face folder with a word-level tokenizer trained here, and a
    copy with perturbed weights (the 'compressed' model). Random weights: the metrics' mechanics
    are what is tested, not a language model's quality."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("gpt2")
    text = " ".join(f"the {w} sat on the mat and the {w} ran" for w in ("cat", "dog", "bird", "fox") * 40)
    (root / "corpus.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folders = {}
    for name, noise in (("orig", 0.0), ("comp", 0.05)):
        with torch.no_grad():
            m = transformers.GPT2LMHeadModel(cfg).eval()
            m.load_state_dict(model.state_dict())
            for p in m.parameters():
                p.add_(torch.randn_like(p) * noise)
        folders[name] = root / name
        m.save_pretrained(folders[name], safe_serialization=True)
        tok.save(str(folders[name] / "tokenizer.json"))
    folders["text"] = root / "corpus.txt"
    return folders


def test_verify_text_measures_the_language_model(gpt2_folders, capsys):
    f = gpt2_folders
    code, out, err = run_captured(capsys, "verify", f["orig"], f["comp"], "--text", f["text"], "--seq-len", "24",
                                  "--no-latency", "--no-drift", "--json")
    assert code == 0, err
    lm = json.loads(out)["language_model"]
    assert (lm["length"], lm["sequences"]) == (24, 64) and lm["label"] == "measured"
    assert lm["next_token_agreement"] < 1.0 and lm["kl_divergence"] > 0
    assert lm["perplexity_original"] > 1 and lm["perplexity_compressed"] > 1
    assert [(b["start"], b["stop"]) for b in lm["buckets"]] == [(0, 8), (8, 24)]
    code, out, _ = run_captured(capsys, "verify", f["orig"], f["orig"], "--text", f["text"], "--seq-len", "24",
                                "--no-latency", "--no-drift")
    assert code == 0 and "Language model (64 sequences x 24 tokens" in out and "100.00%" in out


def test_verify_text_errors_are_one_line(gpt2_folders, tmp_path, capsys):
    f = gpt2_folders
    code, _, err = run_captured(capsys, "verify", "bundled", f["comp"], "--text", f["text"])
    assert code == 2 and "Hugging Face folder" in err and err.count("\n") == 1
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((f["orig"] / "config.json").read_text())
    (bare / "model.safetensors").write_bytes((f["orig"] / "model.safetensors").read_bytes())
    code, _, err = run_captured(capsys, "verify", bare, f["comp"], "--text", f["text"])
    assert code == 6 and "no tokenizer.json" in err
    code, _, err = run_captured(capsys, "verify", f["orig"], f["comp"], "--text", f["text"], "--samples", "x.npz")
    assert code == 2 and "pass one" in err
