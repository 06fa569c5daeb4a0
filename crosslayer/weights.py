"""Checkpoint weights read and written one tensor at a time, so a conversion never holds a whole model.

Reading (`open_weights`): a checkpoint's tensor names, shapes and dtypes are known before any tensor is
read, and `read(name)` returns one tensor. Safetensors files (one, or shards with an index; a hub
repository's are downloaded first) are read with plain file reads, not mapped, so what a process
holds resident is what it asked for, and page-cache pages are not charged to it. A GGUF file's
tensors are dequantised one at a time (transformers' name map and Llama's Q/K permutation, so each
tensor equals what `from_pretrained(gguf_file=...)` would make). A `pytorch_model.bin` is opened
with torch.load(mmap=True).

Writing (`SafetensorsWriter`): the files are laid out from the names, shapes and dtypes alone, in the
safetensors format as the `safetensors` package writes it (the same bytes for the same tensors), so
each tensor is written at its place as soon as it exists, in any order; shards of at most
`max_shard_bytes` with a `model.safetensors.index.json` as transformers writes it, or one
`model.safetensors` when the model fits in one shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import CrossLayerError

# safetensors dtype names, in the order the format's writer ranks them (it sorts by rank, highest first, then name)
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES.values())}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9  # "5GB", as the CLI and transformers say it


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SourceWeights(Protocol):
    """A checkpoint's tensors: `info` (name -> TensorInfo) before any is read, `read(name)` one at a time."""

    info: dict[str, TensorInfo]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` (into `out`, a contiguous CPU tensor of its shape and dtype, when given)."""
        ...


# ----------------------------------------------------------------------------------------------
# Reading


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CrossLayerError(f"{path}: not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024**2:
            raise CrossLayerError(f"{path}: not a safetensors file (a header of {size:,} bytes)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CrossLayerError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return header, 8 + size


class SafetensorsWeights:
    """The tensors of safetensors `files`, read with plain file reads."""

    def __init__(self, files: list[Path]) -> None:
        self.info: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, last byte + 1)
        for path in files:
            header, start = _read_header(path)
            end_of_file = path.stat().st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise CrossLayerError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not supported")
                info = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
                begin, end = (start + o for o in entry["data_offsets"])
                if end - begin != info.nbytes or end > end_of_file:
                    raise CrossLayerError(f"{path}: tensor {name} does not fit its file (truncated or corrupt)")
                self.info[name] = info
                self._where[name] = (path, begin, end)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        path, begin, end = self._where[name]
        info = self.info[name]
        if out is not None and (out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous()):
            return out.copy_(self.read(name))
        buffer = torch.empty(end - begin, dtype=torch.uint8) if out is None else out.view(torch.uint8).reshape(-1)
        with open(path, "rb") as f:
            f.seek(begin)
            got = f.readinto(memoryview(buffer.numpy())) if end > begin else 0
        if got != end - begin:
            raise CrossLayerError(f"{path}: tensor {name} is truncated")
        return buffer.view(info.dtype).reshape(info.shape) if out is None else out


class TorchBinWeights:
    """The tensors of `pytorch_model*.bin` files, opened memory-mapped (nothing is read until used)."""

    def __init__(self, files: list[Path]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                self._tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
            except (RuntimeError, OSError, ValueError) as e:
                raise CrossLayerError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        self.info = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name].clone() if out is None else out.copy_(self._tensors[name])


class GGUFWeights:
    """The tensors of a GGUF file, each dequantised (to fp32) when read, named and laid out as transformers
    loads them (its GGUF name map and tensor processors, e.g. Llama's Q/K permutation undone)."""

    def __init__(self, path: Path, raw_config: dict[str, Any]) -> None:
        """`raw_config`: the model's config as transformers reads it from the file (loading.read_source_config),
        so the file's metadata is parsed here once more only, by the reader of its tensors."""
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        self.reader = GGUFReader(str(path))
        architecture = read_field(self.reader, "general.architecture")[0]  # llama.cpp's name: llama for Mistral too
        self.parsed = {"config": raw_config}
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=raw_config)
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
        if arch is None:
            raise CrossLayerError(f"{path}: GGUF architecture {architecture!r} is unknown to the gguf package")
        gguf_names = get_tensor_name_map(arch, raw_config["num_hidden_layers"])
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config_object(raw_config))  # only its tensor names are read
        names = {}  # gguf name -> transformers name
        for hf_name in skeleton.state_dict():
            base, suffix = hf_name.rsplit(".", 1)
            if (gguf_name := gguf_names.get_name(base)) is not None:
                names[f"{gguf_name}.{suffix}"] = hf_name
        self._tensors = {names[t.name]: t for t in self.reader.tensors if t.name in names}
        self.info = {name: TensorInfo(tuple(int(s) for s in reversed(t.shape.tolist())), torch.float32)
                     for name, t in self._tensors.items()}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._tensors[name]
        weights = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                         tensor_key_mapping={}, parsed_parameters=self.parsed).weights
        tensor = torch.from_numpy(np.array(weights, dtype=np.float32)).reshape(self.info[name].shape)  # a copy
        return tensor if out is None else out.copy_(tensor)


def config_object(raw: dict[str, Any]):
    """A transformers config object of a config dict."""
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return AutoConfig.for_model(raw["model_type"], **fields)


def open_weights(location: str, gguf_file: str | None = None, raw_config: dict[str, Any] | None = None) -> SourceWeights:
    """The weights of a checkpoint folder, hub repository (its safetensors downloaded) or GGUF file (with its
    `raw_config`, loading.read_source_config's), opened lazily."""
    if gguf_file is not None:
        folder = Path(location)
        if not folder.is_dir():
            folder = Path(_download(location, [gguf_file]))
        if raw_config is None:
            raise ValueError("a GGUF file's weights are opened with its config (loading.read_source_config)")
        return GGUFWeights(folder / gguf_file, raw_config)
    folder = Path(location)
    if not folder.is_dir():
        folder = Path(_download(location, ["*.safetensors", INDEX_FILE, "*.json"]))
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CrossLayerError(f"{folder / INDEX_FILE} is not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CrossLayerError(f"{folder}: the index names shard files that are not there: {', '.join(missing[:3])}")
        return SafetensorsWeights(files)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        weights = SafetensorsWeights(files)
        if not weights.info:
            raise CrossLayerError(f"{folder}: its weight files hold no tensors")
        return weights
    files = sorted(folder.glob("pytorch_model*.bin"))
    if files:
        return TorchBinWeights(files)
    raise CrossLayerError(f"{folder} has no weight files (*.safetensors or pytorch_model*.bin)")


def _download(repo: str, patterns: list[str]) -> str:
    """A local copy of hub repository `repo`'s files matching `patterns` (the hub's cache)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; each is one line for the user
        raise CrossLayerError(f"cannot download the weights of {repo}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


# ----------------------------------------------------------------------------------------------
# Writing


class SafetensorsWriter:
    """Writes the tensors `layout` names (name -> TensorInfo, in the order they fill shards) into `folder`
    as safetensors, each tensor at its place whenever it is given (`write`), in any order. `close`
    checks every tensor came, syncs the files to disk, and writes the index of a sharded model."""

    def __init__(self, folder: Path, layout: dict[str, TensorInfo], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.layout = layout
        shards: list[list[str]] = [[]]
        size = 0
        for name, info in layout.items():  # fill shards in order, as transformers does
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += info.nbytes
        count = len(shards)
        self.files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                        for i in range(count)]
        self._place: dict[str, tuple[int, int]] = {}  # name -> (shard, byte offset in its file)
        self._handles = []
        for shard, (file, names) in enumerate(zip(self.files, shards, strict=True)):
            header, offsets = self._shard_header(names, metadata or {"format": "pt"})
            for name, offset in offsets.items():
                self._place[name] = (shard, len(header) + offset)
            handle = open(self.folder / file, "wb")
            handle.write(header)
            handle.truncate(len(header) + sum(layout[n].nbytes for n in names))  # the data's place, zeros until written
            self._handles.append(handle)
        self.shards = shards
        self._pending = set(layout)

    def _shard_header(self, names: list[str], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
        """(the header bytes of a shard holding `names`, name -> offset of its data after the header). The
        tensors are ordered as the safetensors package orders them: by dtype rank (highest first), then name."""
        entries: dict[str, Any] = {"__metadata__": metadata}
        offsets, offset = {}, 0
        for name in sorted(names, key=lambda n: (-DTYPE_RANK[self.layout[n].dtype], n)):
            info = self.layout[name]
            entries[name] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
            offsets[name] = offset
            offset += info.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return struct.pack("<Q", len(text)) + text, offsets

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.layout.get(name)
        if info is None or name not in self._pending:
            raise ValueError(f"{name}: not in the layout, or written already")
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} given, {info.shape} {info.dtype} laid out")
        shard, offset = self._place[name]
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        handle = self._handles[shard]
        handle.seek(offset)
        handle.write(memoryview(data))
        self._pending.discard(name)

    def close(self) -> list[str]:
        """Check every tensor was written, sync and close the files, write the index if sharded; the files."""
        if self._pending:
            raise ValueError(f"tensors never written: {', '.join(sorted(self._pending)[:5])}")
        for handle in self._handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        self._handles = []
        if len(self.files) > 1:
            total = sum(info.nbytes for info in self.layout.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: self.files[s] for s, names in enumerate(self.shards) for n in sorted(names)}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return [*self.files, INDEX_FILE]
        return list(self.files)

    def abort(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []
