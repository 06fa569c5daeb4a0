"""Streaming conversion: crosslayer.weights' reader and writer against the safetensors package, and `convert`'s
output against the in-memory path (from_hf's pieces, then save_pretrained), byte for byte."""

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crosslayer import CLAForCausalLM
from crosslayer.__main__ import main
from crosslayer.calibration import Calibration, read_calibration
from crosslayer.convert import convert, dense_copy, load_source, read_source_config, share_kv, target_config
from crosslayer.loading import load_tokenizer
from crosslayer.plan import Searcher
from crosslayer.weights import SafetensorsWeights, SafetensorsWriter, TensorInfo, open_weights

from .test_convert import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Reading and writing safetensors one tensor at a time


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(3, 5, generator=g).bfloat16(), "a.x": torch.randn(2, 2, generator=g),
            "c": torch.randn(5, generator=g).half(), "a.a": torch.arange(3), "z.i": torch.arange(4, dtype=torch.int32),
            "y": torch.randn(7, generator=g).bfloat16(), "e": torch.zeros(0), "d": torch.randn(2, 3, generator=g).double()}


def test_writer_writes_what_the_safetensors_package_writes_in_any_order(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    writer = SafetensorsWriter(tmp_path / "out", {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in tensors.items()})
    for name in sorted(tensors, reverse=True):
        writer.write(name, tensors[name])
    assert writer.close() == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_shards_fill_in_order_with_an_index_and_refuse_mistakes(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    writer = SafetensorsWriter(tmp_path, {n: TensorInfo((10,), torch.float32) for n in tensors}, max_shard_bytes=100)
    with pytest.raises(ValueError, match="given"):
        writer.write("t0", torch.zeros(11))
    for name, t in tensors.items():
        writer.write(name, t)
    with pytest.raises(ValueError, match="written already"):
        writer.write("t0", tensors["t0"])
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1], "t4": files[2]}
    for shard in files[:3]:  # each shard is what save_file writes of its tensors
        mine = {n: tensors[n] for n, f in index["weight_map"].items() if f == shard}
        save_file(mine, tmp_path / "reference.safetensors", metadata={"format": "pt"})
        assert (tmp_path / shard).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    (tmp_path / "x").mkdir()
    unfinished = SafetensorsWriter(tmp_path / "x", {"a": TensorInfo((1,), torch.float32)})
    with pytest.raises(ValueError, match="never written: a"):
        unfinished.close()
    unfinished.abort()


def test_reader_reads_what_safe_open_reads(tmp_path):
    tensors = mixed_tensors()
    save_file(dict(list(tensors.items())[:4]), tmp_path / "one.safetensors")
    save_file(dict(list(tensors.items())[4:]), tmp_path / "two.safetensors")
    weights = SafetensorsWeights([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
    assert set(weights.info) == set(tensors)
    for path in ("one", "two"):
        with safe_open(tmp_path / f"{path}.safetensors", "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                got = weights.read(name)
                assert got.dtype == f.get_tensor(name).dtype and torch.equal(got, f.get_tensor(name))
                assert weights.info[name].shape == tuple(got.shape)


# ----------------------------------------------------------------------------------------------
# convert() streams, and writes what the in-memory path writes


def in_memory(src: Path, out: Path, cla_factor: int | None = None, kv_init: str = "mean", tokens=None,
              compute_dtype=torch.float32, kv_sources=None, dtype=None) -> None:
    """Today's in-memory conversion, from its pieces: the whole source loaded by transformers, its dense copy,
    the calibration on it, the sharing, save_pretrained."""
    source = load_source(src)
    dense = dense_copy(source)
    config = target_config(read_source_config(src), cla_factor or 1, kv_sources=kv_sources)
    calibration = None if tokens is None else Calibration(dense, tokens, compute_dtype=compute_dtype)
    model = share_kv(dense, config, kv_init, calibration)
    model.to(dtype or next(source.parameters()).dtype).save_pretrained(out)


def assert_same_files(reference: Path, streamed: Path) -> None:
    for path in sorted(reference.iterdir()):
        assert path.read_bytes() == (streamed / path.name).read_bytes(), path.name


@pytest.fixture(scope="module")
def sources(tmp_path_factory, wiki_tokenizer):
    """Saved tiny models: GQA Llama, tied Llama, Qwen2 with biases, a bf16 Llama, the Llama in shards."""
    root = tmp_path_factory.mktemp("sources")
    vocab = len(wiki_tokenizer)
    models = {"llama": tiny("llama", vocab_size=vocab), "tied": tiny("llama", vocab_size=vocab, tie_word_embeddings=True),
              "qwen2": tiny("qwen2", vocab_size=vocab), "bf16": tiny("llama", vocab_size=vocab).to(torch.bfloat16)}
    for name, model in models.items():
        model.save_pretrained(root / name)
        wiki_tokenizer.save_pretrained(root / name)
    models["llama"].save_pretrained(root / "sharded", max_shard_size="300KB")
    wiki_tokenizer.save_pretrained(root / "sharded")
    return root


def tokens_of(src: Path, calibration_text: Path) -> torch.Tensor:
    """The calibration tokens convert reads for `src` (with the tokenizer transformers loads from its folder:
    for a Qwen2 folder, Qwen2's class, which splits text its own way)."""
    return read_calibration(str(calibration_text), load_tokenizer(src), 256, 64)


@pytest.mark.parametrize("name,kv_init", [("llama", "mean"), ("llama", "fit"), ("tied", "mean-folded"),
                                          ("qwen2", "fit"), ("bf16", "fit"), ("sharded", "first")])
def test_streamed_conversion_is_the_in_memory_one_byte_for_byte(name, kv_init, sources, tmp_path,
                                                                calibration_text):
    src = sources / name
    compute = "bf16" if name == "bf16" else "fp32"
    calibration = dict(calibration=str(calibration_text), calibration_tokens=256, calibration_seq_len=64) \
        if kv_init == "fit" else {}
    summary = convert(src, tmp_path / "streamed", cla_factor=2, kv_init=kv_init, compute_dtype=compute, **calibration)
    in_memory(src, tmp_path / "reference", 2, kv_init, tokens_of(src, calibration_text) if kv_init == "fit" else None,
              torch.bfloat16 if compute == "bf16" else torch.float32)
    assert_same_files(tmp_path / "reference", tmp_path / "streamed")
    assert summary["weight_files"] == ["model.safetensors"]
    assert summary["dtype"] == ("bfloat16" if name == "bf16" else "float32")


def test_plan_search_streams_and_chooses_what_the_in_memory_search_chooses(sources, tmp_path,
                                                                           calibration_text):
    src = sources / "qwen2"
    tokens = tokens_of(src, calibration_text)
    summary = convert(src, tmp_path / "streamed", search=Searcher(producers=2, search_tokens=128), kv_init="fit",
                      calibration=str(calibration_text), calibration_tokens=256, calibration_seq_len=64,
                      compute_dtype="fp32")
    dense = dense_copy(load_source(src))
    chosen = Searcher(producers=2, search_tokens=128)(Calibration(dense, tokens, compute_dtype=torch.float32))
    assert summary["kv_sources"] == chosen["kv_sources"]
    in_memory(src, tmp_path / "reference", kv_init="fit", tokens=tokens, kv_sources=chosen["kv_sources"])
    assert_same_files(tmp_path / "reference", tmp_path / "streamed")


def test_activations_on_disk_give_the_same_model(sources, tmp_path, calibration_text, monkeypatch):
    import crosslayer.convert as convert_module

    src, fit = sources / "qwen2", dict(kv_init="fit", calibration=str(calibration_text), calibration_tokens=256,
                                      calibration_seq_len=64, compute_dtype="fp32")
    convert(src, tmp_path / "memory", cla_factor=2, activations=None, **fit)
    convert(src, tmp_path / "disk", cla_factor=2, activations=tmp_path / "acts", **fit)
    assert (tmp_path / "acts" / "hidden-0.pt").is_file() and (tmp_path / "acts" / "keys-3.pt").is_file()
    same = ("model.safetensors", "config.json")
    assert all((tmp_path / "memory" / f).read_bytes() == (tmp_path / "disk" / f).read_bytes() for f in same)
    monkeypatch.setattr(convert_module, "_available_memory", lambda: 1000)  # auto: to disk, beside OUT, removed
    convert(src, tmp_path / "outs" / "auto", cla_factor=2, **fit)
    assert json.loads((tmp_path / "outs" / "auto" / "plan.json").read_text())["calibration"]["activations"] == "disk"
    assert [p.name for p in (tmp_path / "outs").iterdir()] == ["auto"]
    assert all((tmp_path / "memory" / f).read_bytes() == (tmp_path / "outs" / "auto" / f).read_bytes() for f in same)


def test_sharded_output_loads_to_the_same_model(sources, tmp_path):
    convert(sources / "llama", tmp_path / "one", cla_factor=2, dtype="bf16")
    summary = convert(sources / "llama", tmp_path / "shards", cla_factor=2, dtype="bf16", max_shard_bytes=100_000)
    assert len(summary["weight_files"]) > 3 and summary["weight_files"][-1] == "model.safetensors.index.json"
    whole = load_file(tmp_path / "one" / "model.safetensors")
    pieces = {}
    for file in summary["weight_files"][:-1]:
        pieces.update(load_file(tmp_path / "shards" / file))
    assert pieces.keys() == whole.keys() and all(torch.equal(pieces[k], whole[k]) for k in whole)
    model = CLAForCausalLM.from_pretrained(tmp_path / "shards")  # transformers reads the index
    assert all(torch.equal(model.state_dict()[k].bfloat16(), whole[k]) for k in whole)


def test_conversion_holds_a_tensor_or_two_not_the_model(sources, tmp_path, monkeypatch):
    """Every tensor read from the source is tracked until it is freed: a conversion without calibration never
    holds more than the largest tensor, a group's K/V and one more (the in-memory path holds the model)."""
    live, peak = {}, [0]
    read = SafetensorsWeights.read

    def tracked(self, name):
        tensor = read(self, name)
        key = id(tensor)
        live[key] = tensor.nbytes
        weakref.finalize(tensor, live.pop, key, None)
        peak[0] = max(peak[0], sum(live.values()))
        return tensor

    monkeypatch.setattr(SafetensorsWeights, "read", tracked)
    convert(sources / "llama", tmp_path / "out", cla_factor=2, kv_init="mean")
    weights = open_weights(str(sources / "llama"))
    sizes = sorted((i.nbytes for i in weights.info.values()), reverse=True)
    kv = sum(i.nbytes for n, i in weights.info.items() if n.startswith("model.layers.0.") and n.split(".")[3] == "self_attn"
             and n.split(".")[4] in ("k_proj", "v_proj"))
    assert 0 < peak[0] <= sizes[0] + sizes[1] + 2 * kv < sum(sizes) / 2


def test_calibration_streamed_one_layer_at_a_time_equals_the_resident_one(sources, calibration_text):
    from crosslayer.convert import LazySource

    tokens = tokens_of(sources / "qwen2", calibration_text)
    source = LazySource(open_weights(str(sources / "qwen2")), read_source_config(sources / "qwen2"))
    resident = Calibration(dense_copy(load_source(sources / "qwen2")), tokens[:2])
    skeleton = source.model(torch.float32, torch.device("cpu"), resident=False)
    loaded = []

    def load(name, module):
        materialised = [n for n, p in skeleton.named_parameters() if p.device.type != "meta"]
        assert materialised == [], f"{name} loaded while {materialised[:2]} still held"
        loaded.append(name)
        source.load(name, module, torch.float32, torch.device("cpu"))

    streamed = Calibration(skeleton, tokens[:2], load=load, device="cpu")
    assert loaded == ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)]
    for field in ("keys", "values", "key_metrics", "value_metrics"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(resident, field), getattr(streamed, field), strict=True))
    assert all(torch.equal(a, b) for x, y in zip(resident.hidden, streamed.hidden, strict=True)
               for a, b in zip(x, y, strict=True))
    fitted, reference = streamed.fit([1, 2, 3]), resident.fit([1, 2, 3])
    assert all(torch.equal(fitted[k], reference[k]) for k in reference)


def test_plan_search_a_layer_at_a_time_equals_the_resident_search(sources, calibration_text):
    """The same plans measured, the same costs, exactly, with one layer of the model held at a time."""
    from crosslayer.convert import LazySource

    src = sources / "tied"  # tied: the output layer streams from the embedding
    tokens = tokens_of(src, calibration_text)
    source = LazySource(open_weights(str(src)), read_source_config(src))
    cpu = torch.device("cpu")
    resident = Searcher(producers=2, search_tokens=128)(Calibration(source.model(torch.float32, cpu), tokens))
    skeleton = source.model(torch.float32, cpu, resident=False)
    held = []

    def load(name, module):
        held.append(sum(p.numel() for n, p in skeleton.named_parameters() if not p.is_meta))
        source.load(name, module, torch.float32, cpu)

    streamed = Searcher(producers=2, search_tokens=128)(Calibration(skeleton, tokens, load=load, device=cpu))
    assert streamed["kv_sources"] == resident["kv_sources"] and streamed["evaluations"] == resident["evaluations"]
    timeless = [[{k: v for k, v in step.items() if k != "seconds"} for step in r["steps"]] for r in (streamed, resident)]
    assert timeless[0] == timeless[1]  # every step: the same plan, cost (to the digit) and evaluations
    assert max(held) <= sum(p.numel() for p in skeleton.model.norm.parameters()) + skeleton.lm_head.weight.numel()
    assert len(held) > 20  # layers loaded again for every plan run


def test_device_flag_is_checked_before_anything_is_read(sources, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["convert", str(sources / "llama"), "--out", str(tmp_path / "x"), "--cla-factor", "2",
                 "--kv-init", "mean", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["convert", str(sources / "llama"), "--out", str(tmp_path / "x"), "--cla-factor", "2",
                 "--kv-init", "mean", "--max-shard-size", "5XB"]) == 2
    assert "expected a size like 5GB" in capsys.readouterr().err and not (tmp_path / "x").exists()
