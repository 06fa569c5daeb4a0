"""`crosslayer frontier` and `convert --max-kl`: every row recomputed independently (plans rebuilt with from_hf,
KL and perplexity from plain forward passes, the plan files converted by `convert --plan FILE`)."""

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from crosslayer import CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.calibration import read_calibration
from crosslayer.config import from_groups, kv_groups
from crosslayer.convert import from_hf, read_plan
from crosslayer.frontier import floor_for_fraction
from crosslayer.plan import Reference, search

from .conftest import DATA
from .test_convert import no_leftovers, tiny_llama
from .test_plan import kl_of

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread

HELDOUT = DATA / "wikitext-2" / "wiki.test.raw"
# 6 layers down to 3 producers; 4 calibration sequences of 64 tokens, plans scored on the first 2; held-out:
# the first 256 tokens of WikiText-2 test as 2 x 128
CALIBRATION_FLAGS = ["--calibration-tokens", "256", "--calibration-seq-len", "64", "--compute-dtype", "fp32"]
FLAGS = [*CALIBRATION_FLAGS, "--search-tokens", "128", "--heldout-tokens", "256", "--heldout-window", "128",
         "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, wiki_tokenizer):
    """A saved tiny Llama of 6 layers (random norms) with a real tokenizer, and real calibration text (the first
    60 kB of WikiText-2 validation)."""
    if not HELDOUT.exists():
        pytest.skip(f"{HELDOUT} absent")
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=6, vocab_size=len(wiki_tokenizer))
    root = tmp_path_factory.mktemp("frontier")
    model.save_pretrained(root / "llama")
    wiki_tokenizer.save_pretrained(root / "llama")
    text = root / "calibration.txt"
    text.write_text((DATA / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:60000], encoding="utf-8")
    return root / "llama", text


@pytest.fixture(scope="module")
def measured(source, tmp_path_factory):
    folder, calibration = source
    out = tmp_path_factory.mktemp("runs") / "frontier"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["frontier", str(folder), "--out", str(out), "--calibration", str(calibration), "--heldout",
                     str(HELDOUT), "--floor", "3", *FLAGS])
    assert code == 0
    return out, json.loads((out / "frontier.json").read_text()), printed.getvalue()


def heldout_ids(tokenizer) -> torch.Tensor:
    """The docs' protocol by hand: the first 256 tokens of the text, no BOS, as 2 x 128."""
    text = HELDOUT.read_text(encoding="utf-8")[:20000]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:256]).view(2, 128)


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.double()
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())


def test_every_row_is_its_plans_model_measured_again(source, measured, wiki_tokenizer):
    folder, calibration = source
    out, record, printed = measured
    llama = LlamaForCausalLM.from_pretrained(folder).eval()
    tokens = read_calibration(str(calibration), wiki_tokenizer, 256, 64)  # (4, 64)
    ids = heldout_ids(wiki_tokenizer)
    rows = record["rows"]
    assert [r["producers"] for r in rows] == [6, 5, 4, 3]
    # 2 (K and V) x 2 KV heads x head_dim 8 x producers x 2 bytes
    assert [r["kv_bytes_per_token"] for r in rows] == [64 * p for p in (6, 5, 4, 3)]
    assert [r["kv_fraction"] for r in rows] == pytest.approx([1, 5 / 6, 4 / 6, 3 / 6])
    assert record["heldout"] == {"data": str(HELDOUT), "tokens": 256, "windows": 2, "window": 128,
                                 "tokens_scored": 254, "dtype": "fp32"}
    assert record["calibration"]["search_tokens"] == 128 and record["calibration"]["tokens"] == 256
    assert rows[0]["calibration_kl"] == 0 and rows[0]["heldout_ppl"] == pytest.approx(perplexity(llama, ids), rel=1e-6)
    for row in rows[1:]:
        plan = row["kv_sources"]
        sizes = [len(m) for m in kv_groups(plan).values()]
        assert plan == from_groups(sizes) and len(sizes) == row["producers"]  # contiguous groups
        # held-out: K/V fitted on all the calibration tokens; KL: the search's own fit, on the 2 sequences it scored
        fitted = from_hf(llama, kv_sources=plan, kv_init="fit", calibration=tokens)
        assert row["heldout_ppl"] == pytest.approx(perplexity(fitted, ids), rel=1e-5)
        searched = from_hf(llama, kv_sources=plan, kv_init="fit", calibration=tokens[:2])
        assert row["calibration_kl"] == pytest.approx(kl_of(llama, searched, tokens[:2]), rel=2e-3, abs=2e-5)
    # each count's plan is what a search for that many producers chooses (convert --plan search --producers P)
    reference = Reference(from_hf(llama), tokens[:2])
    assert [r["kv_sources"] for r in rows[1:]] == [search(reference, p)["kv_sources"] for p in (5, 4, 3)]
    # the table, printed and in frontier.md; the figure
    table = (out / "frontier.md").read_text(encoding="utf-8")
    for row in rows:
        assert f"{row['heldout_ppl']:.2f}" in printed and f"| {row['heldout_ppl']:.2f} |" in table
        assert row["plan"] in printed and row["plan"] in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["frontier.json", "frontier.md", "frontier.png", "plans"]
    assert not list(out.parent.glob(".*"))  # no staging folder left


def test_a_plan_file_converts_to_the_row_it_came_from(source, measured, wiki_tokenizer, tmp_path):
    """`convert --plan plans/producers-4.json` with the same calibration builds the model the row scored."""
    folder, calibration = source
    out, record, _ = measured
    row = next(r for r in record["rows"] if r["producers"] == 4)
    plan_path = out / "plans" / "producers-4.json"
    assert read_plan(plan_path, 6) == row["kv_sources"]
    converted = tmp_path / "cla"
    assert main(["convert", str(folder), "--out", str(converted), "--plan", str(plan_path), "--calibration",
                 str(calibration), *CALIBRATION_FLAGS, "--no-progress"]) == 0
    model = CLAForCausalLM.from_pretrained(converted).eval()
    assert model.config.kv_sources == row["kv_sources"]
    assert perplexity(model, heldout_ids(wiki_tokenizer)) == pytest.approx(row["heldout_ppl"], rel=1e-5)
    assert sorted(p.name for p in (out / "plans").iterdir()) == [f"producers-{p}.json" for p in (3, 4, 5, 6)]


def test_max_kl_converts_to_the_fewest_producers_within_the_bound(source, measured, tmp_path, capsys):
    """`convert --plan search --max-kl X` on the frontier's calibration: the count a scan of the frontier's merge
    costs gives (merges taken in order while they stay within X), with that row's plan."""
    folder, calibration = source
    _, record, _ = measured
    rows = record["rows"]
    bound = (rows[2]["merge_kl"] + rows[3]["merge_kl"]) / 2
    expected = rows[0]
    for row in rows[1:]:
        if row["merge_kl"] > bound:
            break
        expected = row
    converted = tmp_path / "cla"
    assert main(["convert", str(folder), "--out", str(converted), "--plan", "search", "--max-kl", str(bound),
                 "--calibration", str(calibration), *CALIBRATION_FLAGS, "--search-tokens", "128",
                 "--no-progress"]) == 0
    plan = json.loads((converted / "plan.json").read_text())
    assert plan["kv_sources"] == expected["kv_sources"] and plan["search"]["max_kl"] == bound
    assert plan["search"]["cost"] <= bound < plan["search"]["refused"]["cost"]
    assert f"over --max-kl {bound:g}" in capsys.readouterr().out


def test_floor_from_a_kv_fraction_and_plans_without_boundary_moves(source, tmp_path, wiki_tokenizer):
    assert [floor_for_fraction(f, 30) for f in (0.5, 0.55, 1 / 3, 0.01, 1.0)] == [15, 17, 10, 1, 30]
    folder, calibration = source
    out = tmp_path / "greedy"
    assert main(["frontier", str(folder), "--out", str(out), "--calibration", str(calibration), "--heldout",
                 str(HELDOUT), "--min-kv-fraction", "0.6", "--no-refine", *FLAGS]) == 0
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    # ceil(0.6 x 6) = 4 producers; each row is the greedy merge that reached its count
    tokens = read_calibration(str(calibration), wiki_tokenizer, 256, 64)
    merges = search(Reference(from_hf(LlamaForCausalLM.from_pretrained(folder)), tokens[:2]), 4, refine_rounds=0)
    assert [r["producers"] for r in rows] == [6, 5, 4]
    assert [r["kv_sources"] for r in rows[1:]] == [s["kv_sources"] for s in merges["steps"]]
    assert [r["calibration_kl"] for r in rows[1:]] == [s["cost"] for s in merges["steps"]]


@pytest.mark.parametrize("args, message", [
    (["--heldout", str(HELDOUT)], "give exactly one of floor"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--min-kv-fraction", "0.5"], "give exactly one of floor"),
    (["--heldout", str(HELDOUT), "--floor", "7"], "floor must be between 1 and the model's 6 layers; got 7"),
    (["--heldout", str(HELDOUT), "--min-kv-fraction", "0"], "argument --min-kv-fraction: expected a number in (0, 1]"),
    (["--floor", "3"], "the following arguments are required: --heldout"),
    (["--heldout", "absent/*.txt", "--floor", "3"], "no file matches 'absent/*.txt'"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--heldout-tokens", "10000000"], "10,000,000 are scored"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--heldout-tokens", "300"], "must be a multiple of a window"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--heldout-window", "256", "--heldout-tokens", "256"],
     "longer than the model's 128 positions"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--calibration-tokens", "32"], "32 tokens is less than one sequence"),
    (["--heldout", str(HELDOUT), "--floor", "3", "--device", "gpu0"], "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(args, message, source, tmp_path, capsys):
    folder, calibration = source
    code = main(["frontier", str(folder), "--out", str(tmp_path / "out"), "--calibration", str(calibration),
                 "--heldout-window", "128", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert no_leftovers(tmp_path, "out")


def test_an_existing_out_is_never_touched(source, tmp_path, capsys):
    folder, calibration = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["frontier", str(folder), "--out", str(out), "--calibration", str(calibration), "--heldout",
                 str(HELDOUT), "--floor", "3", *FLAGS]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("args, message", [
    (["--plan", "search", "--max-kl", "0.1", "--producers", "2"], "give exactly one of producers"),
    (["--cla-factor", "2", "--max-kl", "0.1"], "--max-kl belongs to --plan search"),
    (["--plan", "search", "--max-kl", "-1"], "argument --max-kl: expected a number >= 0"),
    (["--plan", "search", "--max-kl", "0.1", "--metric", "loss"], "max_kl bounds the KL to the original model"),
])
def test_bad_max_kl_flags_fail_in_one_line_and_write_nothing(args, message, source, tmp_path, capsys):
    folder, calibration = source
    code = main(["convert", str(folder), "--out", str(tmp_path / "out"), "--calibration", str(calibration),
                 "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert no_leftovers(tmp_path, "out")
