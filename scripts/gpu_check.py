"""GPU sanity check before benchmarking: the CLA model on CUDA matches its own cached decoding and
transformers' Llama (fp32 and bf16), and generate() works. Prints one JSON line."""

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import crosslayer  # noqa: F401
from crosslayer import CLAConfig, CLAForCausalLM
from crosslayer.convert import from_hf
from crosslayer.kv import cache_nbytes

dev = torch.device("cuda")
torch.manual_seed(0)
out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
config = CLAConfig.from_preset("tiny-H32-GQA2", cla_factor=2, vocab_size=512)
model = CLAForCausalLM(config).to(dev).eval()
ids = torch.randint(0, 512, (2, 64), device=dev)
with torch.no_grad():
    full = model(ids).logits
    o = model(ids[:, :40], use_cache=True)
    steps, cache = [o.logits], o.cache
    for t in range(40, 64):
        o = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(o.logits)
out["cached_vs_full_max_abs"] = (torch.cat(steps, 1) - full).abs().max().item()
out["cache_bytes_equal_formula"] = cache_nbytes(cache) == 2 * 64 * config.kv_bytes_per_token(4)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2)).to(dev).eval()
cla = from_hf(llama).to(dev)
with torch.no_grad():
    out["from_hf_fp32_max_abs"] = (cla(ids).logits - llama(ids).logits).abs().max().item()
    bf16_diff = cla.bfloat16()(ids).logits.float() - llama.bfloat16()(ids).logits.float()
    out["from_hf_bf16_max_abs"] = bf16_diff.abs().max().item()
    a = llama.generate(ids[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
    b = cla.generate(ids[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
out["generate_equal_bf16"] = bool(torch.equal(a, b))
ok = out["cached_vs_full_max_abs"] < 1e-4 and out["from_hf_fp32_max_abs"] < 1e-4 and out["cache_bytes_equal_formula"]
out["ok"] = bool(ok)
print(json.dumps(out))
