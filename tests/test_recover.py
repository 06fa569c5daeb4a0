import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from crosslayer import CLAForCausalLM, CrossLayerError
from crosslayer.convert import convert, from_hf
from crosslayer.recover import attention_distillation, build_objective, trainable_names
from crosslayer.train import TrainConfig, load_train_config, train

from .conftest import DATA
from .test_convert import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


def test_trainable_sets_are_what_conversion_changed():
    model = from_hf(tiny_llama(num_hidden_layers=5), kv_sources=[0, 0, 2, 3, 3])
    kv = {f"model.layers.{i}.{name}" for i in (0, 3) for name in  # not 2: a producer alone is unchanged
          ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "kv_layernorm.weight")}
    qo = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1, 3, 4) for p in ("q", "o")}  # not 2: alone
    assert trainable_names(model, "kv") == kv
    assert trainable_names(model, "kv+qo") == kv | qo
    assert trainable_names(model, "all") == {n for n, _ in model.named_parameters()}


def plain_attention(q_input, kv_input, q_proj, k_proj, v_proj, o_proj, config, cos, sin):
    """Causal GQA attention written out: (B, T, d) -> (B, T, d), rotary by transformers' own function."""
    B, T, _ = q_input.shape
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = (q_input @ q_proj.T).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = (kv_input @ k_proj.T).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    v = (kv_input @ v_proj.T).view(B, T, Hkv, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
    return out @ o_proj.T


def test_attention_objective_is_the_layer_local_error_written_out():
    teacher = tiny_llama(num_hidden_layers=5)
    student = from_hf(teacher, kv_sources=[0, 1, 1, 1, 4], kv_init="mean")
    batch = torch.randint(0, 257, (2, 17))
    got = attention_distillation(teacher)(student, batch)
    inputs = batch[:, :-1]
    with torch.no_grad():
        hidden = teacher(inputs, output_hidden_states=True).hidden_states  # [j]: input of layer j
        cos, sin = teacher.model.rotary_emb(hidden[0], torch.arange(16)[None])
        errors = []
        for j in (1, 2, 3):  # the layers that share K/V; producer 1
            t, s, p = teacher.model.layers[j], student.model.layers[j], student.model.layers[1]
            x = t.input_layernorm(hidden[j])
            want = plain_attention(x, x, t.self_attn.q_proj.weight, t.self_attn.k_proj.weight, t.self_attn.v_proj.weight,
                                   t.self_attn.o_proj.weight, student.config, cos, sin)
            normed = hidden[j] * torch.rsqrt(hidden[j].pow(2).mean(-1, keepdim=True) + student.config.rms_norm_eps)
            normed_p = hidden[1] * torch.rsqrt(hidden[1].pow(2).mean(-1, keepdim=True) + student.config.rms_norm_eps)
            ours = plain_attention(s.input_layernorm.weight * normed, p.kv_layernorm.weight * normed_p,
                                   s.self_attn.q_proj.weight, p.self_attn.k_proj.weight, p.self_attn.v_proj.weight,
                                   s.self_attn.o_proj.weight, student.config, cos, sin)
            errors.append(((ours - want).pow(2).sum() / want.pow(2).sum()).item())
    assert got.item() == pytest.approx(sum(errors) / 3, rel=1e-4)
    got.backward()  # only attention runs: the MLPs and the output layer get no gradient
    assert student.model.layers[2].self_attn.q_proj.weight.grad is not None
    assert student.model.layers[1].self_attn.k_proj.weight.grad is not None
    assert student.model.layers[2].mlp.up_proj.weight.grad is None and student.lm_head.weight.grad is None
    assert student.model.layers[4].self_attn.q_proj.weight.grad is None  # alone: not distilled
    with pytest.raises(CrossLayerError, match="needs a model that shares K/V"):
        attention_distillation(teacher)(from_hf(teacher), batch)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, wiki_tokenizer):
    """A tiny Llama with a real tokenizer (the teacher), its CLA conversion [0] [1-3] [4], and PTB prepared with
    that tokenizer."""
    root = tmp_path_factory.mktemp("recover")
    torch.manual_seed(0)
    teacher = tiny_llama(num_hidden_layers=5, vocab_size=len(wiki_tokenizer))
    teacher.save_pretrained(root / "teacher")
    wiki_tokenizer.save_pretrained(root / "teacher")
    convert(root / "teacher", root / "cla", kv_sources=[0, 1, 1, 1, 4], kv_init="mean")
    from crosslayer.data import prepare

    ptb = DATA / "ptb"
    prepare(f"text:{ptb}/ptb.valid.txt", root / "data", tokenizer=f"hf:{root / 'cla'}", val=f"{ptb}/ptb.test.txt",
            progress=False)
    return root


def recover(root: Path, out: str, **keys) -> dict:
    recipe = dict(data=str(root / "data"), out=str(root / out), seq_len=32, batch_tokens=256, micro_batch=8,
                  max_steps=6, lr=3e-3, warmup_frac=0.0, eval_every=6, eval_tokens=1024, log_every=1,
                  checkpoint_every=3, progress=False, dtype="fp32", **keys)  # auto would follow the CPU's units
    (root / f"{out}.yaml").write_text(yaml.safe_dump(recipe))
    return train(load_train_config(root / f"{out}.yaml", init=str(root / "cla")))


def changed(root: Path, out: str) -> set[str]:
    before = CLAForCausalLM.from_pretrained(root / "cla").state_dict()
    after = CLAForCausalLM.from_pretrained(root / out).state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_a_model_that_shares_nothing_refuses_kv_training_and_writes_nothing(converted):
    convert(converted / "teacher", converted / "copy", kv_sources=[0, 1, 2, 3, 4], kv_init="mean")  # CLA1: an exact copy
    recipe = dict(data=str(converted / "data"), out=str(converted / "copy-kv"), seq_len=32, batch_tokens=256,
                  micro_batch=8, max_steps=2, progress=False, dtype="fp32", trainable="kv+qo")
    (converted / "copy-kv.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(CrossLayerError, match="trainable: kv[+]qo selects no parameter"):
        train(load_train_config(converted / "copy-kv.yaml", init=str(converted / "copy")))
    assert not (converted / "copy-kv").exists()


def test_attention_distillation_trains_only_kv_and_resumes(converted):
    summary = recover(converted, "attn", objective="attention", teacher=str(converted / "teacher"), trainable="kv")
    rows = [json.loads(line) for line in (converted / "attn" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 6
    # the objective on held-out text fell
    from transformers import LlamaForCausalLM

    from crosslayer.data import load_tokens

    teacher = LlamaForCausalLM.from_pretrained(converted / "teacher").eval()
    held_out = torch.from_numpy(load_tokens(converted / "data", "val")[: 4 * 33].astype("int64")).view(4, 33)
    objective = attention_distillation(teacher)
    with torch.no_grad():
        before = objective(CLAForCausalLM.from_pretrained(converted / "cla"), held_out).item()
        after = objective(CLAForCausalLM.from_pretrained(converted / "attn"), held_out).item()
    assert after < 0.95 * before, (before, after)
    assert changed(converted, "attn") == {"model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                                          "model.layers.1.kv_layernorm.weight"}
    assert (converted / "attn" / "checkpoints").is_dir() and "val_loss" in summary
    again = recover(converted, "attn", objective="attention", teacher=str(converted / "teacher"), trainable="kv")
    assert again == summary  # finished: resumed at its last step, nothing more to do


def test_logit_distillation_with_q_and_o_of_the_sharing_layers(converted):
    recover(converted, "logits", objective="logits", teacher=str(converted / "teacher"), trainable="kv+qo")
    names = changed(converted, "logits")
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in (1, 2, 3)} <= names
    assert "model.layers.1.self_attn.k_proj.weight" in names
    assert not any("mlp" in n or "layers.0." in n or "layers.4." in n or "embed" in n for n in names), names


def test_objectives_are_checked():
    with pytest.raises(CrossLayerError, match="objective must be one of lm, logits, attention"):
        TrainConfig(model="tiny-H32-MQA", data="d", out="o", max_steps=1, objective="hidden").validate()
    with pytest.raises(CrossLayerError, match="objective 'attention' needs a teacher"):
        TrainConfig(model="tiny-H32-MQA", data="d", out="o", max_steps=1, objective="attention").validate()
    with pytest.raises(ValueError, match="no objective 'lm'"):
        build_objective("lm", None, None)
    cfg = TrainConfig(model="tiny-H32-MQA", data="d", out="o", max_steps=1, objective="attention", teacher="t")
    with pytest.raises(CrossLayerError, match="train trainable: kv or kv\\+qo with it"):
        build_objective("attention", None, cfg)
