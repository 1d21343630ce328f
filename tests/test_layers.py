"""ContraNorm / DContraNorm modules, timm integration, the deep GCN, the collapse metrics and the
oversmoothing study (smoke).  Without CUDA, conftest sets TRITON_INTERPRET=1 so ``backend="auto"``
runs the Triton path through the interpreter: shapes stay tiny."""
from __future__ import annotations

import json
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F

import sslcore
from sslcore.cli import main as cli_main
from sslcore.data.sbm import stochastic_block_model
from sslcore.experiments import oversmoothing
from sslcore.kernels import contranorm_features_ref, contranorm_ref
from sslcore.layers import ContraNorm, DContraNorm
from sslcore.metrics import LayerStats, effective_rank, mean_pairwise_cosine
from sslcore.models.gcn import GCN, PairNorm, normalized_adjacency

TINY_VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _randomise_affine(norm):
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


# ---------------------------------------------------------------------------------------------
# The layer.


def test_scale_zero_is_layernorm_bit_exact(seed):
    x = torch.randn(3, 11, 24)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, 7:] = True
    cn = _randomise_affine(ContraNorm(24, scale=0.0))
    ln = torch.nn.LayerNorm(24, eps=1e-6)
    ln.load_state_dict(cn.state_dict())
    assert torch.equal(cn(x), ln(x))
    assert torch.equal(cn(x, key_padding_mask=mask), ln(x))


@pytest.mark.parametrize("dual,identity", [(False, False), (True, False), (False, True)])
def test_layer_is_layernorm_of_the_reference_update(seed, dual, identity):
    x = torch.randn(2, 13, 20, dtype=torch.float64)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0, 9:] = True
    cn = _randomise_affine(ContraNorm(20, scale=0.3, temperature=0.7, dual=dual, identity=identity,
                                      dtype=torch.float64))
    want = F.layer_norm(contranorm_ref(x, scale=0.3, temperature=0.7, dual=dual, identity=identity,
                                       key_padding_mask=mask), (20,), cn.weight, cn.bias, 1e-6)
    torch.testing.assert_close(cn(x, mask), want, rtol=1e-10, atol=1e-10)


def test_layer_fp32_matches_float64_reference_on_the_triton_path(seed):
    """backend="auto": the Triton kernel (interpreter here) against the float64 reference."""
    x = torch.randn(2, 9, 16)
    cn = _randomise_affine(ContraNorm(16, scale=0.5))
    want = F.layer_norm(contranorm_ref(x.double(), scale=0.5), (16,), cn.weight.double(), cn.bias.double(), 1e-6)
    torch.testing.assert_close(cn(x).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positive", [False, True])
def test_learnable_scale_gets_a_gradient(seed, positive):
    cn = ContraNorm(16, scale=0.2, learnable=True, positive=positive, backend="torch", dtype=torch.float64)
    param = cn.log_scale if positive else cn.scale
    assert param.shape == (16,)
    torch.testing.assert_close(cn.effective_scale(), torch.full((16,), 0.2, dtype=torch.float64))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    (cn(x) * torch.randn_like(x)).sum().backward()
    assert param.grad is not None and param.grad.abs().sum() > 0
    # the gradient w.r.t. the scale vector is the reference's
    s = cn.effective_scale().detach().requires_grad_()
    y = F.layer_norm(contranorm_ref(x, scale=s), (16,), cn.weight, cn.bias, 1e-6)
    torch.manual_seed(0)
    g = torch.randn_like(x)
    (y * g).sum().backward()
    cn.zero_grad()
    (cn(x) * g).sum().backward()
    want = s.grad * s.detach() if positive else s.grad  # d/d(log s) = s * d/ds
    torch.testing.assert_close(param.grad, want)


@pytest.mark.parametrize("options", [dict(scale=0.5), dict(scale=2.0, dual=True), dict(scale=0.3, identity=True),
                                     dict(scale=0.3, learnable=True, positive=True)])
def test_no_token_axis_is_layernorm_bit_exact(seed, options):
    """[B, D] (timm's fc_norm after pooling) and [D]: nn.LayerNorm, outputs and gradients bit for bit."""
    cn = _randomise_affine(ContraNorm(24, **options))
    ln = torch.nn.LayerNorm(24, eps=1e-6)
    ln.load_state_dict(cn.state_dict(), strict=False)
    for shape in [(5, 24), (24,)]:
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        got = cn(x)
        (dx_cn,) = torch.autograd.grad(got, x, g)
        want = ln(x)
        (dx_ln,) = torch.autograd.grad(want, x, g)
        assert torch.equal(got, want) and torch.equal(dx_cn, dx_ln)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_extra_leading_axes_are_batched(seed, backend):
    """[B, heads, L, D] (timm's qk_norm) is each [L, D] slice on its own; a mask broadcasts to x.shape[:-1]."""
    x = torch.randn(2, 3, 6, 8)
    mask = torch.zeros(2, 1, 6, dtype=torch.bool)
    mask[1, 0, 4:] = True
    cn = _randomise_affine(ContraNorm(8, scale=0.4, temperature=0.5, backend=backend))
    with torch.no_grad():
        got, got_masked = cn(x), cn(x, mask)
        assert got.shape == got_masked.shape == x.shape
        assert not torch.allclose(got_masked[1], got[1])
        torch.testing.assert_close(got_masked[0], got[0])
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(got[i, j], cn(x[i, j][None])[0])
                torch.testing.assert_close(got_masked[i, j], cn(x[i, j][None], mask[i, 0][None])[0])
        # a strided view (timm permutes q/k) gives the same as its contiguous copy
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)
        torch.testing.assert_close(cn(xt), got)


def test_learnable_identity_is_one_plus_s_per_channel(seed):
    """learnable + identity: (1 + s) H - s P H per channel, as the fixed-scale identity form (not the
    authors' s H - s P H in this one case; docs/methods.md)."""
    cn = _randomise_affine(ContraNorm(8, learnable=True, identity=True, backend="torch", dtype=torch.float64))
    with torch.no_grad():
        cn.scale.uniform_(0.1, 0.9)
    s = cn.scale.detach()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    xn = F.normalize(x, dim=-1)
    px = torch.softmax(xn @ xn.transpose(-1, -2), dim=-1) @ x
    torch.testing.assert_close(cn(x), F.layer_norm((1 + s) * x - s * px, (8,), cn.weight, cn.bias, 1e-6))
    assert not torch.allclose(cn(x), F.layer_norm(s * x - s * px, (8,), cn.weight, cn.bias, 1e-6), atol=1e-3)


def test_graph_mode_matches_reference(seed):
    data = stochastic_block_model(num_blocks=3, block_size=10, p_in=0.3, p_out=0.05, num_features=12)
    x = torch.randn(30, 12, dtype=torch.float64)
    cn = ContraNorm(12, scale=0.7, graph=True, dtype=torch.float64)
    want = F.layer_norm(contranorm_ref(x, scale=0.7, edge_index=data.edge_index), (12,), eps=1e-6)
    torch.testing.assert_close(cn(x, data.edge_index), want)
    torch.testing.assert_close(cn(x, edge_index=data.edge_index), want)


@pytest.mark.parametrize("identity", [False, True])
def test_dcontranorm_matches_feature_reference(seed, identity):
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    layer = DContraNorm(8, scale=0.3, temperature=0.5, identity=identity)
    want = contranorm_features_ref(x, scale=0.3, temperature=0.5, identity=identity)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    # the formula written out: tokens (rows) L2-normalised, D x D softmax row-wise
    for h in x:
        p = torch.softmax(F.normalize(h, dim=1).T @ F.normalize(h, dim=1) / 0.5, dim=1)
        torch.testing.assert_close(layer(h), (1.3 if identity else 1.0) * h - 0.3 * h @ p, rtol=1e-12, atol=1e-12)
    assert DContraNorm(8)(torch.randn(30, 8)).shape == (30, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale=-0.1), "scale"), (dict(scale=float("nan")), "scale"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(positive=True), "learnable"),
    (dict(learnable=True, positive=True, scale=0.0), "scale"), (dict(backend="cuda"), "backend"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContraNorm(8, **kwargs)


@pytest.mark.parametrize("dim,error", [(-3, ValueError), (0, ValueError), (8.0, TypeError), (True, TypeError)])
def test_bad_dim_is_named_first(dim, error):
    for cls in (ContraNorm, DContraNorm):
        with pytest.raises(error, match="dim must be"):
            cls(dim, scale=-1.0)  # the bad dim is reported before the bad scale


def test_bad_inputs():
    cn = ContraNorm(8, backend="torch")
    for shape in [(2, 5, 6), (2, 3, 5, 6), (5, 6), (6,)]:
        with pytest.raises(ValueError, match="dim=8"):
            cn(torch.randn(shape))
    with pytest.raises(ValueError, match=r"\[\.\.\., L, D\]"):
        cn(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a tensor"):
        cn([[1.0] * 8])
    with pytest.raises(ValueError, match="key_padding_mask needs tokens"):  # no token axis, nothing to mask
        cn(torch.randn(5, 8), key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        cn(torch.randn(2, 3, 5, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        cn(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        cn(torch.randn(2, 5, 8), key_padding_mask=[[False] * 5] * 2)
    with pytest.raises(TypeError, match="key_padding_mask"):  # the op's own check: bool only
        cn(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="graph=True"):
        cn(torch.randn(2, 5, 8), edge_index=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):  # the op's own check
        cn(torch.randn(2, 5, 8), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    graph = ContraNorm(8, graph=True, backend="torch")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        graph(torch.randn(2, 5, 8), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="edge_index"):
        graph(torch.randn(5, 8))
    with pytest.raises(ValueError, match="edge_index values"):  # the op's own check
        graph(torch.randn(5, 8), torch.tensor([[0], [5]]))
    with pytest.raises(ValueError, match="dim=4"):
        DContraNorm(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="scale"):
        DContraNorm(4, scale=-1.0)


# ---------------------------------------------------------------------------------------------
# timm.


# Every ViT family in timm that takes norm_layer: (model, options, norm slots that must exist).  fc_norm gets
# [B, D] (after average pooling), qk_norm [B, heads, L, head_dim], the rest [B, L, D].
TIMM_FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}, ["blocks.1.norm1", "blocks.1.norm2", "norm"]),
    "vit-avg-fc_norm": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, fc_norm=True),
                        ["fc_norm"]),
    "vit-qk_norm": ("vit_tiny_patch16_224", dict(qk_norm=True), ["blocks.0.attn.q_norm", "blocks.0.attn.k_norm"]),
    "vit-reg_tokens": ("vit_tiny_patch16_224", dict(reg_tokens=4), ["norm"]),
    "deit": ("deit_tiny_patch16_224", {}, ["norm"]),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}, ["norm"]),
    "deit3": ("deit3_small_patch16_224", {}, ["norm"]),
    "eva02": ("eva02_tiny_patch14_224", {}, ["fc_norm"]),  # its default: average pooling, then fc_norm
    "eva02-inner-norms": ("eva02_tiny_patch14_224", dict(qk_norm=True, scale_mlp=True, scale_attn_inner=True),
                          ["blocks.0.attn.q_norm", "blocks.0.attn.norm", "blocks.0.mlp.norm", "fc_norm"]),
    "beit": ("beit_base_patch16_224", {}, ["fc_norm"]),  # its default: average pooling, then fc_norm
}
SMALL_VIT = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=5)


def _norm_slots(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}


def _train_one_step(model):
    """One SGD step on a random batch: the loss and every gradient are finite, every norm's weight has a
    non-zero gradient (eva and beit scale the head's init down, so theirs can be too small to move the weight
    in fp32), and the step changes the weights."""
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = F.cross_entropy(model(torch.randn(3, 1, 8, 8)), torch.tensor([1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert [name for name, n in _norm_slots(model).items() if not n.weight.grad.any()] == []
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert {"head.weight", "blocks.0.attn.proj.weight"} <= moved


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_family_with_contranorm_norm_layer_trains(seed, family):
    arch, options, slots = TIMM_FAMILIES[family]
    model = timm.create_model(arch, norm_layer=partial(ContraNorm, scale=0.1, backend="torch"), **SMALL_VIT,
                              **options)
    norms = _norm_slots(model)
    # every LayerNorm slot of the plain model is a ContraNorm (eps 1e-6, the layer's default)
    assert norms.keys() == _norm_slots(timm.create_model(arch, **SMALL_VIT, **options)).keys() >= set(slots)
    assert all(type(n) is ContraNorm and n.scale == 0.1 and n.eps == 1e-6 for n in norms.values())
    _train_one_step(model)


def test_timm_qk_norm_and_fc_norm_on_the_default_backend(seed):
    """backend="auto" (the Triton interpreter here) inside a ViT with qk_norm and fc_norm, against the torch path."""
    options = dict(SMALL_VIT, depth=1, qk_norm=True, global_pool="avg", class_token=False, fc_norm=True)
    model = timm.create_model("vit_tiny_patch16_224", norm_layer=partial(ContraNorm, scale=0.3), **options)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        got = model(x)
        for n in _norm_slots(model).values():
            n.backend = "torch"
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
        for n in _norm_slots(model).values():
            n.backend = "auto"
    _train_one_step(model)


def test_registered_timm_names():
    assert {"contranorm_vit_tiny_patch16_224", "contranorm_vit_small_patch16_224"} <= set(
        timm.list_models("contranorm_*"))
    model = timm.create_model("contranorm_vit_small_patch16_224", contranorm=dict(scale=0.05, backend="torch"),
                              **{**TINY_VIT, "embed_dim": 24})
    assert type(model.blocks[1].norm2) is ContraNorm and model.blocks[1].norm2.scale == 0.05
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # ContraNorm subclasses LayerNorm with the same parameters: a LayerNorm ViT's weights load into it
    plain = timm.create_model("vit_small_patch16_224", **{**TINY_VIT, "embed_dim": 24})
    model.load_state_dict(plain.state_dict())
    assert sslcore.ContraNorm is ContraNorm


# ---------------------------------------------------------------------------------------------
# GCN.


def test_normalized_adjacency():
    edge_index = torch.tensor([[0, 1, 1, 2, 0], [1, 0, 2, 1, 1]])  # path 0-1-2, one duplicate edge
    a = normalized_adjacency(edge_index, 3).to_dense()
    deg = torch.tensor([2.0, 3.0, 2.0])
    dense = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]])
    torch.testing.assert_close(a, dense / (deg[:, None] * deg[None, :]).sqrt())


@pytest.mark.parametrize("norm", ["none", "layernorm", "pairnorm", "contranorm"])
def test_gcn_forward_backward(seed, norm):
    data = stochastic_block_model(num_blocks=3, block_size=8, p_in=0.4, p_out=0.05, num_features=6, seed=1)
    model = GCN(6, data.num_classes, hidden=16, depth=4, norm=norm, contranorm_scale=0.5)
    out = model(data.x, data.edge_index)
    assert out.shape == (24, 3)
    F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if norm == "contranorm":
        assert all(type(b.norm) is ContraNorm and b.norm.graph for b in model.blocks)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_pairnorm_holds_the_total_pairwise_distance(seed, scale):
    """PairNorm (Zhao & Akoglu 2020) by its defining property, not its code: the output's nodes are centred and
    its total pairwise squared distance sum_{i,j} |y_i - y_j|^2 is 2 N^2 s^2 (eq. 4's TPSD) whatever the input's
    scale; and y is x minus its node mean times one positive factor (odd N, float64)."""
    x = 7.0 * torch.randn(37, 5, dtype=torch.float64) + 3.0
    y = PairNorm(scale, eps=0.0)(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    tpsd = sum(float((y[i] - y[j]).pow(2).sum()) for i in range(37) for j in range(37))
    assert tpsd == pytest.approx(2 * 37 ** 2 * scale ** 2, rel=1e-12)
    centred = x - x.sum(0) / 37
    factor = y / centred
    torch.testing.assert_close(factor, factor[0, 0].expand_as(factor), rtol=1e-10, atol=0)
    assert factor[0, 0] > 0
    torch.testing.assert_close(PairNorm(scale)(10 * x), y, rtol=1e-8, atol=0)  # scale-free (eps 1e-6 aside)
    for bad in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="scale"):
            PairNorm(bad)
    assert type(GCN(6, 3, depth=3, norm="pairnorm").blocks[0].norm) is PairNorm


def test_gcn_contranorm_is_the_authors_gnn_layer(seed):
    """LayerNorm((1 + s) H - s P H) with eps 1e-5, then ReLU; s in the authors' convention, default 1."""
    data = stochastic_block_model(num_blocks=3, block_size=8, p_in=0.4, p_out=0.05, num_features=6, seed=1)
    assert GCN(6, 3, norm="contranorm").blocks[0].norm.scale == 1.0
    model = GCN(6, 3, hidden=16, depth=3, norm="contranorm", contranorm_scale=0.7).double()
    block = model.blocks[1]
    _randomise_affine(block.norm)
    h = torch.randn(24, 16, dtype=torch.float64)
    want = F.layer_norm(contranorm_ref(h, scale=0.7, identity=True, edge_index=data.edge_index), (16,),
                        block.norm.weight, block.norm.bias, eps=1e-5)
    torch.testing.assert_close(block.norm(h, data.edge_index), want, rtol=1e-12, atol=1e-12)
    adj = normalized_adjacency(data.edge_index, 24).double()
    torch.testing.assert_close(block(h, adj, data.edge_index),
                               F.relu(block.norm(block.conv(h, adj), data.edge_index)), rtol=0, atol=0)
    # s = 0 is the LayerNorm GCN exactly
    torch.manual_seed(0)
    cn = GCN(6, 3, hidden=16, depth=3, norm="contranorm", contranorm_scale=0.0)
    torch.manual_seed(0)
    ln = GCN(6, 3, hidden=16, depth=3, norm="layernorm")
    assert torch.equal(cn(data.x, data.edge_index), ln(data.x, data.edge_index))


@pytest.mark.parametrize("graph", [False, True])
def test_identity_form_is_the_plain_form_with_s_over_1_plus_s(seed, graph):
    """LN_eps((1 + a) H - a P H) = LN_eps'(H - b P H) with b = a / (1 + a), eps' = eps / (1 + a)^2: LayerNorm
    takes out the factor 1 + a, so an identity-form s = a is a plain-form s = b (docs/methods.md)."""
    data = stochastic_block_model(num_blocks=3, block_size=8, p_in=0.4, p_out=0.05, num_features=6, seed=1)
    x = torch.randn(24, 12, dtype=torch.float64) if graph else torch.randn(2, 9, 12, dtype=torch.float64)
    args = (x, data.edge_index) if graph else (x,)
    for a in (0.2, 1.0, 3.0):
        ident = ContraNorm(12, scale=a, identity=True, eps=1e-5, graph=graph, dtype=torch.float64)
        plain = ContraNorm(12, scale=a / (1 + a), eps=1e-5 / (1 + a) ** 2, graph=graph, dtype=torch.float64)
        torch.testing.assert_close(ident(*args), plain(*args), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ident(*args), ContraNorm(12, scale=a, graph=graph, dtype=torch.float64)(*args))


def test_sbm_is_seeded_and_split():
    a, b = stochastic_block_model(seed=3), stochastic_block_model(seed=3)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.edge_index, stochastic_block_model(seed=4).edge_index)
    assert (a.train_mask ^ a.test_mask).all() and a.train_mask.sum() == 5 * 20
    src, dst = a.edge_index
    assert (src != dst).all() and (a.y[src] == a.y[dst]).float().mean() > 0.5  # homophilous


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_metrics_on_known_inputs():
    row = torch.randn(1, 6, dtype=torch.float64)
    identical = row.expand(5, 6)
    assert mean_pairwise_cosine(identical) == pytest.approx(1.0)
    assert effective_rank(identical) == pytest.approx(1.0)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0][:4]  # 4 orthonormal rows
    assert mean_pairwise_cosine(q) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(q) == pytest.approx(4.0)
    # [B, L, D]: per sequence, then averaged
    both = torch.stack([identical[:4], q])
    assert mean_pairwise_cosine(both) == pytest.approx(0.5)
    assert effective_rank(both) == pytest.approx(2.5)
    # the O(n D) cosine identity against the n x n matrix
    x = torch.randn(7, 5, dtype=torch.float64)
    c = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    assert mean_pairwise_cosine(x) == pytest.approx(((c.sum() - c.trace()) / 42).item())
    with pytest.raises(ValueError, match="at least 2 rows"):
        mean_pairwise_cosine(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        effective_rank(torch.randn(4))


def test_layer_stats_hooks():
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 3},
                              norm_layer=partial(ContraNorm, backend="torch"))
    names = ["blocks.0", "blocks.1", "blocks.2", "norm"]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), LayerStats(model, names) as stats:
        model(x)
        model(x)
    assert [r["name"] for r in stats.layers] == names
    tokens = model.forward_features(x)  # after the hooks are removed: not recorded
    assert len(stats._records["norm"]) == 2
    assert stats.layers[-1]["effective_rank"] == pytest.approx(effective_rank(tokens), rel=1e-6)
    assert stats.layers[-1]["mean_cosine"] == pytest.approx(mean_pairwise_cosine(tokens), rel=1e-6)
    assert len(LayerStats(model, ContraNorm).modules) == 7  # by type: norm1, norm2 per block, final norm
    with pytest.raises(ValueError, match="no module named"):
        LayerStats(model, ["blocks.9"])


# ---------------------------------------------------------------------------------------------
# The study.


def test_oversmoothing_quick_cli(tmp_path, capsys):
    assert cli_main(["oversmoothing", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "(a) ViT" in printed and "(b) GCN" in printed
    assert "ContraNorm LN((1+s)H - sPH) as the authors' GNN (= LN(H - s'PH), s' = s/(1+s) = 0.5)" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["depth"] for r in results["gcn"]} == set(results["config"]["gcn_depths"])
    assert "`sslcore oversmoothing --quick --seed 0` (1 / 1 model seeds)" in oversmoothing.markdown(results)
    assert all(0 <= r["accuracy"] <= 1 and r["layers"] for r in results["vit"] + results["gcn"])
    assert (tmp_path / "oversmoothing.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # a second run never replaces the first's results
        cli_main(["oversmoothing", "--quick", "--out", str(tmp_path)])
    assert "already exists: choose another path, or pass --overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_study_verdicts_follow_the_paired_test():
    def runs(acc_ln, acc_cn):
        layers = [{"name": "blocks.0", "effective_rank": 2.0, "mean_cosine": 0.5}]
        return [{"depth": 6, "norm": n, "seed": s, "accuracy": a, "layers": layers}
                for n, accs in (("layernorm", acc_ln), ("contranorm", acc_cn)) for s, a in enumerate(accs)]
    labels = {"layernorm": "LayerNorm", "contranorm": "ContraNorm"}
    table = partial(oversmoothing._table, norms=("layernorm", "contranorm"), labels=labels)
    assert "+10.0 pts (better in 3/3 seeds, helps)" in table(runs([0.5, 0.5, 0.5], [0.6, 0.6, 0.6]))
    assert "(better in 3/3 seeds, helps)" in table(runs([0.5, 0.5, 0.5], [0.6, 0.62, 0.58]))  # p = 0.013
    assert "(better in 3/3 seeds, unclear)" in table(runs([0.5, 0.5, 0.5], [0.6, 0.52, 0.51]))  # p = 0.27
    assert "(better in 2/3 seeds, unclear)" in table(runs([0.5, 0.5, 0.5], [0.6, 0.6, 0.45]))
    assert "(better in 0/3 seeds, hurts)" in table(runs([0.7, 0.7, 0.7], [0.5, 0.52, 0.48]))
    assert "-20.0 pts (unclear)" in table(runs([0.7], [0.5]))  # one seed: no test
    assert "+1.0 pts (better in 3/3 seeds, unclear)" in table(runs([0.5] * 3, [0.51] * 3))  # under the 2-point bar
    layers = [{"name": "blocks.0", "effective_rank": 2.0, "mean_cosine": 0.5}]
    gcn = [{"depth": d, "norm": n, "seed": s, "accuracy": a, "layers": layers} for d in (4, 8)
           for n, accs in (("none", [0.2] * 3), ("layernorm", [0.2] * 3), ("contranorm", [0.8, 0.7, 0.75]))
           for s, a in enumerate(accs)]
    vit = [{**r, "depth": 24} for r in runs([0.5, 0.5, 0.5], [0.53, 0.53, 0.53])]
    claims = {c["claim"]: c for c in oversmoothing.claims({"vit": vit, "gcn": gcn})}
    vit = claims["ContraNorm helps a deep ViT (depth 24, vs the best other norm)"]
    assert vit["bar"] == 4.52 and vit["verdict"] == "not shown"  # +3 in every seed: below the paper's 4.5 points
    assert list(claims)[1:] == ["ContraNorm helps a deep GCN (depth 8, vs the best other norm)"]  # from depth 8
    assert claims[list(claims)[1]]["verdict"] == "reproduced"
