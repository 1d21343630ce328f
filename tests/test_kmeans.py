"""k-means kernels (Triton; the interpreter without a GPU) against their float64 references."""
import importlib

import pytest
import torch

from sslcore.kernels import (
    kmeans_assign,
    kmeans_assign_ref,
    kmeans_trials,
    kmeans_update,
    kmeans_update_ref,
    nearest_cosine,
)

KM = importlib.import_module("sslcore.kernels.kmeans")


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _margin(x, c):
    """Gap between the best and second-best squared distance per row, in float64."""
    d = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    two = d.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


def _tc_slack(x, c):
    """Per row, a bound on how far the kernel's products can move the gap between two squared distances:
    each moves by at most ``2 * 2 * 2^-11 * sum_j |x_ij c_kj|`` in TF32 (fp32 points on a GPU: both operands
    rounded to 10 mantissa bits), so ``8 * 2^-11 * max_k sum_j |x_ij c_kj|``; else 0 (fp16/bf16 products
    are exact in fp32, and the interpreter multiplies in fp32)."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return 8 * 2.0 ** -11 * (x.double().abs() @ c.double().abs().T).max(1).values


@pytest.mark.parametrize("n,k,d", [(1000, 37, 33), (257, 5, 100), (70, 70, 8)])
def test_assign_fp32_matches_float64(seed, n, k, d):
    x, c = torch.randn(n, d, device=_dev()), torch.randn(k, d, device=_dev())
    labels, dist = kmeans_assign(x, c, backend="triton")
    ref_l, ref_d = kmeans_assign_ref(x.double(), c.double())
    # rows whose nearest centroid fp32 (TF32 on a GPU) can resolve
    clear = _margin(x, c) > 1e-4 * ref_d.abs().max() + _tc_slack(x, c)
    assert clear.float().mean() > 0.95  # over 2000 seeds the fewest clear rows were 97% (n=70, interpreter)
    assert torch.equal(labels[clear], ref_l[clear])
    assert labels.dtype == torch.int64 and dist.dtype == torch.float32
    exact = ((x.double() - c.double()[labels]) ** 2).sum(1)  # to the chosen centroid, by direct differences
    torch.testing.assert_close(dist.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dist.double()[clear], ref_d[clear], rtol=1e-5, atol=1e-4)


def _lop3(lut: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """PTX's ``lop3.b32 d, a, b, c, lut`` by the ISA's definition: bit i of d is bit ``4 a_i + 2 b_i + c_i`` of lut."""
    bit = lambda v, i: (v >> i) & 1  # noqa: E731  (arithmetic shift: bit 31 of a negative int32 reads 1)
    return sum(((lut >> (4 * bit(a, i) + 2 * bit(b, i) + bit(c, i))) & 1) << i for i in range(32)).to(torch.int32)


def test_the_keys_lop3_is_and_then_or():
    """The compiled assignment forms its keys with the inline ``lop3.b32`` of ``KEY_ASM`` (the interpreter, which
    runs every other test here, takes AND and OR): evaluated by the PTX ISA's definition on the operands in the
    kernel's order (float bits, ``-BLOCK_N``, column) it is ``(bits & -BLOCK_N) | column`` for every column and
    sign.  The evaluator itself gives the ISA's tables for a & b & c (0x80) and a | b | c (0xFE), and a table
    of swapped operands, ``(c & b) | a``, fails the same check."""
    import re

    from sslcore.kernels.kmeans import KEY_ASM, KEY_LUT
    m = re.fullmatch(r"lop3\.b32 \$0, \$1, \$2, \$3, (0x[0-9a-f]+);", KEY_ASM)
    assert m and int(m.group(1), 16) == KEY_LUT
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32) for _ in "abc")
    assert torch.equal(_lop3(0x80, a, b, c), a & b & c) and torch.equal(_lop3(0xFE, a, b, c), a | b | c)
    bits = torch.randint(-2**31, 2**31, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    for block_n in (16, 64, 128):
        cols = torch.arange(4096, dtype=torch.int32) % block_n
        mask = torch.full_like(cols, -block_n)
        assert torch.equal(_lop3(KEY_LUT, bits, mask, cols), (bits & -block_n) | cols), block_n
        assert not torch.equal(_lop3(0xF8, bits, mask, cols), (bits & -block_n) | cols)  # (c & b) | a


def test_planted_exact_ties_go_to_lowest_index(seed):
    c = torch.randn(37, 33, device=_dev())
    c[5], c[20], c[31] = c[3], c[3], c[3]  # identical centroids: ties inside a K block and across blocks
    x = torch.randn(300, 33, device=_dev())
    x[:50] = c[3] + 0.01 * torch.randn(50, 33, device=_dev())
    labels, _ = kmeans_assign(x, c, backend="triton")
    ref_l, _ = kmeans_assign_ref(x.double(), c.double())
    assert (labels[:50] == 3).all()
    assert not ((labels == 5) | (labels == 20) | (labels == 31)).any()
    assert torch.equal(labels[:50], ref_l[:50])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_assign_low_precision_inertia(seed, dtype):
    x, c = torch.randn(600, 40, device=_dev()).to(dtype), torch.randn(23, 40, device=_dev()).to(dtype)
    labels, dist = kmeans_assign(x, c, backend="triton")
    ref_l, ref_d = kmeans_assign_ref(x.double(), c.double())
    # inertia of the chosen assignment, measured exactly, within 1e-4 of the optimum
    chosen = ((x.double() - c.double()[labels]) ** 2).sum()
    assert abs(chosen / ref_d.sum() - 1) < 1e-4
    torch.testing.assert_close(dist.double().sum(), ref_d.sum(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("n,k,d", [(301, 5, 45), (97, 53, 70), (40, 16, 16)])  # K < BLOCK_N; N, K, D off the tiles
@pytest.mark.parametrize("dtype,cdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.float32)])
def test_assign_dtypes_and_fp32_master_centroids(seed, n, k, d, dtype, cdtype):
    """Labels: the nearest of the centroids as the tensor cores see them (cast to the points' dtype);
    distances: to the centroids as given (an fp32 master copy stays exact), against float64."""
    x = torch.randn(n, d, device=_dev()).to(dtype)
    c = (torch.randn(k, d, device=_dev()) + 0.1).to(cdtype)
    labels, dist = kmeans_assign(x, c, backend="triton")
    seen = c.to(dtype)  # the operand of the products
    ref_l, ref_d = kmeans_assign_ref(x.double(), seen.double())
    clear = _margin(x, seen) > 1e-4 * ref_d.abs().max() + _tc_slack(x, seen)
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[clear], ref_l[clear])
    assert labels.dtype == torch.int64 and dist.dtype == torch.float32
    exact = ((x.double() - c.double()[labels]) ** 2).sum(1)  # to the centroid as given, e.g. the fp32 master
    torch.testing.assert_close(dist.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assign_points_on_large_centroids(seed, dtype):
    """Points on a centroid far from the origin: ``(|x|^2 + |c|^2) / 2 - x.c`` cancels to a few ulps of
    ``|c|^2`` and rounds below 0 for some rows (the unclamped keys of negative floats order in reverse).
    The chosen centroid must still be one within that rounding of the point, never a distant one; near
    duplicates (1e-3 apart, inside the rounding) may be picked in either order, exact duplicates go to
    the lower index."""
    k, d = 40, 37
    c = (1000 + 3 * torch.randn(k, d, device=_dev())).to(dtype)
    c[7] = c[2]  # an exact duplicate
    c[30] = (c[2].float() + 1e-3 * torch.randn(d, device=_dev())).to(dtype)  # a near one, in another tile
    pick = torch.randint(0, k, (200,), device=_dev())
    pick[:20] = 2
    x = c[pick].clone()
    cf = c.double()
    half = (x.double() ** 2).sum(1)[:, None] / 2 + (cf ** 2).sum(1)[None] / 2 - x.float() @ c.float().T
    assert (half.min(1).values.float() <= 0).any(), "no row's expansion rounds to 0 or below: the test is vacuous"
    labels, dist = kmeans_assign(x, c, backend="triton")
    true = ((x.double()[:, None] - cf[None]) ** 2).sum(-1)
    e = 1e-5 * 2 * (cf ** 2).sum(1).max()  # the expansion's rounding, generously: ~100 fp32 ulps of |c|^2
    assert (true.gather(1, labels[:, None]).squeeze(1) <= e).all()
    alone = (pick != 2) & (pick != 7) & (pick != 30)
    assert (labels[alone] == pick[alone]).all()
    assert not (labels == 7).any()
    assert set(labels[~alone].tolist()) <= {2, 30}
    torch.testing.assert_close(dist.double(), true.gather(1, labels[:, None]).squeeze(1), rtol=0, atol=1e-2)


def test_assign_outputs_fully_written_and_deterministic(seed):
    x, c = torch.randn(333, 20, device=_dev()), torch.randn(19, 20, device=_dev())
    a = kmeans_assign(x, c, backend="triton")
    b = kmeans_assign(x, c, backend="triton")
    assert (a[0] >= 0).all() and torch.isfinite(a[1]).all()  # outputs are poisoned (-1 / NaN) under the tests
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_path_matches_reference(seed, dtype):
    x, c = torch.randn(1000, 33, dtype=dtype), torch.randn(37, 33, dtype=dtype)
    c[5] = c[2]  # planted exact tie: the lower index wins
    x[:20] = c[2] + 0.01 * torch.randn(20, 33, dtype=dtype)
    labels, dist = kmeans_assign(x, c, backend="torch")
    ref_l, ref_d = kmeans_assign_ref(x.double(), c.double())
    d = torch.cdist(x.double(), c.double()) ** 2
    gap = d.topk(2, largest=False).values.diff(dim=1).squeeze(1)
    clear = gap > 1e-3
    # rows nearest to the duplicated centroid are exact ties (their share varies with the draw)
    assert clear.sum() > 500 and torch.equal(labels[clear], ref_l[clear])
    tied = ref_l == 2
    assert tied[:20].all() and (labels[tied] == 2).all()
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("deterministic", [True, False])
def test_update_matches_reference(seed, deterministic):
    x = torch.randn(1000, 33, device=_dev())
    labels = torch.randint(0, 36, (1000,), device=_dev())  # cluster 36 stays empty
    sums, counts = kmeans_update(x, labels, 37, deterministic=deterministic)
    ref_s, ref_c = kmeans_update_ref(x.double(), labels, 37)
    assert torch.equal(counts, ref_c) and counts[36] == 0
    torch.testing.assert_close(sums.double(), ref_s, rtol=1e-5, atol=1e-4)


def test_sorted_segment_sums_in_chunks(seed, monkeypatch):
    """The GPU's deterministic update (run here on CPU tensors): chunks of sorted rows, segment sums."""
    monkeypatch.setattr(KM, "UPDATE_CHUNK_BYTES", 4 * 33 * 70)  # 70 rows a chunk: 15 chunks
    x = torch.randn(1000, 33)
    labels = torch.randint(0, 36, (1000,))
    sums = KM._sorted_segment_sums(x, labels, torch.zeros(37, 33))
    torch.testing.assert_close(sums.double(), kmeans_update_ref(x.double(), labels, 37)[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,k", [(1001, 67, 41), (64, 5, 1), (3, 130, 9)])
def test_piece_sums_match_float64_reference(seed, monkeypatch, dtype, n, d, k):
    """The Triton update (interpreted here) with pieces of 16 rows: a cluster of 40 pieces, one of exactly two
    (a piece boundary at its end), the first and last clusters empty, odd N and D, D past one column block;
    equal to the one-hot float64 reference, every output element written (outputs are NaN-poisoned) and
    bitwise the same on a second call."""
    monkeypatch.setattr(KM, "SEGMENT_ROWS", 16)
    x = torch.randn(n, d).to(dtype)
    labels = torch.randint(1, max(2, k - 1), (n,)) if k > 2 else torch.zeros(n, dtype=torch.long)
    if n > 700:
        labels[(labels == 3) | (labels == 7)] = 5
        labels[:640], labels[640:672] = 7, 3
    sums, counts = kmeans_update(x, labels, k, backend="triton")
    ref_s, ref_c = kmeans_update_ref(x.double(), labels, k)
    assert torch.equal(counts, ref_c) and sums.dtype == torch.float32
    if n > 700:
        assert counts[0] == counts[k - 1] == 0 and counts[7] == 640 and counts[3] == 32
    torch.testing.assert_close(sums.double(), ref_s, rtol=1e-5, atol=1e-4)
    again = kmeans_update(x, labels, k, backend="triton")[0]
    assert torch.equal(sums, again)


def test_piece_sums_refuse_float64():
    with pytest.raises(TypeError, match="float64"):
        kmeans_update(torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long), 2, backend="triton")


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                           ("triton", torch.float16), ("torch", torch.float32),
                                           ("torch", torch.float64)])
@pytest.mark.parametrize("n,d,t", [(203, 5, 3), (130, 100, 4), (64, 64, 1)])  # whole rows; chunks of 64 (ragged)
def test_trials_match_float64_reference(seed, backend, dtype, n, d, t):
    """k-means++'s trials (Triton interpreted: rows in one chunk of columns up to 64, in ragged chunks past it;
    torch) against ``min(best, |x - c|^2)`` by float64 direct differences, with ``best`` mixing +inf, 0 and
    distances either side of the candidates'; every element written (outputs NaN-poisoned)."""
    x = torch.randn(n, d).to(dtype)
    picks = torch.randint(n, (t,))
    cand = x[picks]
    wide = torch.promote_types(dtype, torch.float32)
    ref_d = ((x.double()[None] - cand.double()[:, None]) ** 2).sum(-1)  # [t, n]
    best = (ref_d[0] * torch.rand(n, dtype=torch.float64) * 2).to(wide)
    best[::7], best[3::11] = float("inf"), 0.0
    m, pot = kmeans_trials(x, cand, best, backend=backend)
    want = torch.minimum(ref_d, best.double())
    assert m.shape == (t, n) and m.dtype == wide and pot.dtype == torch.float64
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # the expansion: a few ulps of |x|^2 + |c|^2 (~2 d)
    torch.testing.assert_close(m.double(), want, rtol=tol, atol=tol * 2 * d)
    torch.testing.assert_close(pot, want.sum(1), rtol=tol, atol=tol * 2 * d * n)


def test_trials_refuse_bad_input():
    x = torch.randn(9, 4)
    with pytest.raises(ValueError, match="candidates must be"):
        kmeans_trials(x, torch.randn(2, 3), torch.zeros(9))
    with pytest.raises(ValueError, match="candidates must be"):
        kmeans_trials(x, torch.randn(2, 4).half(), torch.zeros(9))
    with pytest.raises(ValueError, match="best must be"):
        kmeans_trials(x, x[:2], torch.zeros(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="best must be"):
        kmeans_trials(x, x[:2], torch.zeros(8))
    with pytest.raises(ValueError, match="candidates contains NaN"):
        kmeans_trials(x, torch.full((2, 4), float("nan")), torch.zeros(9), validate=True)


def test_update_deterministic_bitwise(seed):
    x = torch.randn(2000, 17, device=_dev())
    labels = torch.randint(0, 11, (2000,), device=_dev())
    assert torch.equal(kmeans_update(x, labels, 11)[0], kmeans_update(x, labels, 11)[0])


def test_nearest_cosine_is_true_nearest_neighbour(seed):
    q, bank = torch.randn(97, 24, device=_dev()), torch.randn(211, 24, device=_dev())
    idx, sim = nearest_cosine(q, bank, backend="triton")
    cos = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(bank.double(), dim=1).T
    top2 = cos.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert torch.equal(idx[clear], cos.argmax(1)[clear])
    torch.testing.assert_close(sim.double(), cos.max(1).values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: kmeans_assign(torch.randn(5, 3), torch.randn(2, 4)), ValueError, "dimension 4 but x has 3"),
    (lambda: kmeans_assign(torch.randn(0, 3), torch.randn(2, 3)), ValueError, "x is empty"),
    (lambda: kmeans_assign(torch.randn(5, 3), torch.randn(0, 3)), ValueError, "centroids is empty"),
    (lambda: kmeans_assign(torch.randn(5, 3), torch.randn(2, 3).half()), TypeError, "centroids has dtype"),
    (lambda: kmeans_assign(torch.full((5, 3), float("inf")), torch.randn(2, 3)), ValueError, "x contains NaN"),
    (lambda: kmeans_update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 0), ValueError, "n_clusters"),
    (lambda: kmeans_update(torch.randn(5, 3), torch.full((5,), 3), 3), ValueError, "labels must lie"),
    (lambda: kmeans_update(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), 3), ValueError, "labels must be"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_assignment_and_update_without_sync(seed, dtype, no_host_sync):
    x = torch.randn(300_001, 128, device="cuda").to(dtype)
    c = x[torch.randperm(300_001, device="cuda")[:8192]].clone()
    with no_host_sync():
        labels, dist = kmeans_assign(x, c)
        sums, counts = kmeans_update(x, labels, 8192)
        m, pot = kmeans_trials(x, c[:11], dist)  # k-means++'s trials, 11 candidates as at K = 8192
    rows = torch.arange(0, 300_001, 97, device="cuda")
    want = torch.minimum(((x[rows].double()[None] - c[:11].double()[:, None]) ** 2).sum(-1), dist[rows].double())
    torch.testing.assert_close(m[:, rows].double(), want, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(pot, m.double().sum(1), rtol=1e-5, atol=0)
    ref_l, ref_d = kmeans_assign_ref(x[rows], c)
    clear = _margin(x[rows], c) > 1e-2 + _tc_slack(x[rows], c)
    assert (labels[rows][clear] == ref_l[clear]).all()
    torch.testing.assert_close(dist[rows].double(), ref_d.double(), rtol=2e-2, atol=1e-1)
    ref_s, ref_c = kmeans_update_ref(x.double(), labels, 8192)
    assert torch.equal(counts, ref_c)
    torch.testing.assert_close(sums.double(), ref_s, rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
def test_gpu_large_assignment_int64_offsets():
    """N x D past 2^31 elements: row offsets must be int64."""
    n, d = (2 ** 31) // 128 + 1000, 128
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(64, d, device="cuda", dtype=torch.bfloat16)
    labels, _ = kmeans_assign(x, c)
    tail = slice(n - 1000, n)
    ref_l, _ = kmeans_assign_ref(x[tail], c)
    assert (labels[tail] == ref_l).float().mean() > 0.99
