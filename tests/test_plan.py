import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crosslayer import CrossLayerError
from crosslayer.calibration import Calibration, read_calibration
from crosslayer.config import describe, from_groups
from crosslayer.convert import from_hf, read_plan
from crosslayer.plan import Reference, Searcher, producers_for_budget, search

from .conftest import DATA
from .test_convert import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


def kl_of(source, model, tokens):
    """Mean KL(source || model) per token, from the two models' logits (plain torch)."""
    with torch.no_grad():
        p = F.log_softmax(source(tokens).logits.double(), -1).flatten(0, 1)
        q = F.log_softmax(model(tokens).logits.double(), -1).flatten(0, 1)
    return F.kl_div(q, p, log_target=True, reduction="sum").item() / p.shape[0]


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama of 8 layers with non-unit norms, its dense CLA copy, calibration tokens and their Reference."""
    torch.manual_seed(0)
    source = tiny_llama(num_hidden_layers=8)
    tokens = torch.randint(0, 257, (4, 32))
    return source, tokens, Reference(from_hf(source), tokens, batch_size=3)  # chunks of 3 and 1 sequences


# ----------------------------------------------------------------------------------------------
# Plans and budgets


def test_plan_helpers():
    assert from_groups([1, 2, 3]) == [0, 1, 1, 3, 3, 3]
    assert describe([0, 1, 1, 3, 3, 3]) == "[0] [1-2] [3-5]"
    assert describe([0, 1, 0, 1]) == "[0,2] [1,3]"
    # 2 x kv x hd x producers bytes: a budget is a share of the producers, rounded down
    assert [producers_for_budget(b, 30) for b in (0.5, 0.55, 1 / 3, 0.01, 1.0)] == [15, 16, 10, 1, 30]
    with pytest.raises(CrossLayerError, match=r"kv_budget must be in \(0, 1\]"):
        producers_for_budget(1.5, 30)


def test_read_plan_takes_a_plan_json_or_a_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"kv_sources": [0, 0, 2, 2], "plan": "[0-1] [2-3]"}))
    (tmp_path / "b.json").write_text("[0, 1, 1, 1]")
    assert read_plan(tmp_path / "a.json", 4) == [0, 0, 2, 2]
    assert read_plan(tmp_path / "b.json", 4) == [0, 1, 1, 1]
    with pytest.raises(CrossLayerError, match="kv_sources\\[1\\] = 2 points at a later layer"):
        (tmp_path / "c.json").write_text("[0, 2, 2, 2]")
        read_plan(tmp_path / "c.json", 4)


# ----------------------------------------------------------------------------------------------
# Calibration tokens from real text


def test_calibration_tokens_come_from_across_the_text(wiki_tokenizer):
    text_file = DATA / "wikitext-2" / "wiki.valid.raw"
    text = text_file.read_text(encoding="utf-8")
    tokens = read_calibration(str(text_file), wiki_tokenizer, tokens=1000, seq_len=100)
    assert tokens.shape == (10, 100) and tokens.dtype == torch.long
    pieces = [wiki_tokenizer.decode(row) for row in tokens.tolist()]
    assert all(piece in text for piece in pieces)  # real, contiguous text
    where = [text.index(piece) for piece in pieces]
    assert where[0] == 0 and where == sorted(where) and where[-1] > 0.95 * (len(text) - 1600)  # spread to the end
    assert torch.equal(tokens, read_calibration(str(text_file), wiki_tokenizer, tokens=1000, seq_len=100))
    with pytest.raises(CrossLayerError, match="5 sequences of 200000 need 1,000,000"):
        read_calibration(str(text_file), wiki_tokenizer, tokens=5 * 200_000, seq_len=200_000)
    # a short text: all of it tokenised, disjoint windows from its start to its end
    short = read_calibration(str(text_file), wiki_tokenizer, tokens=4 * 20_000, seq_len=20_000)
    stream = wiki_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert short[0].tolist() == stream[:20_000] and short[-1].tolist() == stream[-20_000:]


def test_calibration_tokens_from_a_prepared_folder(tmp_path, wiki_tokenizer):
    from crosslayer.data import load_tokens, prepare

    wiki_tokenizer.save_pretrained(tmp_path / "tok")
    ptb = DATA / "ptb"
    prepare(f"text:{ptb}/ptb.valid.txt", tmp_path / "data", tokenizer=f"hf:{tmp_path / 'tok'}",
            val=f"{ptb}/ptb.test.txt", progress=False)
    stream = np.asarray(load_tokens(tmp_path / "data", "train"))
    tokens = read_calibration(str(tmp_path / "data"), wiki_tokenizer, tokens=512, seq_len=64)
    assert tokens.shape == (8, 64)
    starts = []
    for row in tokens.numpy():
        hits = [s for s in range(len(stream) - 63) if stream[s] == row[0] and (stream[s : s + 64] == row).all()]
        starts.append(hits[0])
    assert starts[0] == 0 and starts[-1] == len(stream) - 64
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(CrossLayerError, match="tokenised with another tokenizer"):
        read_calibration(str(tmp_path / "data"), other, tokens=512, seq_len=64)


# ----------------------------------------------------------------------------------------------
# Costs and the search, against full forward passes of the converted models


@pytest.mark.parametrize("kv_sources", [[0, 0, 2, 2, 4, 4, 6, 6], [0, 1, 2, 2, 2, 2, 6, 7], list(range(8))])
def test_cost_is_the_kl_of_the_converted_model(setup, kv_sources):
    source, tokens, reference = setup
    model = from_hf(source, kv_sources=kv_sources, kv_init="fit", calibration=tokens)
    want = kl_of(source, model, tokens)
    got, _ = reference.cost(kv_sources)
    assert got == pytest.approx(want, rel=2e-3, abs=2e-5)  # the reference keeps fp16 log-probs
    loss, _ = reference.cost(kv_sources, metric="loss")
    with torch.no_grad():
        ce = F.cross_entropy(model(tokens).logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert loss == pytest.approx(ce, rel=1e-5)


def test_cost_from_a_later_layer_equals_the_whole_run(setup):
    _, _, reference = setup
    plan = [0, 1, 2, 3, 4, 4, 6, 6]
    whole, run = reference.cost(plan, keep_hidden=True)
    assert reference.cost(plan, start=4)[0] == pytest.approx(whole, rel=1e-6)
    later = [0, 0, 2, 3, 4, 4, 6, 6]  # differs before layer 4: run from the other plan's state there
    assert reference.cost(later, start=2, hidden=reference.run(later, keep_hidden=True).hidden[2])[0] == \
        pytest.approx(reference.cost(later)[0], rel=1e-6)
    with pytest.raises(CrossLayerError, match="a group crosses it"):
        reference.cost([0, 0, 0, 3, 4, 4, 6, 6], start=2)


def test_search_returns_a_measured_plan_no_boundary_move_improves(setup):
    source, tokens, reference = setup
    result = search(reference, producers=4, refine_rounds=20)
    plan = result["kv_sources"]
    assert len(set(plan)) == 4 and plan == sorted(plan)  # contiguous groups
    model = from_hf(source, kv_sources=plan, kv_init="fit", calibration=tokens)
    assert result["cost"] == pytest.approx(kl_of(source, model, tokens), rel=2e-3, abs=2e-5)
    merges = [s for s in result["steps"] if s["step"].startswith("merge")]
    assert [s["producers"] for s in merges] == [7, 6, 5, 4]
    # locally optimal: every plan one boundary move away costs more (measured with full forward passes)
    sizes = [plan.count(p) for p in sorted(set(plan))]
    for g in range(len(sizes) - 1):
        for delta in (1, -1):
            moved = list(sizes)
            moved[g] += delta
            moved[g + 1] -= delta
            if min(moved) >= 1:
                other = from_hf(source, kv_sources=from_groups(moved), kv_init="fit", calibration=tokens)
                assert kl_of(source, other, tokens) > result["cost"] - 2e-5, moved
    # the uniform plan of the same budget costs more
    uniform = from_hf(source, cla_factor=2, kv_init="fit", calibration=tokens)
    assert kl_of(source, uniform, tokens) > result["cost"]


def test_search_checks_its_arguments(setup):
    _, tokens, reference = setup
    with pytest.raises(CrossLayerError, match="producers must be between 1 and the model's 8 layers"):
        search(reference, producers=9)
    with pytest.raises(CrossLayerError, match="metric must be one of kl, loss"):
        search(reference, producers=4, metric="mse")
    with pytest.raises(CrossLayerError, match="contiguous groups only"):
        search(reference, producers=2, start=[0, 1, 0, 1, 4, 4, 6, 6])
    with pytest.raises(CrossLayerError, match="fewer than the 5 asked for"):
        search(reference, producers=5, start=[0, 0, 2, 2, 4, 4, 6, 6])
    with pytest.raises(CrossLayerError, match="give exactly one of producers"):
        Searcher().check(8)
    with pytest.raises(CrossLayerError, match="give exactly one of producers"):
        Searcher(producers=2, kv_budget=0.5).check(8)
    with pytest.raises(CrossLayerError, match=r"must be a \(B, T\) tensor"):
        Reference(reference.dense, tokens[0])


def test_search_continues_from_a_plan(setup):
    """A search for fewer producers that starts from an earlier result keeps merging from it: each step
    removes one group, and every recorded cost is the KL of that plan's model (full forward passes)."""
    source, tokens, reference = setup
    start = [0, 0, 2, 2, 4, 4, 6, 6]
    result = search(reference, producers=2, start=start, refine_rounds=0)
    steps = result["steps"]
    assert steps[0]["step"] == "start from the given plan" and steps[0]["producers"] == 4
    assert [s["producers"] for s in steps[1:]] == [3, 2]
    for step in steps:
        sizes = [int(b) - int(a) + 1 for a, _, b in (g.strip("[]").partition("-") for g in step["plan"].split())
                 for b in [b or a]]
        model = from_hf(source, kv_sources=from_groups(sizes), kv_init="fit", calibration=tokens)
        assert step["cost"] == pytest.approx(kl_of(source, model, tokens), rel=2e-3, abs=2e-5)
    # every merge keeps the start plan's boundaries it did not remove
    assert set(result["kv_sources"]) <= set(start)


def test_searcher_scores_on_the_first_search_tokens(setup):
    """Searcher(search_tokens=64) on 4 sequences of 32 tokens searches on the first 2 sequences: the
    same plan and cost as a search on a Reference of those 2 sequences alone."""
    source, tokens, reference = setup
    searcher = Searcher(kv_budget=0.5, search_tokens=64)
    result = searcher(Calibration(reference.dense, tokens))
    assert searcher.check(8) == 4 and result["producers"] == 4 and result["search_tokens"] == 64
    alone = search(Reference(reference.dense, tokens[:2]), producers=4)
    assert result["kv_sources"] == alone["kv_sources"] and result["cost"] == pytest.approx(alone["cost"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# A bound on the KL instead of a budget


def test_max_kl_picks_the_plan_a_scan_of_the_merges_picks(setup):
    """Searcher(max_kl=X) ends at the producer count a plain scan of a full search's merges gives (the count
    before the first merge costing more than X), with that count's search result (merges, then boundary moves),
    and records the merge it did not take."""
    source, tokens, setup_reference = setup
    reference = Reference(setup_reference.dense, tokens)  # chunked as the Searcher's, so the same costs to the bit
    merges = search(reference, producers=1, refine_rounds=0)["steps"]
    assert [s["producers"] for s in merges] == list(range(7, 0, -1))
    calibration = Calibration(reference.dense, tokens)
    for k in (0, 2, 4):
        bound = (merges[k]["cost"] + merges[k + 1]["cost"]) / 2
        expected = 8
        for step in merges:  # the scan: merges are taken in order until one costs more than the bound
            if step["cost"] > bound:
                break
            expected = step["producers"]
        result = Searcher(max_kl=bound, search_tokens=tokens.numel())(calibration)
        assert result["producers"] == expected and result["max_kl"] == bound
        assert result["kv_sources"] == search(reference, producers=expected)["kv_sources"]
        assert result["cost"] <= bound and result["refused"]["cost"] > bound
        assert result["refused"]["step"] == merges[8 - expected]["step"]
        model = from_hf(source, kv_sources=result["kv_sources"], kv_init="fit", calibration=tokens)
        assert kl_of(source, model, tokens) <= bound + 2e-5
    below_every_merge = Searcher(max_kl=merges[0]["cost"] / 2, search_tokens=tokens.numel())(calibration)
    assert below_every_merge["kv_sources"] == list(range(8)) and below_every_merge["cost"] == 0.0
    assert Searcher(max_kl=1e9, search_tokens=tokens.numel())(calibration)["producers"] == 1


def test_max_kl_settings_are_checked():
    with pytest.raises(CrossLayerError, match="give exactly one of producers .*, kv_budget .* or max_kl"):
        Searcher(producers=2, max_kl=0.1).check(8)
    with pytest.raises(CrossLayerError, match="max_kl bounds the KL to the original model: it needs metric kl"):
        Searcher(max_kl=0.1, metric="loss").check(8)
    with pytest.raises(CrossLayerError, match="max_kl must be a number >= 0"):
        Searcher(max_kl=-1.0).check(8)
    assert Searcher(max_kl=0.1).check(8) == 1
