"""Calibration and plan search in bf16: the choices and the fits hold against fp32 / float64 references."""

import pytest
import torch

from crosslayer import CrossLayerError
from crosslayer.calibration import FIT_RIDGE, Calibration, resolve_compute_dtype
from crosslayer.config import from_groups
from crosslayer.convert import from_hf, share_kv, sharing_config
from crosslayer.device import has_bf16_matrix_units
from crosslayer.plan import Reference, search

from .test_convert import reference_fit, tiny_llama
from .test_plan import kl_of

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run on one thread


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama of 8 layers, calibration tokens, and its Reference in fp32 and in bf16."""
    torch.manual_seed(0)
    source = tiny_llama(num_hidden_layers=8)
    tokens = torch.randint(0, 257, (4, 32))
    dense = from_hf(source)
    return source, tokens, {dtype: Reference(dense, tokens, compute_dtype=dtype)
                            for dtype in (torch.float32, torch.bfloat16)}


def test_compute_dtype_names():
    assert resolve_compute_dtype("fp32") == torch.float32 and resolve_compute_dtype("bf16") == torch.bfloat16
    assert resolve_compute_dtype("auto") == (torch.bfloat16 if has_bf16_matrix_units() else torch.float32)
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(CrossLayerError, match="compute_dtype must be one of auto, fp32, bf16; got 'fp16'"):
        resolve_compute_dtype("fp16")


def test_bf16_activations_leave_the_dense_model_in_fp32(setup):
    _, _, references = setup
    reference = references[torch.bfloat16]
    assert reference.dense.model.embed_tokens.weight.dtype == torch.float32
    assert reference.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert reference.hidden[3][0].dtype == torch.bfloat16
    assert reference.cost(list(range(8)))[0] == pytest.approx(0, abs=1e-6)  # the dense plan, run in bf16


def test_bf16_fit_is_close_to_the_float64_least_squares_solution():
    """The fit from bf16 activations (products in fp64) is within bf16's rounding of the weighted least-squares
    solution computed plainly in float64 from transformers' fp32 activations (torch.linalg.lstsq); the fp32
    fit is much closer still, so the tolerance measures bf16, not a different objective."""
    torch.manual_seed(1)
    source = tiny_llama(num_hidden_layers=5, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=48)
    tokens = torch.randint(0, 257, (4, 24))
    want = reference_fit(source, tokens, [1, 2, 3], FIT_RIDGE, torch.linspace(0, 23, 64).round().long())
    dense = from_hf(source)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        got = Calibration(dense, tokens, compute_dtype=dtype).fit([1, 2, 3])
        assert all(t.dtype == torch.float32 for t in got.values())
        errors[dtype] = max(((got[name] - w).norm() / w.norm()).item() for name, w in want.items())
    assert errors[torch.float32] < 1e-4
    assert errors[torch.bfloat16] < 2e-2, errors
    assert errors[torch.bfloat16] > 10 * errors[torch.float32]  # bf16 did run


def test_bf16_cost_is_the_kl_of_the_converted_model(setup):
    """A plan's cost measured in bf16 is, within bf16's rounding, the KL (float64, full logits) of the fp32
    model that carries the K/V maps fitted on the bf16 activations."""
    source, tokens, references = setup
    reference = references[torch.bfloat16]
    for sizes in ([2, 2, 2, 2], [1, 3, 1, 3], [4, 1, 1, 2]):
        kv_sources = from_groups(sizes)
        model = share_kv(reference.dense, sharing_config(reference.config, kv_sources), "fit", reference)
        want = kl_of(source, model, tokens)
        assert reference.cost(kv_sources)[0] == pytest.approx(want, rel=3e-2, abs=1e-4), sizes


@pytest.mark.parametrize("producers", [6, 4, 2])
def test_bf16_search_picks_the_fp32_plan(setup, producers):
    """On the tiny model, a search in bf16 chooses the plan the fp32 search chooses, at a cost within 2%."""
    _, _, references = setup
    fp32 = search(references[torch.float32], producers)
    bf16 = search(references[torch.bfloat16], producers)
    assert bf16["kv_sources"] == fp32["kv_sources"]
    assert bf16["cost"] == pytest.approx(fp32["cost"], rel=2e-2)
