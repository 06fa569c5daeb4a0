"""CLAConfig: a Llama configuration plus one per-layer list saying whose K/V each layer uses.

Cross-Layer Attention (Brandon et al., NeurIPS 2024) shares key/value projections between
adjacent decoder layers. Everything about the sharing lives in `kv_sources`: `kv_sources[i]` is
the layer whose K/V layer `i` attends with. A layer with `kv_sources[i] == i` is a *producer*: it
owns `k_proj`/`v_proj` and a KV cache slot. Any other layer is a *consumer* of an earlier producer.
Named patterns (CLA2, KeepEnds, ...) are just functions that produce that list; `kv_groups`,
`from_groups` and `describe` read and write it as sharing groups (a plan).

The named presets reproduce the paper's design space (Table 1, the 3B runs) and TinyLlama, and
add small shapes that train on a CPU. `load_config` reads a preset, a crosslayer or Llama-family
config.json (the latter as its dense twin), a YAML file or a dict of fields.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

from .errors import CrossLayerError
from .recipe import read_yaml

CLA_PATTERNS = ("uniform", "keep_ends", "dense_front", "dense_back")
# rope types our rotary embedding reproduces exactly (tested against transformers' Llama, tests/test_convert.py)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


# ----------------------------------------------------------------------------------------------
# Sharing patterns -> kv_sources, and kv_sources as sharing groups


def _grouped(start: int, stop: int, factor: int) -> list[int]:
    """kv_sources for layers start..stop-1 in consecutive groups of `factor` (last may be shorter)."""
    return [start + ((i - start) // factor) * factor for i in range(start, stop)]


def kv_sources_for(num_layers: int, cla_factor: int = 1, cla_pattern: str = "uniform") -> list[int]:
    """The per-layer K/V source list of a named sharing pattern.

    uniform:     groups of `cla_factor` consecutive layers from layer 0.
    keep_ends:   the first and last layer own their K/V; the layers between are grouped uniformly.
    dense_front: the first `cla_factor` layers own their K/V; the rest are grouped uniformly.
    dense_back:  grouped uniformly from the front; the last `cla_factor` layers own their K/V.
    """
    if cla_factor < 1:
        raise CrossLayerError(f"cla_factor must be >= 1, got {cla_factor}")
    if cla_pattern not in CLA_PATTERNS:
        raise CrossLayerError(f"cla_pattern must be one of {', '.join(CLA_PATTERNS)}; got {cla_pattern!r}")
    n, f = num_layers, cla_factor
    if cla_pattern == "uniform":
        return _grouped(0, n, f)
    if cla_pattern == "keep_ends":
        if n <= 2:
            return list(range(n))
        return [0] + _grouped(1, n - 1, f) + [n - 1]
    if cla_pattern == "dense_front":
        dense = min(f, n)
        return list(range(dense)) + _grouped(dense, n, f)
    dense = min(f, n)  # dense_back
    return _grouped(0, n - dense, f) + list(range(n - dense, n))


def validate_kv_sources(kv_sources: list[int], num_layers: int) -> None:
    """Raise CrossLayerError naming the first layer whose source is not a valid earlier producer."""
    if not isinstance(kv_sources, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in kv_sources
    ):
        raise CrossLayerError(f"kv_sources must be a list of layer indices (ints), got {kv_sources!r}")
    if len(kv_sources) != num_layers:
        raise CrossLayerError(
            f"kv_sources has {len(kv_sources)} entries but the model has num_hidden_layers={num_layers}; "
            "give one source per layer"
        )
    for i, src in enumerate(kv_sources):
        if src < 0:
            raise CrossLayerError(f"kv_sources[{i}] = {src} is negative; sources are layer indices")
        if src > i:
            raise CrossLayerError(
                f"kv_sources[{i}] = {src} points at a later layer; a layer can only reuse the K/V of "
                "itself or an earlier layer"
            )
        if kv_sources[src] != src:
            raise CrossLayerError(
                f"kv_sources[{i}] = {src}, but layer {src} is itself a consumer (of layer "
                f"{kv_sources[src]}); point layer {i} at a producer (a layer whose source is itself)"
            )


def kv_groups(kv_sources: list[int]) -> dict[int, list[int]]:
    """producer -> every layer that attends with its K/V, in order (the producer first)."""
    groups: dict[int, list[int]] = {}
    for layer, src in enumerate(kv_sources):
        groups.setdefault(src, []).append(layer)
    return groups


def from_groups(sizes: list[int]) -> list[int]:
    """kv_sources of contiguous groups of these sizes, front to back: [1, 2, 3] -> [0, 1, 1, 3, 3, 3]."""
    sources, start = [], 0
    for size in sizes:
        sources += [start] * size
        start += size
    return sources


def describe(kv_sources: list[int]) -> str:
    """`[0] [1] [2-3] [4-6]`: each group of layers that share one producer's K/V."""
    spans = []
    for members in kv_groups(kv_sources).values():
        if len(members) == 1:
            spans.append(f"[{members[0]}]")
        elif members == list(range(members[0], members[-1] + 1)):
            spans.append(f"[{members[0]}-{members[-1]}]")
        else:
            spans.append("[" + ",".join(map(str, members)) + "]")
    return " ".join(spans)


# ----------------------------------------------------------------------------------------------
# The configuration


class CLAConfig(PreTrainedConfig):
    r"""Configuration of a Llama-style decoder with Cross-Layer Attention.

    The Llama fields keep their transformers meaning. Additions:
        head_dim (`int`): per-head width, independent of `hidden_size` (the paper varies it).
        kv_sources (`list[int]`, *optional*): per layer, the layer whose K/V it attends with.
        cla_factor (`int`): layers per sharing group when `kv_sources` is derived.
        cla_pattern (`str`): one of `uniform`, `keep_ends`, `dense_front`, `dense_back`; or
            `custom` when `kv_sources` was given explicitly.
        o_proj_bias (`bool`, *optional*): bias on the attention output projection; `None` (the
            default) follows `attention_bias`, which then covers q, k, v and o as in Llama. Qwen2
            has `attention_bias=True, o_proj_bias=False` (biases on q, k, v only).
    Defaults are the paper's 1B H128-MQA shape (vocabulary of the GPT-NeoX tokenizer, padded).
    """

    model_type = "crosslayer"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 5472
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 1
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.01275  # the paper's N(0, 0.01275) init
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False  # on q/k/v, and on o unless o_proj_bias says otherwise
    o_proj_bias: bool | None = None  # None: same as attention_bias
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    cla_factor: int = 1
    cla_pattern: str = "uniform"
    kv_sources: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        super().__post_init__(**kwargs)
        self._validate_shape()
        self._resolve_kv_sources()

    def _validate_shape(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CrossLayerError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise CrossLayerError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_key_value_heads > self.num_attention_heads:
            raise CrossLayerError(
                f"num_key_value_heads ({self.num_key_value_heads}) cannot exceed num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CrossLayerError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): each K/V head serves a whole group of query heads"
            )
        if not self.rms_norm_eps > 0:
            raise CrossLayerError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.attention_dropout:
            raise CrossLayerError("attention_dropout must be 0: crosslayer models use no dropout, as in the paper")
        for name in ("attention_bias", "o_proj_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise CrossLayerError(f"{name} must be true or false, got {getattr(self, name)!r}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise CrossLayerError(
                f"rope_parameters: rope_type {rope_type!r} is not implemented; supported: {', '.join(ROPE_TYPES)}"
            )

    def _resolve_kv_sources(self) -> None:
        if not isinstance(self.cla_factor, int) or isinstance(self.cla_factor, bool) or self.cla_factor < 1:
            raise CrossLayerError(f"cla_factor must be an integer >= 1, got {self.cla_factor!r}")
        if self.kv_sources is None:
            if self.cla_pattern == "custom":
                raise CrossLayerError("cla_pattern='custom' needs an explicit kv_sources list")
            self.kv_sources = kv_sources_for(self.num_hidden_layers, self.cla_factor, self.cla_pattern)
            return
        self.kv_sources = list(self.kv_sources)
        validate_kv_sources(self.kv_sources, self.num_hidden_layers)
        if self.cla_pattern == "custom":
            return
        if self.cla_pattern not in CLA_PATTERNS:
            raise CrossLayerError(
                f"cla_pattern must be one of {', '.join(CLA_PATTERNS)} or 'custom'; got {self.cla_pattern!r}"
            )
        derived = kv_sources_for(self.num_hidden_layers, self.cla_factor, self.cla_pattern)
        if self.kv_sources == derived:
            return
        if (self.cla_factor, self.cla_pattern) != (1, "uniform"):
            raise CrossLayerError(
                f"kv_sources {self.kv_sources} contradicts cla_factor={self.cla_factor}, "
                f"cla_pattern={self.cla_pattern!r} (which give {derived}); give one or the other"
            )
        self.cla_pattern = "custom"

    # -- derived facts ------------------------------------------------------------------------

    @property
    def producer_layers(self) -> list[int]:
        """Indices of the layers that compute and cache their own K/V."""
        return [i for i, s in enumerate(self.kv_sources) if s == i]

    @property
    def num_producer_layers(self) -> int:
        return len(self.producer_layers)

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' per-layer sharing flags: consumers get a cache slot that stores nothing."""
        consumed = set(self.kv_sources[i] for i in range(len(self.kv_sources)) if self.kv_sources[i] != i)
        return [
            "reuse" if s != i else ("store" if i in consumed else None) for i, s in enumerate(self.kv_sources)
        ]

    def kv_bytes_per_token(self, bytes_per_element: float = 2) -> float:
        """Bytes of K and V cached per token: 2 x kv_heads x head_dim x producer_layers x bytes."""
        n = 2 * self.num_key_value_heads * self.head_dim * self.num_producer_layers * bytes_per_element
        return int(n) if float(n).is_integer() else n

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shape (equals `sum(p.numel())` of the built model)."""
        d, hd, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        ab, ob, mb = int(self.attention_bias), int(self.o_proj_bias), int(self.mlp_bias)
        per_layer = (d + ab) * q_out + (q_out * d + ob * d) + 2 * d  # q, o, two norms
        per_layer += 3 * d * self.intermediate_size + mb * (2 * self.intermediate_size + d)
        per_producer = 2 * (d + ab) * kv_out + d  # k, v and the KV-input norm
        n = L * per_layer + self.num_producer_layers * per_producer + d  # + final norm
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n

    # -- presets ------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CLAConfig:
        """A named configuration, e.g. `1b-H128-MQA-CLA2` or `tinyllama-1.1b-CLA2`; see `PRESETS`."""
        return cls(**{**preset_fields(name), **overrides})


# ----------------------------------------------------------------------------------------------
# Presets. Names follow the paper: <scale>-H<head_dim>-<MHA|GQA<kv heads>|MQA>[-CLA<f>][-<Pattern>].

SCALES: dict[str, dict[str, Any]] = {
    # the paper's two scales; vocabulary of the GPT-NeoX tokenizer padded to a multiple of 128
    "1b": dict(hidden_size=2048, intermediate_size=5472, num_hidden_layers=20, vocab_size=50304,
               max_position_embeddings=2048),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, vocab_size=50304,
               max_position_embeddings=2048),
    # GPT-2-small-like shape, for throughput and MFU on one GPU
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, vocab_size=50304,
                 max_position_embeddings=2048),
    # ~20M parameters at an 8k vocabulary: CPU benchmarks and the CPU reproduction
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, vocab_size=8192,
                  max_position_embeddings=1024),
    # seconds per step on a laptop CPU: tests, quickstart
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, vocab_size=4096,
                 max_position_embeddings=512),
}

_PATTERN_NAMES = {"KeepEnds": "keep_ends", "DenseFront": "dense_front", "DenseBack": "dense_back"}
_NAME_RE = re.compile(
    r"^(?P<scale>[a-z0-9]+)-H(?P<hd>\d+)-(?P<attn>MHA|MQA|GQA(?P<kv>\d+))"
    r"(?:-CLA(?P<f>\d+))?(?:-(?P<pattern>KeepEnds|DenseFront|DenseBack))?$"
)

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

PRESETS: list[str] = [
    # Table 1: the 1B design space
    "1b-H128-MHA", "1b-H128-GQA4", "1b-H128-GQA2", "1b-H128-MQA", "1b-H64-MQA", "1b-H46-MQA",
    "1b-H32-MQA", "1b-H512-MQA-CLA2", "1b-H256-MQA-CLA2", "1b-H128-MQA-CLA2", "1b-H90-MQA-CLA2",
    "1b-H64-MQA-CLA2", "1b-H256-GQA4-CLA2", "1b-H128-GQA4-CLA2", "1b-H128-GQA2-CLA2",
    "1b-H128-MQA-CLA3", "1b-H128-MQA-CLA4", "1b-H128-MQA-CLA2-KeepEnds",
    "1b-H128-MQA-CLA2-DenseFront", "1b-H128-MQA-CLA2-DenseBack",
    # Tables 5 and 7: 3B
    "3b-H128-MQA", "3b-H128-MQA-CLA2", "3b-H64-MQA", "3b-H64-MQA-CLA2", "3b-H32-MQA",
    # TinyLlama-1.1B (GQA4) and its CLA2 twin
    "tinyllama-1.1b", "tinyllama-1.1b-CLA2",
    # single-GPU and CPU shapes: the paper's three-way comparison at each
    "125m-H64-MQA", "125m-H64-MQA-CLA2", "125m-H32-MQA", "125m-H64-MHA",
    "small-H64-MQA", "small-H64-MQA-CLA2", "small-H32-MQA", "small-H64-MHA",
    "tiny-H32-MQA", "tiny-H32-MQA-CLA2", "tiny-H16-MQA", "tiny-H32-GQA2",
]


def query_heads_for(hidden_size: int, head_dim: int, kv_heads: int) -> int:
    """Query heads so that heads x head_dim is as close to d_model as a multiple of kv_heads allows.

    Exact whenever head_dim divides d_model. Where it does not (the paper's H46 and H90 at
    d_model 2048) we round to the nearest: H46 -> 45 heads (2070 wide), H90 -> 23 heads (2070).
    """
    groups = max(1, round(hidden_size / head_dim / kv_heads))
    return groups * kv_heads


def preset_fields(name: str) -> dict[str, Any]:
    """The CLAConfig fields of a preset name (any valid combination, not only those in PRESETS)."""
    if name in ("tinyllama-1.1b", "tinyllama-1.1b-CLA2"):
        return dict(TINYLLAMA, cla_factor=2 if name.endswith("CLA2") else 1)
    m = _NAME_RE.match(name)
    if m is None or m["scale"] not in SCALES:
        raise CrossLayerError(
            f"unknown preset {name!r}: expected <scale>-H<head_dim>-<MHA|GQA<n>|MQA>[-CLA<f>][-KeepEnds|"
            f"-DenseFront|-DenseBack] with scale in {', '.join(SCALES)}, or tinyllama-1.1b[-CLA2] "
            "(`crosslayer kv --list-presets` lists the named ones)"
        )
    fields = dict(SCALES[m["scale"]])
    head_dim = int(m["hd"])
    d = fields["hidden_size"]
    if m["attn"] == "MHA":
        heads = query_heads_for(d, head_dim, 1)
        kv_heads = heads
    else:
        kv_heads = 1 if m["attn"] == "MQA" else int(m["kv"])
        heads = query_heads_for(d, head_dim, kv_heads)
    fields.update(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  cla_factor=int(m["f"] or 1))
    if m["pattern"]:
        if not m["f"]:
            raise CrossLayerError(f"preset {name!r}: a sharing pattern needs a -CLA<factor>")
        fields["cla_pattern"] = _PATTERN_NAMES[m["pattern"]]
    return fields


# ----------------------------------------------------------------------------------------------
# Loading a config from whatever the user points at

# transformers model types whose config carries the same fields as ours (Llama layout) -> the
# attention biases they hard-code (None: read `attention_bias` from the config, as Llama does)
LLAMA_FAMILY: dict[str, tuple[bool, bool] | None] = {
    "llama": None,
    "mistral": (False, False),
    "qwen2": (True, False),  # biases on q, k, v; none on o
}


def _check_no_sliding_window(raw: dict[str, Any]) -> None:
    """Refuse a config whose sliding-window attention would take effect: our model attends in full."""
    model_type, window = raw["model_type"], raw.get("sliding_window")
    if model_type == "qwen2":  # Qwen2 windows only the layers that layer_types marks, and only if use_sliding_window
        if not raw.get("use_sliding_window", False):
            window = None
        types = raw.get("layer_types")
        if types is None:  # older configs: transformers windows the layers from max_window_layers on
            types = ["sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
                     for i in range(raw["num_hidden_layers"])]
        if "sliding_attention" not in types:
            window = None
    if window is not None and window < raw.get("max_position_embeddings", 0):
        raise CrossLayerError(
            f"this {model_type} config uses sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={raw.get('max_position_embeddings')}), which crosslayer does not implement; "
            "supported: full attention (sliding_window null or >= max_position_embeddings"
            + (", or use_sliding_window false)" if model_type == "qwen2" else ")")
        )


def fields_from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    """CLAConfig fields from a transformers Llama-family config.json (a dense, CLA1 model)."""
    model_type = raw.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise CrossLayerError(
            f"config of model_type {model_type!r} is not supported; supported: crosslayer, " + ", ".join(LLAMA_FAMILY)
        )
    _check_no_sliding_window(raw)
    keep = set(MODEL_FIELDS) - {"cla_factor", "cla_pattern", "kv_sources", "o_proj_bias"}
    fields = {k: v for k, v in raw.items() if k in keep}
    biases = LLAMA_FAMILY[model_type]
    if biases is not None:
        fields["attention_bias"], fields["o_proj_bias"] = biases
    if raw.get("rope_scaling") and not raw.get("rope_parameters"):
        scaling = dict(raw["rope_scaling"])
        scaling.setdefault("rope_type", scaling.pop("type", "default"))  # pre-4.45 configs say `type`
        fields["rope_parameters"] = dict(scaling, rope_theta=raw.get("rope_theta", 10000.0))
    elif "rope_theta" in raw and not raw.get("rope_parameters"):
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = raw["num_attention_heads"]
    if fields.get("head_dim") is None:
        fields["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    if raw.get("attention_dropout"):
        fields["attention_dropout"] = 0.0  # inference-time dropout is off anyway; CLA models use none
    return fields


def to_llama_config(config: CLAConfig, max_len: int = 0):
    """transformers' LlamaConfig of the same shape as `config`: its dense (CLA1) twin, every layer its own K/V.

    The inverse of `fields_from_hf` for a Llama config; `max_len` raises max_position_embeddings."""
    from transformers import LlamaConfig

    if config.o_proj_bias != config.attention_bias:
        raise CrossLayerError("a Llama config has one attention_bias for q, k, v and o; this config differs on o")
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       head_dim=config.head_dim, max_position_embeddings=max(config.max_position_embeddings, max_len),
                       rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
                       tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
                       attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, hidden_act=config.hidden_act,
                       bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                       pad_token_id=config.pad_token_id, attn_implementation="sdpa")


def load_config(spec: str | dict[str, Any], **overrides: Any) -> CLAConfig:
    """A CLAConfig from a preset name, a model folder, a config.json / YAML file, or a dict of fields.

    A transformers Llama config is read as its dense (CLA1) twin; `overrides` (e.g.
    `cla_factor=2`) then apply, so one can ask what CLA would do to an existing model.
    """
    if isinstance(spec, dict):
        raw = dict(spec)
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            if "/" in str(spec) or str(spec).endswith((".json", ".yaml", ".yml")):
                raise CrossLayerError(f"config file not found: {spec}")
            return CLAConfig.from_preset(str(spec), **overrides)
        raw = read_yaml(path, "model config")  # JSON is YAML: config.json reads the same way
        if not raw:
            raise CrossLayerError(f"{path} holds no config fields")
    if "preset" in raw:
        base = preset_fields(raw.pop("preset"))
        raw = {**base, **raw}
    if raw.get("model_type", "crosslayer") != "crosslayer":
        raw = fields_from_hf(raw)
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):  # bookkeeping, not model fields
        raw.pop(key, None)
    unknown = set(raw) - set(CLAConfig.__dataclass_fields__) - _PASSTHROUGH
    if unknown:
        raise CrossLayerError(
            f"unknown config field(s): {', '.join(sorted(unknown))}; the model fields are "
            + ", ".join(MODEL_FIELDS)
        )
    return CLAConfig(**{**raw, **overrides})


MODEL_FIELDS: tuple[str, ...] = tuple(CLAConfig.__annotations__)
# fields of PreTrainedConfig itself that saved configs carry
_PASSTHROUGH = {"dtype", "torch_dtype", "_name_or_path", "attn_implementation"}
