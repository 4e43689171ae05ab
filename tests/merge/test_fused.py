"""The fused row-local blends (`blend.Elementwise`, `blend.blend_into`): the C kernel against
the torch ops the merge methods run, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergekit_rl.merge import blend, native
from mergekit_rl.merge.registry import TensorContext, get_method

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler here")

SPECS = {
    "linear": blend.Elementwise("linear", (0.3, 0.7, 1.0)),
    "linear_norm": blend.Elementwise("linear", (0.3, 0.7, 1.0), divisor=2.0),
    "linear_w0_one": blend.Elementwise("linear", (1.0, 0.3, 0.7), divisor=2.0),
    "linear_one": blend.Elementwise("linear", (0.7,)),
    "difference": blend.Elementwise("linear", (-1.0, 1.0)),
    "task_arithmetic": blend.Elementwise("task_arithmetic", (0.3, 0.7)),
    "task_lambda_norm": blend.Elementwise("task_arithmetic", (0.3, 0.5), divisor=0.8, scale=0.6),
    "task_one": blend.Elementwise("task_arithmetic", (1.3,), scale=2.5),
    "slerp": blend.Elementwise("slerp", t=0.3, angle=blend.SlerpWeights(False, 0.71, 0.33)),
    "lerp_small": blend.Elementwise("slerp", t=0.3, angle=blend.SlerpWeights(True)),
    "lerp_large": blend.Elementwise("slerp", t=0.7, angle=blend.SlerpWeights(True)),
}


def n_inputs(spec: blend.Elementwise) -> int:
    return blend._n_inputs(spec)


def inputs(n: int, length: int, dtypes: list[torch.dtype], seed: int = 0) -> list[torch.Tensor]:
    """Random values over six binades with zeros and -0.0 sprinkled in, stored as dtypes."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for k in range(n):
        x = torch.randn(length, generator=g) * 10.0 ** torch.randint(-3, 3, (length,), generator=g)
        x[torch.rand(length, generator=g) < 0.05] = 0.0
        x[torch.rand(length, generator=g) < 0.05] = -0.0
        xs.append(x.to(dtypes[k % len(dtypes)]))
    return xs


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bits, except that NaNs only need to sit at the same places (payloads differ
    between torch's scalar and vector casts; a NaN output is an error, never written)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


def torch_result(spec: blend.Elementwise, raws: list[torch.Tensor], dtype: torch.dtype):
    return blend.elementwise(spec, [r.float() for r in raws]).to(dtype)


@needs_native
@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("length", [1, 13, 4133, (1 << 21) + 3])  # tails, body, two threads
@pytest.mark.parametrize(
    "dtypes", [[torch.bfloat16], [torch.float32], [torch.bfloat16, torch.float32]]
)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_the_torch_ops_bit_for_bit(
    name: str, length: int, dtypes: list[torch.dtype], out_dtype: torch.dtype
) -> None:
    spec = SPECS[name]
    if length > 5000 and (dtypes != [torch.bfloat16] or "lerp" in name):
        pytest.skip("the long case once per blend is enough")
    raws = inputs(n_inputs(spec), length, dtypes)
    out = torch.empty(length, dtype=out_dtype)
    bad, out_bad = blend.blend_into(spec, raws, out)
    assert bad == [False] * len(raws) and not out_bad
    assert_same_bits(out, torch_result(spec, raws, out_dtype))


@needs_native
@pytest.mark.parametrize("name", SPECS)
def test_non_finite_inputs_and_outputs_are_reported(name: str) -> None:
    spec = SPECS[name]
    raws = inputs(n_inputs(spec), 4133, [torch.bfloat16, torch.float32], seed=1)
    n = len(raws)
    raws[-1][7] = float("nan")  # the last input and the first only
    raws[0][4000] = float("inf")
    out = torch.empty(4133, dtype=torch.bfloat16)
    bad, out_bad = blend.blend_into(spec, raws, out)
    assert bad == [k in (0, n - 1) for k in range(n)]
    want = torch_result(spec, raws, torch.bfloat16)
    assert out_bad and not bool(torch.isfinite(want).all())
    assert_same_bits(out, want)


@needs_native
def test_a_finite_sum_past_bf16_is_a_non_finite_output() -> None:
    # 3.399e38 is finite in float32 but rounds past bf16's largest: the check is on
    # what would be written
    raws = [torch.full((5,), 3.399e38), torch.full((5,), 3.399e38)]
    spec = blend.Elementwise("linear", (0.5, 0.5))
    out = torch.empty(5, dtype=torch.bfloat16)
    assert blend.blend_into(spec, raws, out) == ([False, False], True)
    out32 = torch.empty(5, dtype=torch.float32)
    assert blend.blend_into(spec, raws, out32) == ([False, False], False)


@needs_native
def test_the_probe_data_tells_the_kernel_variants_apart() -> None:
    # the probe picks the variant by its bits: on its data, fused and unfused add and lerp,
    # and divide against multiply by the reciprocal, must give different bits, else it
    # could pick a variant that differs from torch on other data
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4133, generator=g) for _ in range(3)]
    cases = [
        ("add", native.FUSED_FMA_ADD, 0),
        ("lerp", native.FUSED_FMA_LERP, 0),
        ("div", native.FUSED_RECIPROCAL, 0),
    ]
    for group, a, b in cases:
        assert any(
            not blend._same_bits(spec, xs, a) or not blend._same_bits(spec, xs, b)
            for spec in blend._PROBES[group]
        ), group
    assert all(v is not None for v in blend._kernel_flags().values())  # torch reproduced here


@needs_native
def test_a_kind_without_a_matching_variant_runs_the_torch_ops(monkeypatch) -> None:
    monkeypatch.setattr(blend, "_kernel_flags", lambda: {"lerp": None})
    spec = SPECS["lerp_large"]
    raws = inputs(2, 1001, [torch.bfloat16])
    raws[0][3] = float("inf")
    out = torch.empty(1001, dtype=torch.bfloat16)
    bad, out_bad = blend.blend_into(spec, raws, out)
    assert bad == [True, False] and out_bad
    assert_same_bits(out, torch_result(spec, raws, torch.bfloat16))


def test_fused_serves_stored_float32_and_bf16_only(monkeypatch) -> None:
    if native.library() is not None:
        assert blend.fused_serves([torch.bfloat16, torch.float32], torch.bfloat16)
    assert not blend.fused_serves([torch.float16, torch.float32], torch.float32)
    assert not blend.fused_serves([torch.bfloat16], torch.float16)
    assert not blend.fused_serves([torch.float64], torch.float32)
    monkeypatch.setattr(native, "library", lambda: None)  # no compiler, RLMERGE_NATIVE=0
    assert not blend.fused_serves([torch.bfloat16], torch.bfloat16)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_the_torch_blends_are_the_methods(normalize: bool, lam: float) -> None:
    # Elementwise's torch path is what the methods compute (task arithmetic's steps are
    # written twice: this pins them together)
    xs = [x.float() for x in inputs(4, 999, [torch.bfloat16])]
    weights = [0.3, 0.5, 1.0]
    per_model = [{"weight": w} for w in weights]
    ctx = TensorContext("w", ("a", "b", "c"))
    lin = get_method("linear").run(ctx, xs[1:], None, per_model, {"normalize": normalize})
    spec = blend.Elementwise("linear", tuple(weights), sum(weights) if normalize else None)
    assert torch.equal(bits(lin), bits(blend.elementwise(spec, xs[1:])))
    gp = {"normalize": normalize, "lambda": lam}
    ta = get_method("task_arithmetic").run(ctx, xs[1:], xs[0], per_model, gp)
    spec = blend.Elementwise(
        "task_arithmetic", tuple(weights), sum(weights) if normalize else None, lam
    )
    assert torch.equal(bits(ta), bits(blend.elementwise(spec, xs)))
    one = TensorContext("w", ("a",))
    for a, b in ((xs[0], xs[1]), (xs[0], xs[0] * 1.0001)):  # spherical, then lerp (parallel)
        sl = get_method("slerp").run(one, [b], a, [{}], {"t": lam / 2})
        angle = blend.slerp_weights(blend.slerp_sums([(a, b)]), lam / 2)
        spec = blend.Elementwise("slerp", t=lam / 2, angle=angle)
        assert torch.equal(bits(sl), bits(blend.elementwise(spec, [a, b])))


@needs_native
@pytest.mark.parametrize("n", [16384, 1000, 37, 100_003])
def test_row_sums_follow_torch_s_order(n: int) -> None:
    # the probed lane count reproduces torch's float64 row sums; the others do not (the probe
    # data tells them apart)
    lanes = blend._sum_lanes()
    assert lanes is not None
    g = torch.Generator().manual_seed(n)
    scale = 10.0 ** torch.randint(-8, 8, (3, n), generator=g)
    rows = torch.randn(3, n, generator=g, dtype=torch.float64) * scale
    rows[0, 5] = -0.0
    assert torch.equal(native.fused_row_sums(rows, lanes), rows.sum(dim=1))
    others = [k for k in (2, 4, 8, 16) if k != lanes]
    assert all(not torch.equal(native.fused_row_sums(rows, k), rows.sum(dim=1)) for k in others)
    zeros = -torch.zeros(2, n, dtype=torch.float64)  # -0.0 sums are +0.0, as in torch
    assert torch.equal(bits(native.fused_row_sums(zeros, lanes)), bits(zeros.sum(dim=1)))


@needs_native
def test_stable_sums_of_float64_pieces_equal_the_torch_path(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5 * 16384 + 77, generator=g, dtype=torch.float64) * 1e3
    pieces = [x[:20000], x[20000:20001], x[20001:]]
    fast = blend.StableSum()
    for p in pieces:
        fast.add(p)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    slow = blend.StableSum()
    for p in pieces:
        slow.add(p)
    assert torch.equal(fast.total(), slow.total())
    assert torch.equal(blend.stable_sum(x), slow.total())


@needs_native
@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
def test_product_row_sums_are_the_row_sums_of_the_products(dtypes) -> None:
    g = torch.Generator().manual_seed(5)
    rows = (1 << 21) // 16384 + 3  # split across threads
    a, b = (torch.randn(rows * 16384, generator=g).to(d) for d in dtypes)
    lanes = blend._sum_lanes()
    assert lanes is not None
    got = native.fused_product_row_sums(a, b, 16384, lanes)
    for row, (x, y) in zip(got, ((a, a), (b, b), (a, b)), strict=True):
        assert torch.equal(row, (x.double() * y.double()).view(rows, 16384).sum(dim=1))


def test_a_blend_given_other_inputs_than_it_weighs_is_refused() -> None:
    out = torch.empty(3)
    with pytest.raises(ValueError, match="linear blend of 2 inputs got 3"):
        blend.blend_into(SPECS["difference"], [torch.zeros(3)] * 3, out)
