import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"

# no test may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent (it sits beside the checkout in CI)")
    return DATA


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory):
    """Real text for calibration: the first 60 kB of WikiText-2 validation."""
    src = DATA / "wikitext-2" / "wiki.valid.raw"
    if not src.exists():
        pytest.skip(f"{src} absent")
    path = tmp_path_factory.mktemp("calib") / "valid.txt"
    path.write_text(src.read_text(encoding="utf-8")[:60000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a CPU other jobs share (use per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    """A tiny fp32 CLA config; 4 layers so every sharing pattern differs."""
    from crosslayer import CLAConfig

    fields = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  initializer_range=0.05)
    fields.update(overrides)
    return CLAConfig(**fields)


def last_json(stdout: str) -> dict:
    """The JSON object a command prints last (the --json convention)."""
    import json

    return json.loads(stdout.strip().splitlines()[-1])


def run_cli(*args: str, env=None):
    import subprocess

    return subprocess.run([sys.executable, "-m", "crosslayer", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def wiki_tokenizer():
    """A 400-token byte-level BPE trained on WikiText-2 validation text (real data), in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    src = DATA / "wikitext-2" / "wiki.valid.raw"
    if not src.exists():
        pytest.skip(f"{src} absent")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(src)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
