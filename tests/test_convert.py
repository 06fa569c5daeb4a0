import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from crosslayer import CLAConfig, CLAForCausalLM, CrossLayerError
from crosslayer.__main__ import main
from crosslayer.calibration import FIT_RIDGE
from crosslayer.config import ROPE_TYPES
from crosslayer.convert import from_hf, target_config

from .conftest import REPO

SHAPE = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=1000.0)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(rope_theta=1000.0, sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1000.0)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


def tiny(family: str = "llama", **kw):
    """A random tiny fp32 model of a transformers family; biases (Qwen2's q/k/v) random too, so means show."""
    config_cls, model_cls, fields = FAMILIES[family]
    model = model_cls(config_cls(**{**SHAPE, **fields, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:  # default init: zeros / ones, the same in every layer
                p.normal_(1.0 if "layernorm" in name else 0.0, 0.1)
    return model


def tiny_llama(**kw):
    return tiny("llama", **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def no_leftovers(parent: Path, name: str) -> bool:
    """Neither OUT nor a staging folder for it exists in parent."""
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


# ----------------------------------------------------------------------------------------------
# The weight map


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True])
def test_cla1_copy_of_gqa_llama_has_identical_logits(attn, tie):
    llama = tiny_llama(tie_word_embeddings=tie, attn_implementation=attn)
    cla = from_hf(llama)
    assert isinstance(cla, CLAForCausalLM) and cla.config.num_key_value_heads == 2
    ids = torch.randint(0, 257, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(cla(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
        # cached decoding of the copy equals the original's
        a = llama.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = cla.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_cla1_copy_of_mistral_and_qwen2_has_identical_logits(family):
    source = tiny(family)
    cla = from_hf(source)
    assert (cla.config.attention_bias, cla.config.o_proj_bias) == ((True, False) if family == "qwen2" else (False, False))
    # our shape arithmetic agrees with the model built (Qwen2: q/k/v biases, none on o)
    assert cla.config.num_parameters() == sum(p.numel() for p in cla.parameters())
    ids = torch.randint(0, 257, (2, 40))
    torch.testing.assert_close(logits(cla, ids), logits(source, ids), rtol=0, atol=1e-6)
    with torch.no_grad():
        a = source.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = cla.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1000.0},
    "linear": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "rope_theta": 1000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                 "long_factor": [2.0, 3.0, 4.0, 5.0], "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "proportional": {"rope_type": "proportional", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
}


def test_rope_types_accepted_are_the_ones_tested():
    assert set(ROPE_TYPES) == set(ROPES)
    assert set(ROPE_TYPES) <= {"default", *ROPE_INIT_FUNCTIONS}


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_every_accepted_rope_type_is_reproduced_exactly(rope_type, tmp_path):
    llama = tiny_llama(rope_parameters=ROPES[rope_type], num_hidden_layers=2)
    llama.save_pretrained(tmp_path / "src")
    cla = from_hf(tmp_path / "src")  # from a folder, as users have
    # 200 tokens: past max_position_embeddings (128) and every original_max_position_embeddings,
    # where dynamic / longrope switch their tables
    for n in (20, 200):
        ids = torch.randint(0, 257, (1, n))
        torch.testing.assert_close(logits(cla, ids), logits(llama, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("factor", [2, 3])
def test_mean_is_the_true_mean_and_first_is_the_first(family, factor):
    source = tiny(family)
    layers = source.model.layers
    mean = from_hf(source, cla_factor=factor, kv_init="mean")
    first = from_hf(source, cla_factor=factor, kv_init="first")
    assert mean.config.kv_sources == ([0, 0, 2, 2] if factor == 2 else [0, 0, 0, 3])
    names = ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if family == "qwen2":
        names += ["self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    for p in mean.config.producer_layers:
        group = [j for j, s in enumerate(mean.config.kv_sources) if s == p]
        for name in names:
            got = mean.model.layers[p].get_parameter(name)
            ws = [layers[j].get_parameter(name) for j in group]
            # a running pairwise mean ((a + b) / 2 + c) / 2 would be off by ~1e-2 for a group of three
            torch.testing.assert_close(got, sum(ws) / len(ws), rtol=0, atol=1e-7)
            assert torch.equal(first.model.layers[p].get_parameter(name), ws[0])
        norms = [layers[j].input_layernorm.weight for j in group]
        torch.testing.assert_close(mean.model.layers[p].kv_layernorm.weight, sum(norms) / len(norms), rtol=0, atol=1e-7)
        assert torch.equal(first.model.layers[p].kv_layernorm.weight, norms[0])
    for i, src_layer in enumerate(layers):  # every layer keeps its own Q, O, MLP and norms
        for name, tensor in src_layer.named_parameters():
            if "k_proj" in name or "v_proj" in name:
                continue
            assert torch.equal(mean.model.layers[i].get_parameter(name), tensor), (i, name)
            assert torch.equal(first.model.layers[i].get_parameter(name), tensor), (i, name)
        if mean.config.kv_sources[i] != i:
            assert not hasattr(mean.model.layers[i].self_attn, "k_proj")


def test_dense_crosslayer_model_converts_with_its_own_kv_norms():
    from .conftest import tiny_config

    dense = CLAForCausalLM(tiny_config(num_hidden_layers=4)).eval()
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.kv_layernorm.weight.normal_(1.0, 0.1)
            layer.input_layernorm.weight.normal_(1.0, 0.1)
    ids = torch.randint(0, 211, (2, 15))
    torch.testing.assert_close(logits(from_hf(dense), ids), logits(dense, ids), rtol=0, atol=0)
    mean = from_hf(dense, cla_factor=2)
    a, b = dense.model.layers[2].kv_layernorm.weight, dense.model.layers[3].kv_layernorm.weight
    assert torch.equal(mean.model.layers[2].kv_layernorm.weight, (a + b) / 2)
    assert torch.equal(mean.model.layers[3].input_layernorm.weight, dense.model.layers[3].input_layernorm.weight)
    with pytest.raises(CrossLayerError, match="already shares K/V"):
        from_hf(mean, cla_factor=2)


def test_dtype_rounds_the_fp32_mean_once():
    source = tiny_llama()
    bf16 = from_hf(source, cla_factor=2, dtype=torch.bfloat16)
    fp32 = from_hf(source, cla_factor=2)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert torch.equal(bf16.model.layers[0].self_attn.k_proj.weight, fp32.model.layers[0].self_attn.k_proj.weight.bfloat16())


def test_converted_model_does_not_share_storage_with_source():
    llama = tiny_llama()
    cla = from_hf(llama)
    with torch.no_grad():
        cla.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert not torch.equal(cla.model.layers[0].self_attn.q_proj.weight, llama.model.layers[0].self_attn.q_proj.weight)


def test_old_configs_without_o_proj_bias_still_load():
    old = CLAConfig(**{k: v for k, v in SHAPE.items() if k != "initializer_range"}, attention_bias=True)
    assert old.o_proj_bias is True
    assert CLAForCausalLM(old).model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(CrossLayerError, match="o_proj_bias must be true or false"):
        CLAConfig(**SHAPE, o_proj_bias="no")


# ----------------------------------------------------------------------------------------------
# `crosslayer convert` on folders


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory, wiki_tokenizer):
    """A saved tiny Qwen2 (random biases) with a real tokenizer and a generation config of its own."""
    model = tiny("qwen2", vocab_size=len(wiki_tokenizer))
    model.generation_config.temperature = 0.7
    model.generation_config.do_sample = True
    folder = tmp_path_factory.mktemp("src") / "qwen2"
    model.save_pretrained(folder)
    wiki_tokenizer.save_pretrained(folder)
    return folder


def test_cli_converts_a_folder_that_loads_in_a_fresh_process(tmp_path, qwen2_folder, wiki_tokenizer, capsys):
    out1, out2 = tmp_path / "cla1", tmp_path / "nested" / "cla2"
    assert main(["convert", str(qwen2_folder), "--out", str(out1), "--cla-factor", "1"]) == 0
    assert main(["convert", str(qwen2_folder), "--out", str(out2), "--cla-factor", "2", "--kv-init", "mean"]) == 0
    printed = capsys.readouterr().out
    assert "KV bytes / token  256 -> 128" in printed and f"wrote             {out2}" in printed
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out2 / name).read_bytes() == (qwen2_folder / name).read_bytes(), name
    assert not list(tmp_path.glob(".*")) and not list((tmp_path / "nested").glob(".*"))  # no staging folder left

    text = "The tower was completed in 1889 and stood as the tallest structure in the world."
    script = (
        "import sys, torch, crosslayer\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    tok = AutoTokenizer.from_pretrained(path)\n"
        "    model = AutoModelForCausalLM.from_pretrained(path).eval()\n"
        "    ids = torch.tensor([tok(sys.argv[1])['input_ids']])\n"
        "    with torch.no_grad():\n"
        "        out[path] = (type(model).__name__, ids, model(ids).logits, model.generation_config.temperature)\n"
        "torch.save(out, sys.stdout.buffer)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, text, str(out1), str(out2)], capture_output=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    import io

    loaded = torch.load(io.BytesIO(proc.stdout), weights_only=True)
    ids = torch.tensor([wiki_tokenizer(text)["input_ids"]])
    source = Qwen2ForCausalLM.from_pretrained(qwen2_folder).eval()
    mean = from_hf(source, cla_factor=2)
    for path, expected in ((out1, logits(source, ids)), (out2, logits(mean, ids))):
        arch, got_ids, got, temperature = loaded[str(path)]
        assert arch == "CLAForCausalLM" and torch.equal(got_ids, ids) and temperature == 0.7
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # CLA2 really changed the model: merged K/V give other logits than the source's
    assert (loaded[str(out2)][2] - logits(source, ids)).abs().max() > 1e-3


def test_out_that_exists_is_never_touched(tmp_path, qwen2_folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["convert", str(qwen2_folder), "--out", str(out), "--cla-factor", "2", "--kv-init", "mean"]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine: nothing to lose
    assert main(["convert", str(qwen2_folder), "--out", str(empty), "--cla-factor", "2", "--kv-init", "mean"]) == 0
    assert (empty / "model.safetensors").exists()


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _drop_weight(folder: Path, name: str) -> None:
    weights = load_file(folder / "model.safetensors")
    del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    """Cut a weight file in half (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _saved(tmp_path: Path, model, **config_changes) -> Path:
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    _edit_config(folder, **config_changes)
    return folder


BAD_SOURCES = {
    "missing": (lambda t: t / "nope", "is not a folder"),
    "no config": (lambda t: (t / "src").mkdir() or t / "src", "no config.json"),
    "no weights": (lambda t: (_saved(t, tiny_llama()) / "model.safetensors").unlink() or t / "src",
                   "cannot load the weights"),
    "corrupt weights": (lambda t: (_saved(t, tiny_llama()) / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}")
                        and t / "src", "cannot load the weights of"),
    "truncated weights": (lambda t: _truncate(_saved(t, tiny_llama()) / "model.safetensors") or t / "src",
                          "cannot load the weights of"),
    "other family": (lambda t: _saved(t, tiny_llama(), model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                     "supported architectures are LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    "other head": (lambda t: _saved(t, tiny_llama(), architectures=["LlamaForSequenceClassification"]),
                   "supported architectures are"),
    "mistral window": (lambda t: _saved(t, tiny("mistral", sliding_window=16)), "sliding-window attention"),
    "qwen2 window": (lambda t: _saved(t, tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)),
                     "sliding-window attention"),
    "rope type": (lambda t: _saved(t, tiny_llama(), rope_parameters={"rope_type": "mrope", "rope_theta": 1e4}),
                  "rope_type 'mrope' is not implemented; supported: default, linear"),
    "untied, no head": (lambda t: _saved(t, tiny_llama(tie_word_embeddings=True), tie_word_embeddings=False),
                        "tie_word_embeddings=false but the checkpoint has no lm_head.weight"),
    "tied, own head": (lambda t: _saved(t, tiny_llama(), tie_word_embeddings=True),
                       "says tie_word_embeddings=true, but its lm_head.weight differs"),
    "missing weight": (lambda t: _drop_weight(_saved(t, tiny_llama()), "model.layers.1.self_attn.k_proj.weight")
                       or t / "src", "missing: model.layers.1.self_attn.k_proj.weight"),
    "wrong shape": (lambda t: _saved(t, tiny_llama(), intermediate_size=96), "mismatched: model.layers.0.mlp"),
    "already CLA2": (lambda t: _saved(t, CLAForCausalLM(CLAConfig(**SHAPE, cla_factor=2))), "already shares K/V"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_fail_clearly_and_write_nothing(case, tmp_path, capsys):
    make, message = BAD_SOURCES[case]
    src = make(tmp_path)
    outdir = tmp_path / "outs"
    outdir.mkdir()
    assert main(["convert", str(src), "--out", str(outdir / "cla2"), "--cla-factor", "2", "--kv-init", "mean"]) == 2
    err = capsys.readouterr().err  # after the progress bars of saving the source
    last = err.strip().splitlines()[-1]
    assert last.startswith("crosslayer convert: error: ") and message in last and "Traceback" not in err, err
    assert no_leftovers(outdir, "cla2") and list(outdir.iterdir()) == []


def test_sliding_window_that_cannot_take_effect_is_accepted():
    for source in (tiny("mistral", sliding_window=4096), tiny("qwen2", use_sliding_window=False, sliding_window=16),
                   tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=4)):
        ids = torch.randint(0, 257, (1, 40))
        torch.testing.assert_close(logits(from_hf(source), ids), logits(source, ids), rtol=0, atol=1e-6)


def test_qwen2_config_without_layer_types_windows_from_max_window_layers():
    raw = {**tiny("qwen2").config.to_dict(), "use_sliding_window": True, "sliding_window": 16,
           "architectures": ["Qwen2ForCausalLM"]}
    del raw["layer_types"]  # as in configs saved before transformers had the field
    assert target_config({**raw, "max_window_layers": 4}, cla_factor=2).kv_sources == [0, 0, 2, 2]
    with pytest.raises(CrossLayerError, match="sliding-window attention"):
        target_config({**raw, "max_window_layers": 2}, cla_factor=2)


@pytest.mark.parametrize("args, message", [
    (["--cla-factor", "0"], "argument --cla-factor: expected an integer >= 1, got 0"),
    ([], "--cla-factor: give the layers per sharing group"),
    (["--cla-factor", "2", "--cla-pattern", "every_other"], "invalid choice"),
])
def test_bad_flags(args, message, tmp_path, qwen2_folder, capsys):
    code = None
    try:
        code = main(["convert", str(qwen2_folder), "--out", str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert no_leftovers(tmp_path, "out")


def test_failure_while_writing_removes_the_staging_folder(tmp_path, qwen2_folder, monkeypatch, capsys):
    def broken_save(self, *args, **kwargs):
        Path(args[0], "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(CLAForCausalLM, "save_pretrained", broken_save)
    # a write that fails (a full disk) is one line and exit 2 since issue 20, no longer a traceback
    assert main(["convert", str(qwen2_folder), "--out", str(tmp_path / "out"), "--cla-factor", "2",
                 "--kv-init", "mean"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert no_leftovers(tmp_path, "out")


def test_kv_init_is_checked():
    with pytest.raises(CrossLayerError, match="kv_init must be one of"):
        from_hf(tiny_llama(), kv_init="median")


def test_cli_exit_code_in_a_real_process(tmp_path):
    from .conftest import run_cli

    proc = run_cli("convert", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--cla-factor", "2")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# K/V initialisations, against computations made here from the source model's own modules


def kv_of(layer, h, family_layer=True):
    """K and V (before rotary) a layer computes from hidden states h: a transformers layer through its
    input norm, a CLA producer through its KV-input norm."""
    x = layer.input_layernorm(h) if family_layer else layer.kv_layernorm(h)
    return layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mean_folded_is_the_mean_of_the_maps_and_mean_is_not(family):
    source = tiny(family, num_hidden_layers=6)  # norms ~N(1, 0.1): not the same in any two layers
    folded = from_hf(source, kv_sources=[0, 1, 1, 1, 4, 4], kv_init="mean-folded")
    mean = from_hf(source, kv_sources=[0, 1, 1, 1, 4, 4], kv_init="mean")
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        for producer, group in ((1, [1, 2, 3]), (4, [4, 5])):
            maps = [kv_of(source.model.layers[j], h) for j in group]
            want_k, want_v = (sum(m[i] for m in maps) / len(maps) for i in (0, 1))
            got_k, got_v = kv_of(folded.model.layers[producer], h, family_layer=False)
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-5)
            assert torch.equal(folded.model.layers[producer].kv_layernorm.weight, torch.ones(64))
            # mean pools W and g separately: not the mean of the maps when the norms differ
            assert (kv_of(mean.model.layers[producer], h, family_layer=False)[0] - want_k).abs().max() > 1e-3
    ids = torch.randint(0, 257, (2, 9))
    # a group of one keeps its own map exactly: a plan that shares nothing is the source itself
    torch.testing.assert_close(logits(from_hf(source, kv_sources=list(range(6)), kv_init="mean-folded"), ids),
                               logits(source, ids), rtol=0, atol=1e-6)


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-stacking vectorisation: vec(A B C) = (C^T kron A) vec(B)."""
    return m.T.reshape(-1)


def reference_fit(source, calibration, members, ridge, offsets):
    """The weighted least-squares K/V map of a group, written out plainly from transformers' own activations:
    minimise sum_j |(X W^T - K_j) S_j|^2 + ridge' |[W^T]_rows<d (sum_j M_j)^1/2|^2 with S_j = M_j^1/2, for
    keys M_j = mean over tokens and offsets d of the member's queries rotated as at position d (summed over
    the query heads of each K/V head), for values M_j = sum over those heads of O_h^T O_h; solved as one
    stacked linear least-squares problem (torch.linalg.lstsq)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = source.config
    n_kv, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // n_kv
    with torch.no_grad():
        hidden = source(calibration, output_hidden_states=True).hidden_states  # [i]: input of layer i
        h_p = hidden[members[0]].double()
        x = (h_p * torch.rsqrt(h_p.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).flatten(0, 1)  # (N, d)
        bias = source.model.layers[0].self_attn.k_proj.bias is not None
        if bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        cos, sin = source.model.rotary_emb(hidden[0], offsets[None])  # (1, S, hd)
        out = {}
        for which in ("k", "v"):
            rows, targets, metric_sum = [], [], 0
            for j in members:
                layer = source.model.layers[j]
                xin = layer.input_layernorm(hidden[j])
                target = (layer.self_attn.k_proj if which == "k" else layer.self_attn.v_proj)(xin).flatten(0, 1).double()
                if which == "k":
                    q = layer.self_attn.q_proj(xin).flatten(0, 1).view(-1, cfg.num_attention_heads, 1, hd)  # (N, H, 1, hd)
                    blocks = torch.zeros(n_kv, hd, hd, dtype=torch.float64)
                    for s in range(cos.shape[1]):
                        rotated, _ = apply_rotary_pos_emb(q, q, cos[:, s : s + 1], sin[:, s : s + 1], unsqueeze_dim=1)
                        r = rotated.double().view(-1, n_kv, group, hd)
                        blocks += torch.einsum("nkgi,nkgj->kij", r, r) / len(r) / cos.shape[1]
                else:
                    o = layer.self_attn.o_proj.weight.double().view(-1, n_kv, group, hd)
                    blocks = torch.einsum("dkgi,dkgj->kij", o, o)
                m = torch.block_diag(*blocks)
                values, vectors = torch.linalg.eigh(m)
                root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
                rows.append(torch.kron(root.T.contiguous(), x))
                targets.append(vec(target @ root))
                metric_sum = metric_sum + m
            values, vectors = torch.linalg.eigh(metric_sum)
            root = vectors @ torch.diag(values.sqrt()) @ vectors.T
            d = cfg.hidden_size
            lam = ridge * (x.T @ x).diagonal().mean()
            shrink = torch.zeros(d, x.shape[1], dtype=torch.float64)
            shrink[:, :d] = torch.eye(d, dtype=torch.float64) * lam.sqrt()
            rows.append(torch.kron(root.T.contiguous(), shrink))
            targets.append(torch.zeros(d * root.shape[0], dtype=torch.float64))
            w_t = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)[:, None]).solution  # vec(W^T)
            w = w_t.view(-1, x.shape[1]).float()  # (kv, d'): unvec of a column-stacked (d', kv) matrix
            out[f"{which}_proj.weight"] = w[:, :d]
            if bias:
                out[f"{which}_proj.bias"] = w[:, d]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fit_is_the_weighted_least_squares_fit_of_the_sources_activations(family):
    source = tiny(family, num_hidden_layers=5, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48)
    calibration = torch.randint(0, 257, (4, 24))
    fitted = from_hf(source, kv_sources=[0, 1, 1, 1, 4], kv_init="fit", calibration=calibration)
    offsets = torch.linspace(0, 23, 64).round().long()  # the rotary offsets the fit averages over
    want = reference_fit(source, calibration, [1, 2, 3], FIT_RIDGE, offsets)
    attn = fitted.model.layers[1].self_attn
    for name, tensor in want.items():
        got = attn.get_parameter(name)
        torch.testing.assert_close(got, tensor, rtol=1e-4, atol=1e-4 * tensor.abs().max().item())
    assert torch.equal(fitted.model.layers[1].kv_layernorm.weight, torch.ones(32))
    # groups of one keep their own map, and every other weight is the source's
    assert torch.equal(fitted.model.layers[4].self_attn.k_proj.weight, source.model.layers[4].self_attn.k_proj.weight)
    assert torch.equal(fitted.model.layers[2].self_attn.q_proj.weight, source.model.layers[2].self_attn.q_proj.weight)


def test_fit_beats_the_other_inits_on_its_objective():
    """On the calibration data, the fitted map has the least weighted K/V error of the four initialisations
    (it is the minimiser; here the objective is computed plainly from transformers' activations)."""
    source = tiny_llama(num_hidden_layers=4)
    calibration = torch.randint(0, 257, (4, 32))
    with torch.no_grad():
        hidden = source(calibration, output_hidden_states=True).hidden_states
        errors = {}
        for init in ("fit", "mean", "mean-folded", "first"):
            model = from_hf(source, kv_sources=[0, 1, 1, 3], kv_init=init, calibration=calibration)
            k_hat = kv_of(model.model.layers[1], hidden[1], family_layer=False)[0]
            errors[init] = sum((k_hat - kv_of(source.model.layers[j], hidden[j])[0]).pow(2).sum().item() for j in (1, 2))
    assert errors["fit"] < min(errors["mean"], errors["mean-folded"], errors["first"]), errors


def test_fit_needs_calibration_and_inits_are_checked():
    with pytest.raises(CrossLayerError, match="kv_init 'fit' needs calibration tokens"):
        from_hf(tiny_llama(), cla_factor=2, kv_init="fit")
    with pytest.raises(CrossLayerError, match="kv_init must be one of fit, mean, mean-folded, first"):
        from_hf(tiny_llama(), kv_init="median")
    # an exact copy needs no calibration, whatever the init
    ids = torch.randint(0, 257, (1, 12))
    source = tiny_llama()
    torch.testing.assert_close(logits(from_hf(source, kv_init="fit"), ids), logits(source, ids), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Plans on the command line


def test_cli_plan_search_writes_a_plan_a_later_conversion_reads(tmp_path, qwen2_folder, calibration_text, capsys):
    out = tmp_path / "searched"
    assert main(["convert", str(qwen2_folder), "--out", str(out), "--plan", "search", "--kv-budget", "0.5",
                 "--calibration", str(calibration_text), "--calibration-tokens", "256", "--calibration-seq-len",
                 "64", "--search-tokens", "128", "--compute-dtype", "bf16", "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["producers"] == 2 and len(set(plan["kv_sources"])) == 2 and plan["chosen_by"] == "search"
    assert plan["kv_init"] == "fit" and plan["calibration"] == {"data": str(calibration_text), "tokens": 256,
                                                                 "seq_len": 64, "compute_dtype": "bf16", "device": "cpu",
                                                                 "activations": "memory"}
    assert json.loads((out / "config.json").read_text())["kv_sources"] == plan["kv_sources"] == result["kv_sources"]
    assert "plan search" in printed and "merge layer" in printed and plan["plan"] in printed
    steps = plan["search"]["steps"]
    assert [s["producers"] for s in steps[:2]] == [3, 2]  # one merge per step from 4 layers
    assert plan["search"]["search_tokens"] == 128 and "measured on 128 tokens" in printed  # 2 of the 4 sequences
    # the plan file reproduces the conversion: same plan, same fitted weights
    again = tmp_path / "again"
    assert main(["convert", str(qwen2_folder), "--out", str(again), "--plan", str(out / "plan.json"), "--calibration",
                 str(calibration_text), "--calibration-tokens", "256", "--calibration-seq-len", "64",
                 "--compute-dtype", "bf16", "--no-progress"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "plan.json").read_text())["chosen_by"] == f"plan file {out / 'plan.json'}"


@pytest.mark.parametrize("args, message", [
    (["--plan", "search"], "give exactly one of producers"),
    (["--plan", "search", "--producers", "2", "--kv-budget", "0.5"], "give exactly one of producers"),
    (["--producers", "2"], "--cla-factor: give the layers per sharing group"),
    (["--cla-factor", "2", "--producers", "2"], "--producers, --kv-budget and --search-tokens belong to --plan search"),
    (["--plan", "p.json", "--search-tokens", "64"], "belong to --plan search"),
    (["--cla-factor", "2", "--plan", "search"], "give --cla-factor or --plan, not both"),
    (["--plan", "search", "--producers", "9"], "producers must be between 1 and the model's 4 layers"),
    (["--plan", "search", "--kv-budget", "0"], "argument --kv-budget: expected a number in (0, 1]"),
    (["--plan", "search", "--producers", "2"], "plan search measures on calibration text"),
    (["--cla-factor", "2"], "kv_init fit measures on calibration text"),
    (["--cla-factor", "2", "--kv-init", "mean", "--calibration", "x.txt"], "this conversion would not use it"),
    (["--cla-factor", "1", "--calibration", "x.txt"], "this conversion would not use it"),
    (["--plan", "nope.json"], "plan file not found: nope.json"),
    (["--plan", "search", "--producers", "2", "--calibration", "absent/*.txt"], "no file matches 'absent/*.txt'"),
])
def test_bad_plan_flags_fail_clearly_and_write_nothing(args, message, tmp_path, qwen2_folder, capsys):
    code = None
    try:
        code = main(["convert", str(qwen2_folder), "--out", str(tmp_path / "out"), "--no-progress", *args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("content, message", [
    ("[0, 0, 5, 5]", "kv_sources[2] = 5 points at a later layer"),
    ("[0, 0, 2]", "kv_sources has 3 entries but the model has num_hidden_layers=4"),
    ('{"plan": "x"}', "has no kv_sources"),
    ("{not json", "is not JSON"),
])
def test_bad_plan_files_are_named(content, message, tmp_path, qwen2_folder, capsys):
    path = tmp_path / "plan.json"
    path.write_text(content)
    assert main(["convert", str(qwen2_folder), "--out", str(tmp_path / "out"), "--plan", str(path), "--kv-init",
                 "mean"]) == 2
    err = capsys.readouterr().err
    assert f"plan file {path}" in err and message in err, err
    assert no_leftovers(tmp_path, "out")


def test_plan_file_as_a_list_with_a_calibration_free_init(tmp_path, qwen2_folder):
    path = tmp_path / "plan.json"
    path.write_text("[0, 1, 1, 1]")
    out = tmp_path / "out"
    assert main(["convert", str(qwen2_folder), "--out", str(out), "--plan", str(path), "--kv-init", "first"]) == 0
    source = Qwen2ForCausalLM.from_pretrained(qwen2_folder).eval()
    cla = CLAForCausalLM.from_pretrained(out).eval()
    assert cla.config.kv_sources == [0, 1, 1, 1]
    assert torch.equal(cla.model.layers[1].self_attn.k_proj.bias, source.model.layers[1].self_attn.k_proj.bias)
    assert json.loads((out / "plan.json").read_text())["kv_init"] == "first"
