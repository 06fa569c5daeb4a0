"""Chunked vocabulary-wide losses against plain full-logit computations (autograd through torch's own ops)."""

import pytest
import torch
import torch.nn.functional as F

from crosslayer.losses import HeadLoss, NextToken, TeacherLogits, TeacherTopK, head_loss

from .conftest import tiny_config

N, D, V = 37, 16, 50  # 37 rows in chunks of 8: five chunks and a remainder


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, D, generator=g, dtype=dtype) / 2).requires_grad_()
    return hidden, weight


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_next_token_matches_cross_entropy():
    hidden, weight = _inputs()
    ids = torch.randint(0, V, (N,))
    ours = head_loss(hidden, weight, NextToken(ids), chunk_rows=8)
    ref = F.cross_entropy(hidden @ weight.T, ids)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grads(ours, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_logits_match_kl_div(temperature):
    hidden, weight = _inputs()
    teacher_hidden, teacher_weight = torch.randn(N, 12), torch.randn(V, 12) / 2
    ours = head_loss(hidden, weight, TeacherLogits(teacher_hidden, teacher_weight, temperature), chunk_rows=8)
    y, z = teacher_hidden @ teacher_weight.T, hidden @ weight.T
    ref = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(y / temperature, -1), log_target=True,
                   reduction="batchmean") * temperature**2
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grads(ours, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(a, b)


def test_teacher_top_k_is_the_coarsened_kl():
    """Against the definition, in float64: the KL over k + 1 outcomes (each top-k token, everything else)."""
    hidden, weight = _inputs(torch.float64)
    y = torch.randn(N, V, dtype=torch.float64) * 3
    k = 5
    p = y.softmax(-1)
    top = p.topk(k, dim=-1)
    p_top, r = top.values, 1 - top.values.sum(-1)
    q = (hidden @ weight.T).softmax(-1)
    q_top = q.gather(1, top.indices)
    q_rest = 1 - q_top.sum(-1)
    ref = ((p_top * (p_top / q_top).log()).sum(-1) + r * (r / q_rest).log()).mean()
    log_rest = torch.logsumexp(y.scatter(1, top.indices, float("-inf")), -1) - torch.logsumexp(y, -1)
    ours = head_loss(hidden, weight, TeacherTopK(top.indices, p_top.log(), log_rest), chunk_rows=8)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_top_k_of_the_whole_vocabulary_is_the_full_kl():
    hidden, weight = _inputs()
    y = torch.randn(N, V)
    log_p = F.log_softmax(y, -1)
    ids = torch.arange(V).expand(N, V)
    ours = head_loss(hidden, weight, TeacherTopK(ids, log_p, torch.full((N,), float("-inf"))), chunk_rows=8)
    ref = F.kl_div(F.log_softmax(hidden @ weight.T, -1), log_p, log_target=True, reduction="batchmean")
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_math_equals_eager(dtype):
    """The compiled per-chunk math (used for large vocabularies) against the same math run eagerly."""
    hidden, weight = _inputs()
    ids = torch.randint(0, V, (N,))
    y = torch.randn(N, 12), torch.randn(V, 12) / 2
    top = torch.randn(N, V).log_softmax(-1).topk(5, dim=-1)
    log_rest = torch.log1p(-top.values.exp().sum(-1))
    for target in (NextToken(ids), TeacherLogits(*y, 2.0), TeacherTopK(top.indices, top.values, log_rest)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            eager = head_loss(hidden, weight, target, chunk_rows=16, fuse=False)
            fused = head_loss(hidden, weight, target, chunk_rows=16, fuse=True)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
        for a, b in zip(_grads(fused, hidden, weight), _grads(eager, hidden, weight), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32():
    hidden, weight = _inputs()
    ids = torch.randint(0, V, (N,))
    ref = F.cross_entropy(hidden @ weight.T, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head_loss(hidden, weight, NextToken(ids), chunk_rows=8)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    g_ours, g_ref = _grads(ours, weight)[0], _grads(ref, weight)[0]
    assert g_ours.dtype == torch.float32
    assert (g_ours - g_ref).norm() / g_ref.norm() < 2e-2


def test_head_loss_module_equals_the_models_own_cross_entropy():
    from crosslayer import CLAForCausalLM

    model = CLAForCausalLM(tiny_config(cla_factor=2))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    ours = HeadLoss(model, chunk_rows=5)(ids[:, :-1], NextToken(ids[:, 1:].flatten()))
    logits = model(input_ids=ids[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(ours, ref)
    params = [p for p in model.parameters()]
    for a, b in zip(_grads(ours, *params), _grads(ref, *params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_offline_teacher_store_holds_the_teachers_top_k(tmp_path):
    """What the store keeps equals the teacher's own full logits' top-k; a second open reuses it; another
    teacher is refused."""
    import numpy as np

    from crosslayer import CLAForCausalLM
    from crosslayer.errors import CrossLayerError
    from crosslayer.teacher_cache import TopKStore, model_fingerprint

    teacher = CLAForCausalLM(tiny_config()).eval()
    tokens = np.random.default_rng(0).integers(0, teacher.config.vocab_size, 8 * 6 + 1).astype(np.uint16)
    fp = model_fingerprint(teacher)
    store = TopKStore(tmp_path / "topk", tokens, seq_len=8, k=7, identity=fp)
    assert store.fill([4, 1, 4], teacher, torch.device("cpu"), batch=1) == 2
    got = store.target([4, 1], torch.device("cpu"))
    inputs = torch.from_numpy(np.stack([tokens[32:40], tokens[8:16]]).astype(np.int64))
    with torch.no_grad():
        log_p = F.log_softmax(teacher(input_ids=inputs).logits.float(), -1).flatten(0, 1)  # (16, V)
    top = log_p.topk(7, dim=-1)
    assert torch.equal(got.ids, top.indices)
    torch.testing.assert_close(got.logprobs, top.values)
    rest = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
    torch.testing.assert_close(got.log_rest, rest, rtol=1e-4, atol=1e-5)

    again = TopKStore(tmp_path / "topk", tokens, seq_len=8, k=7, identity=fp)
    assert again.fill([1, 4, 2], teacher, torch.device("cpu")) == 1  # only window 2 is new
    with pytest.raises(CrossLayerError, match="another teacher"):
        TopKStore(tmp_path / "topk", tokens, seq_len=8, k=7, identity="0" * 16)
    with pytest.raises(CrossLayerError, match="not computed"):
        again.target([5], torch.device("cpu"))


def test_top_k_gradient_stays_finite_for_a_certain_student():
    """A student that puts all but e^-200 of its mass on the teacher's top-k (q_rest underflows in fp32) while the
    teacher keeps 1% outside: the loss is large but finite, the gradient finite, pulling mass back outside."""
    hidden = torch.zeros(2, 4, requires_grad=True)
    weight = torch.zeros(V, 4)
    weight[:3, 0] = 1.0
    z_scale = torch.tensor([[200.0, 0, 0, 0], [200.0, 0, 0, 0]])
    with torch.no_grad():
        hidden.copy_(z_scale)
    weight.requires_grad_()
    ids = torch.arange(3).expand(2, 3)
    log_p = torch.log(torch.full((2, 3), 0.33))
    ours = head_loss(hidden, weight, TeacherTopK(ids, log_p, torch.log(torch.full((2,), 0.01))), chunk_rows=8)
    assert torch.isfinite(ours) and ours > 1
    g_hidden, g_weight = _grads(ours, hidden, weight)
    assert torch.isfinite(g_hidden).all() and torch.isfinite(g_weight).all()
    assert (g_weight[3:, 0] < 0).all()  # descending the gradient raises the logits outside the top-k
