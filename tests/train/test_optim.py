"""OnlineMergingAdamW against independent dense references (design notes section 2 oracles)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor, nn

from mergekit_rl.errors import MismatchError, RunError, UsageError
from mergekit_rl.merge import native, rng, rounding, selection
from mergekit_rl.train import optim as om
from mergekit_rl.train.optim import OnlineMergingAdamW
from tests.syncs import HostSyncs

# eps well above rounding: the first Adam step gives |Delta| ~ lr everywhere, and top-k tests need
# magnitudes that are distinct in both the optimizer and the reference
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-3


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def random_tau(model: nn.Module, scale: float = 0.05, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * scale for n, p in model.named_parameters()}


def grads_for(step: int, model: nn.Module) -> dict[str, Tensor]:
    """Fixed pseudo-gradients per step, independent of the weights (so runs can be replayed)."""
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def set_grads(model: nn.Module, grads: dict[str, Tensor]) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()


def accelerator_path(monkeypatch) -> None:
    """Run the torch paths accelerators take, here on the CPU: no C kernels (RLMERGE_NATIVE=0
    would not do: the library is loaded once per process) and the sync-free top-k."""
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    monkeypatch.setattr(om, "HOST_SELECTION_DEVICES", ())


class RefAdam:
    """Independent HF-style AdamW moments and update (the formulas of design notes section 2)."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.m = {n: torch.zeros(s) for n, s in shapes.items()}
        self.v = {n: torch.zeros(s) for n, s in shapes.items()}
        self.t = 0

    def deltas(self, grads: dict[str, Tensor], lr: float = LR) -> dict[str, Tensor]:
        self.t += 1
        b1, b2 = BETAS
        step_size = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        out = {}
        for n, g in grads.items():
            self.m[n].mul_(b1).add_(g, alpha=1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            out[n] = -step_size * self.m[n] / (self.v[n].sqrt() + EPS)
        return out


def ref_topk_mask(x: Tensor, density: float) -> Tensor:
    """Exactly the k = int(density * n) largest |x|, entries tied with the k-th taken in index
    order (a stable descending sort); tensors with density * n < 1 are kept dense."""
    n = x.numel()
    if density >= 1 or density * n < 1:
        return torch.ones_like(x, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ref_topk_indices(x, int(density * n))] = True
    return mask.view_as(x)


def ref_topk_indices(x: Tensor, k: int) -> Tensor:
    order = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices
    return order[:k].sort().values


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params(model: nn.Module, expected: dict[str, Tensor], atol: float = 1e-7) -> None:
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], atol=atol, rtol=0, msg=n)


# -- oracles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("wd,after", [(0.0, True), (0.1, True), (0.1, False)])
def test_ondare_full_keep_alpha0_is_hf_adamw(wd: float, after: bool) -> None:
    model = tiny_model()
    opt = OnlineMergingAdamW(
        model.named_parameters(), random_tau(model), lr=LR, eps=EPS, reserve_p=1.0, alpha=0.0,
        weight_decay=wd, decay_after_update=after,
    )  # fmt: skip
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    for step in range(5):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            if not after:
                expected[n] = expected[n] * (1 - LR * wd)
            expected[n] = expected[n] + d
            if after:
                expected[n] = expected[n] - LR * wd * expected[n]
    assert_params(model, expected)


def test_ondare_full_keep_alpha0_matches_torch_adamw_on_a_loss() -> None:
    # torch.optim.AdamW adds eps after the bias correction (HF-style before it): with a tiny eps
    # the two agree to rounding
    model, twin = tiny_model(), tiny_model()
    opt = OnlineMergingAdamW(
        model.named_parameters(), random_tau(model), lr=LR, reserve_p=1.0, alpha=0.0,
        weight_decay=0.05, decay_after_update=False, eps=1e-14,
    )  # fmt: skip
    ref = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=0.05, eps=1e-14, foreach=True)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6, msg=n)


def test_full_keep_alpha_adds_alpha_tau_each_step() -> None:
    model, alpha = tiny_model(), 0.3
    tau = random_tau(model)
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, lr=LR, eps=EPS, reserve_p=1.0, alpha=alpha, clip_val=None
    )
    tau16 = {n: t.to(torch.bfloat16).float() for n, t in tau.items()}  # stored in bf16
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    for step in range(4):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            expected[n] = expected[n] + alpha * tau16[n] + (1 - alpha) * d
    assert_params(model, expected)


def test_onties_zero_tau_is_topk_masked_adam() -> None:
    model, alpha, p_keep = tiny_model(), 0.25, 0.2
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    opt = OnlineMergingAdamW(
        model.named_parameters(),
        zeros,
        mode="onties",
        lr=LR,
        eps=EPS,
        reserve_p=p_keep,
        alpha=alpha,
    )
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    for step in range(4):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            expected[n] = expected[n] + (1 - alpha) * d * ref_topk_mask(d, p_keep)
    # the [4] bias keeps 0.8 < 1 entry: left dense, as tau would be
    assert ref_topk_mask(torch.ones(4), p_keep).all()
    assert_params(model, expected)


def hash_keep(numel: int, density: float, seed: int, name: str, *tags: str) -> Tensor:
    """The public mask definition: `rng.hash_sparse_keep` under key (seed, name, tags), as a
    dense bool [numel]."""
    key = rng.tensor_seed(seed, "online-merging", name, *tags)
    idx, valid = rng.hash_sparse_keep(numel, density, key)
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[idx[valid]] = True
    return keep


def test_ondare_by_hand_over_three_steps() -> None:
    model, alpha, p_keep, seed = tiny_model(), 0.2, 0.4, 7
    tau = random_tau(model, scale=0.5)  # some entries / 0.4 exceed the 1.0 clamp
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, lr=LR, eps=EPS, reserve_p=p_keep, alpha=alpha, seed=seed
    )
    # tau: one counter-based Bernoulli mask per tensor, / p, clamped to +-1, stored in bf16
    tau_ref = {}
    for n, t in tau.items():
        keep = hash_keep(t.numel(), p_keep, seed, n, "tau").view_as(t)
        tau_ref[n] = (t * keep / p_keep).clamp(-1, 1).to(torch.bfloat16).float()
    assert any((tau_ref[n].abs() == 1).any() for n in tau)
    # Delta masks: a fresh counter-based mask per (seed, name, step)
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    for step in range(3):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            keep = hash_keep(d.numel(), p_keep, seed, n, "delta", str(step + 1)).view_as(d)
            dropped = d * keep / p_keep
            expected[n] = expected[n] + alpha * tau_ref[n] + (1 - alpha) * dropped
    assert_params(model, expected)


def test_onties_by_hand_over_three_steps() -> None:
    model, alpha, p_keep = tiny_model(), 0.4, 0.3
    tau = random_tau(model, scale=0.02)  # same scale as the updates: the election matters
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, mode="onties", lr=LR, eps=EPS, reserve_p=p_keep, alpha=alpha
    )
    tau_ref = {n: (t * ref_topk_mask(t, p_keep)).bfloat16().float() for n, t in tau.items()}
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    n_disagree = 0
    for step in range(3):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            d = d * ref_topk_mask(d, p_keep)
            s = torch.where(tau_ref[n] + d >= 0, 1.0, -1.0)
            keep_t, keep_d = tau_ref[n] * s > 0, d * s > 0
            n_disagree += int((tau_ref[n] * d < 0).sum())
            expected[n] = expected[n] + alpha * tau_ref[n] * keep_t + (1 - alpha) * d * keep_d
    assert n_disagree > 0
    assert_params(model, expected)


def onties_merge_(flat: Tensor, state: dict, delta: Tensor, alpha: float, weighted: bool) -> None:
    """OnTIES (reserve_p 0.5) into flat, as the optimizer applies it: push, then the adds."""
    idx, vals = om.onties_sparse(
        flat.numel(), state, lambda idx: om.gather(delta, idx), 0.5, alpha, weighted
    )
    (pushed,) = om.tau_pushes([state if idx is not None else {}], alpha)
    if pushed is not None:
        om.add_at_(flat, *pushed)
    om.add_at_(flat, idx, vals)


@pytest.mark.parametrize("weighted", [False, True])
def test_onties_merge_election_on_numbers(weighted: bool) -> None:
    # 6 entries, keep the top 3 |Delta|: indices 0, 1, 2 (3..5 are dropped, tau alone there)
    delta = torch.tensor([0.5, -0.4, 0.3, 0.01, -0.02, 0.0])
    tau = torch.tensor([-0.2, -0.6, 0.1, 0.3, 0.0, -0.7])
    alpha = 0.2
    state = {"tau": tau.bfloat16()}
    flat = torch.zeros(6)
    onties_merge_(flat, state, delta, alpha, weighted)
    t = tau.bfloat16().float()
    if weighted:  # sign(0.2 tau + 0.8 Delta): entry 0 is 0.36 > 0, Delta wins
        expected = [0.8 * 0.5, alpha * t[1] + 0.8 * -0.4, alpha * t[2] + 0.8 * 0.3]
    else:  # sign(tau + Delta): entry 0 is 0.3 > 0, Delta wins; entry 1 both negative
        expected = [0.8 * 0.5, alpha * t[1] + 0.8 * -0.4, alpha * t[2] + 0.8 * 0.3]
    expected += [alpha * t[3], 0.0, alpha * t[5]]
    torch.testing.assert_close(flat, torch.tensor(expected), atol=1e-7, rtol=0)
    # entry 0 flips with a strong tau: tau wins the unweighted vote, Delta the weighted one
    flat = torch.zeros(6)
    state = {"tau": torch.tensor([-0.9, 0, 0, 0, 0, 0]).bfloat16()}
    onties_merge_(flat, state, delta, alpha, weighted)
    want0 = 0.8 * 0.5 if weighted else alpha * -0.8984375  # bf16(-0.9)
    torch.testing.assert_close(flat[0], torch.tensor(want0), atol=1e-7, rtol=0)


def test_sparse_and_dense_tau_storage_agree() -> None:
    torch.manual_seed(0)
    tau = torch.randn(1000)
    idx = torch.tensor([3, 10, 500, 999])
    val = tau[idx]
    sparse = {"tau": val, "tau_idx": idx}
    dense = {"tau": torch.zeros(1000).index_copy_(0, idx, val)}
    want = torch.tensor([0, 2, 3, 10, 11, 999])
    like = torch.zeros(1)
    for state in (sparse, dense):
        got = om.tau_at(state, want, 1000, like)
        torch.testing.assert_close(got, torch.tensor([0, 0, val[0], val[1], 0, val[3]]))
        flat = torch.ones(1000)
        (pushed,) = om.tau_pushes([state], 0.5)
        om.add_at_(flat, *pushed)
        torch.testing.assert_close(flat, 1 + 0.5 * dense["tau"])


# -- merge_every -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ondare", "onties"])
def test_merge_every_k_accumulates_then_merges(mode: str) -> None:
    model, alpha, k, wd = tiny_model(), 0.1, 3, 0.05
    tau = random_tau(model)
    p_keep = 1.0 if mode == "ondare" else 0.25
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, mode=mode, lr=LR, eps=EPS, reserve_p=p_keep, alpha=alpha,
        clip_val=None, merge_every=k, weight_decay=wd,
    )  # fmt: skip
    tau16 = {n: t.bfloat16().float() for n, t in tau.items()}
    if mode == "onties":
        tau16 = {n: (t * ref_topk_mask(t, p_keep)).bfloat16().float() for n, t in tau.items()}
    ref, expected = RefAdam({n: p.shape for n, p in model.named_parameters()}), snapshot(model)
    acc = {n: torch.zeros_like(t) for n, t in expected.items()}
    merged = snapshot(model)
    for step in range(1, 2 * k + 1):
        grads = grads_for(step, model)
        set_grads(model, grads)
        opt.step()
        for n, d in ref.deltas(grads).items():
            acc[n] += d
        if step % k:  # parameters stay put between merges
            assert_params(model, merged, atol=0)
            continue
        for n, a in acc.items():
            if mode == "ondare":
                upd = alpha * tau16[n] + (1 - alpha) * a
            else:
                a = a * ref_topk_mask(a, p_keep)
                s = torch.where(tau16[n] + a >= 0, 1.0, -1.0)
                upd = alpha * tau16[n] * (tau16[n] * s > 0) + (1 - alpha) * a * (a * s > 0)
            expected[n] = expected[n] + upd
            expected[n] = expected[n] - k * LR * wd * expected[n]  # summed decay, after
            acc[n] = torch.zeros_like(a)
        assert_params(model, expected)
        merged = snapshot(model)


# -- tau sources -------------------------------------------------------------------------------


def test_missing_tau_zero_or_error() -> None:
    model = tiny_model()
    tau = random_tau(model)
    del tau["2.bias"]
    with pytest.raises(UsageError, match="'2.bias'"):
        OnlineMergingAdamW(model.named_parameters(), tau, missing="error")
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, reserve_p=1.0, alpha=0.5, lr=LR, eps=EPS, clip_val=None
    )
    bias = model[2].bias
    assert "tau" not in opt.state[bias]
    # tau = 0: the bias moves by (1 - alpha) * Delta only
    ref, before = RefAdam({"b": bias.shape}), bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    expected = before + 0.5 * ref.deltas({"b": torch.ones_like(bias)})["b"]
    torch.testing.assert_close(bias.detach(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("rows", [10, 6])
def test_resized_embedding_uses_overlapping_rows(rows: int) -> None:
    emb = nn.Embedding(rows, 4)
    tau = torch.randn(8, 4) * 0.1
    opt = OnlineMergingAdamW([("emb.weight", emb.weight)], {"emb.weight": tau}, reserve_p=1.0)
    got = opt.state[emb.weight]["tau"].float().view(rows, 4)
    expected = torch.zeros(rows, 4)
    expected[: min(rows, 8)] = tau[: min(rows, 8)]
    torch.testing.assert_close(got, expected.bfloat16().float())
    with pytest.raises(MismatchError, match="emb.weight"):
        OnlineMergingAdamW([("emb.weight", emb.weight)], {"emb.weight": torch.zeros(8, 5)})


def test_tau_is_stored_sparse_in_bf16() -> None:
    lin = nn.Linear(256, 256, bias=False)
    tau = {"w": torch.randn(256, 256)}
    for mode in ("ondare", "onties"):
        opt = OnlineMergingAdamW([("w", lin.weight)], tau, mode=mode)  # reserve_p = 0.01
        state = opt.state[lin.weight]
        assert state["tau"].dtype == torch.bfloat16
        assert 0.005 * 65536 < state["tau_idx"].numel() < 0.015 * 65536
        # a bf16 dense copy is 2 bytes per parameter; sparse is ~10 bytes per kept entry
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        assert nbytes < 0.2 * 2 * 65536


def test_unnamed_params_and_bad_options_are_usage_errors() -> None:
    model = tiny_model()
    with pytest.raises(UsageError, match="named"):
        OnlineMergingAdamW(model.parameters(), None)
    for kwargs in ({"reserve_p": 0.0}, {"alpha": 2.0}, {"mode": "dare"}, {"merge_every": 0}):
        with pytest.raises(UsageError):
            OnlineMergingAdamW(model.named_parameters(), None, **kwargs)


def test_param_groups_and_lr_scheduler() -> None:
    model = tiny_model()
    named = list(model.named_parameters())
    groups = [
        {"params": named[:2], "lr": 0.0},  # frozen by lr, still pushed by alpha * tau
        {"params": named[2:], "lr": LR, "eps": EPS, "reserve_p": 1.0},
    ]
    tau = random_tau(model)
    opt = OnlineMergingAdamW(groups, tau, reserve_p=1.0, alpha=0.5, clip_val=None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    before = snapshot(model)
    set_grads(model, grads_for(0, model))
    opt.step()
    sched.step()
    w0 = model[0].weight.detach()
    torch.testing.assert_close(w0, before["0.weight"] + 0.5 * tau["0.weight"].bfloat16().float())
    assert opt.param_groups[1]["lr"] == pytest.approx(LR / 2)


# -- checkpointing -----------------------------------------------------------------------------


def run_steps(model: nn.Module, opt: OnlineMergingAdamW, steps: range) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    for step in steps:
        opt.zero_grad()
        (model(x) * (step + 1)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "ondare", "reserve_p": 0.3},
        {"mode": "onties", "reserve_p": 0.3, "weight_decay": 0.1},
        {"mode": "ondare", "reserve_p": 0.5, "merge_every": 2},
    ],
)
def test_state_dict_round_trip_resumes_exactly(kwargs: dict) -> None:
    opts = dict(lr=LR, eps=EPS, alpha=0.01, **kwargs)
    full = tiny_model()
    opt_full = OnlineMergingAdamW(full.named_parameters(), random_tau(full), **opts)
    run_steps(full, opt_full, range(7))

    part = tiny_model()
    opt = OnlineMergingAdamW(part.named_parameters(), random_tau(part), **opts)
    run_steps(part, opt, range(3))  # 3 is odd: resumes in the middle of a 2-step accumulation
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = tiny_model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = OnlineMergingAdamW(resumed.named_parameters(), None, **opts)
    opt2.load_state_dict(saved["optim"])
    assert opt2.state[resumed[0].weight]["tau"].dtype == torch.bfloat16
    run_steps(resumed, opt2, range(3, 7))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


# -- tau from checkpoints on disk ----------------------------------------------------------------


def _stored_tau(opt: OnlineMergingAdamW, p: Tensor) -> Tensor:
    return opt.state[p]["tau"].float().view(p.shape)


@pytest.mark.parametrize("source", ["checkpoints", "extract_file"])
def test_tau_from_disk_is_sft_minus_base(family, tmp_path, source: str) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_rl import ops
    from mergekit_rl.train.taskvec import CheckpointTaskVectors, TaskVectorFile
    from tests.conftest import load_state

    if source == "checkpoints":
        tvs = CheckpointTaskVectors(str(family["base"]), str(family["sft1"]))
    else:
        out = tmp_path / "tv.safetensors"
        ops.extract_task_vector(
            family["base"], family["sft1"], out
        )  # `rlmerge task-vector extract`
        tvs = TaskVectorFile(str(out))
    policy = AutoModelForCausalLM.from_pretrained(family["sft1"], dtype=torch.float32)
    # a wrapper prefix ("module.", as under DDP) still finds each tensor by its bare name
    named = [(f"module.{n}", p) for n, p in policy.named_parameters()]
    with tvs:
        opt = OnlineMergingAdamW(named, tvs, reserve_p=1.0, clip_val=None, missing="error")
    base, sft = load_state(family["base"]), load_state(family["sft1"])
    for name, p in policy.named_parameters():
        want = (sft[name].double() - base[name].double()).bfloat16()
        assert torch.equal(_stored_tau(opt, p), want.float()), name


def test_value_head_without_counterpart_on_disk(family) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_rl.train.taskvec import CheckpointTaskVectors

    policy = AutoModelForCausalLM.from_pretrained(family["sft1"], dtype=torch.float32)
    head = nn.Linear(policy.config.hidden_size, 1)
    named = [*policy.named_parameters(), ("v_head.weight", head.weight)]
    with CheckpointTaskVectors(str(family["base"]), str(family["sft1"])) as tvs:
        with pytest.raises(UsageError, match="'v_head.weight'"):
            OnlineMergingAdamW(named, tvs, missing="error")
        opt = OnlineMergingAdamW(named, tvs, reserve_p=1.0)
    assert "tau" not in opt.state[head.weight]
    assert "tau" in opt.state[policy.lm_head.weight]


def test_no_matching_task_vector_at_all_is_an_error() -> None:
    model = tiny_model()
    renamed = {f"other.{n}": t for n, t in random_tau(model).items()}
    with pytest.raises(UsageError, match="no parameter matches a task vector"):
        OnlineMergingAdamW(model.named_parameters(), renamed)


# -- exact top-k under ties ----------------------------------------------------------------------


def test_top_magnitude_indices_keeps_exactly_k_under_ties() -> None:
    x = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 0.0, 1.0, -3.0])
    # ties at 1.0: lowest first
    assert selection.top_magnitude_indices(x, 4).tolist() == [1, 2, 3, 7]
    assert selection.top_magnitude_indices(x, 0).numel() == 0
    assert selection.top_magnitude_indices(x, 8).tolist() == list(range(8))
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(300_000, generator=gen)  # the sampled-candidates path
    tied = smooth.round(decimals=1)  # heavy ties at the threshold
    spiky = smooth.clone()  # the sampled entries are the large ones: the bound
    spiky[:: selection.TOPK_SAMPLE_STRIDE] *= 100  # is too high and the exact path takes over
    for name, x in (("smooth", smooth), ("tied", tied), ("spiky", spiky)):
        for k in (1, 2999, 70_000, 150_000):
            got = selection.top_magnitude_indices(x, k)
            assert torch.equal(got, ref_topk_indices(x, k)), (name, k)


def test_onties_first_step_is_sparse_even_when_every_update_ties() -> None:
    # one Adam step with |g| >> eps gives |Delta| = lr for every entry: exactly k must move
    lin = nn.Linear(100, 100, bias=False)
    opt = OnlineMergingAdamW(
        [("w", lin.weight)], {"w": torch.zeros(100, 100)}, mode="onties", reserve_p=0.01, lr=LR
    )
    before = lin.weight.detach().clone()
    lin.weight.grad = torch.randn(100, 100).sign()
    opt.step()
    assert int((lin.weight != before).sum()) == 100


# -- counter-based masks: device-, rank- and RNG-independent (issue 11 item 1) -------------------


def test_legacy_state_dict_with_cuda_generator_keys_resumes_on_cpu() -> None:
    # older versions saved per-device generator states; a "cuda:0" key made a CPU-only
    # machine (or a rank with another device) fail to resume: masks no longer depend on them
    opts = dict(lr=LR, eps=EPS, alpha=0.01, reserve_p=0.3)
    full = tiny_model()
    opt_full = OnlineMergingAdamW(full.named_parameters(), random_tau(full), **opts)
    run_steps(full, opt_full, range(5))
    part = tiny_model()
    opt = OnlineMergingAdamW(part.named_parameters(), random_tau(part), **opts)
    run_steps(part, opt, range(2))
    saved = opt.state_dict()
    saved["generators"] = {"cuda:0": torch.zeros(16, dtype=torch.uint8), "cpu": torch.zeros(8)}
    opt2 = OnlineMergingAdamW(part.named_parameters(), None, **opts)
    opt2.load_state_dict(saved)
    run_steps(part, opt2, range(2, 5))
    for (n, a), b in zip(full.named_parameters(), part.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_state_moved_to_another_device_and_back_resumes() -> None:
    # transformers loads optimizer.pt with map_location=args.device; every state tensor travels
    # (float64 stands in for another device on a CPU-only machine: a lossless round trip)
    opts = dict(lr=LR, eps=EPS, alpha=0.01, reserve_p=0.1, merge_every=2)
    full = tiny_model()
    opt_full = OnlineMergingAdamW(full.named_parameters(), random_tau(full), **opts)
    run_steps(full, opt_full, range(5))
    part = tiny_model()
    opt = OnlineMergingAdamW(part.named_parameters(), random_tau(part), **opts)
    run_steps(part, opt, range(3))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, map_location=device)
    for s in saved["state"].values():
        for k, v in s.items():
            if isinstance(v, Tensor) and v.is_floating_point() and device == "cpu":
                s[k] = v.double()
    opt2 = OnlineMergingAdamW(part.named_parameters(), None, **opts)
    opt2.load_state_dict(saved)
    state = opt2.state[part[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and state["tau"].dtype == torch.bfloat16
    assert state["tau_idx"].dtype == torch.int64 and state["acc"].device.type == "cpu"
    run_steps(part, opt2, range(3, 5))
    for (n, a), b in zip(full.named_parameters(), part.parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("mode", ["ondare", "onties"])
def test_same_seed_different_process_rng_and_simulated_ranks_agree(mode: str) -> None:
    # two "ranks": the same all-reduced gradients, different process RNG states, and one sees
    # the parameters through a DDP wrapper ("module." names): the replicas must stay identical
    replicas = []
    for rank in range(2):
        torch.manual_seed(1000 + rank)
        model = tiny_model()
        torch.manual_seed(2000 + rank)
        named = [(f"module.{n}" if rank else n, p) for n, p in model.named_parameters()]
        opt = OnlineMergingAdamW(
            named, random_tau(model), mode=mode, lr=LR, eps=EPS, alpha=0.01, reserve_p=0.1, seed=3
        )
        torch.rand(rank + 5)  # the process RNG moves differently on each rank
        for step in range(4):
            set_grads(model, grads_for(step, model))
            opt.step()
        replicas.append(model)
    moved = False
    for (n, a), b in zip(replicas[0].named_parameters(), replicas[1].parameters(), strict=True):
        assert torch.equal(a, b), n
        moved |= not torch.equal(a, tiny_model().state_dict()[n])
    assert moved
    # and another seed draws other masks
    other = tiny_model()
    opt = OnlineMergingAdamW(
        other.named_parameters(), random_tau(other), mode=mode, lr=LR, eps=EPS, alpha=0.01,
        reserve_p=0.1, seed=4,
    )  # fmt: skip
    for step in range(4):
        set_grads(other, grads_for(step, other))
        opt.step()
    if mode == "ondare":
        assert not torch.equal(other[0].weight, replicas[0][0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_indices_and_steps_identical_on_cpu_and_cuda() -> None:
    for numel, density in ((1000, 0.3), (3_000_000, 0.01)):
        key = rng.tensor_seed(0, "x", str(numel))
        cpu = rng.hash_sparse_keep(numel, density, key)
        gpu = rng.hash_sparse_keep(numel, density, key, device="cuda")
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    x = torch.randn(1_000_000).round(decimals=2)
    assert torch.equal(
        selection.top_magnitude_indices_static(x.cuda(), 10_000).cpu(),
        selection.top_magnitude_indices(x, 10_000),
    )
    # OnTIES is left out: its top-k follows last-bit differences of Delta near ties, and CUDA's
    # moment kernels may round differently (fused multiply-adds); its selection is checked above
    for mode in ("ondare",):
        models = [tiny_model(), tiny_model().cuda()]
        tau = random_tau(models[0])
        opts = [
            OnlineMergingAdamW(m.named_parameters(), tau, mode=mode, lr=LR, eps=EPS, alpha=0.01,
                               reserve_p=0.1)
            for m in models
        ]  # fmt: skip
        for step in range(3):
            for m, o in zip(models, opts, strict=True):
                grads = grads_for(step, models[0])
                for n, p in m.named_parameters():
                    p.grad = grads[n].to(p.device)
                o.step()
        for (n, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b.cpu(), atol=1e-6, rtol=1e-5, msg=n)


# -- the counter-based primitives -----------------------------------------------------------------


def test_hash_sparse_keep_is_a_fixed_size_bernoulli_mask() -> None:
    n, p = 200_000, 0.01
    idx, valid = rng.hash_sparse_keep(n, p, key=11)
    assert idx.numel() == valid.numel() == rng.sparse_draws(n, p)  # known from the sizes alone
    assert idx.dtype == torch.int64 and int(idx.max()) <= n - 1
    kept = idx[valid]
    assert valid[: kept.numel()].all() and not valid[kept.numel() :].any()  # a valid prefix
    assert (kept.diff() > 0).all()
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.numel() - n * p) < 5 * sd
    per_block = torch.bincount(kept // (n // 10), minlength=10).float()
    assert (per_block - n * p / 10).abs().max() < 5 * math.sqrt(n * p / 10)
    # gaps are geometric: P(gap = 1) = p, mean gap 1 / p
    gaps = kept.diff().float()
    assert abs(float((gaps == 1).float().mean()) - p) < 5 * math.sqrt(p / gaps.numel())
    assert abs(float(gaps.mean()) * p - 1) < 0.05
    # a pure function of (numel, density, key)
    again = rng.hash_sparse_keep(n, p, key=11)
    assert torch.equal(idx, again[0]) and torch.equal(valid, again[1])
    assert not torch.equal(kept[:50], rng.hash_sparse_keep(n, p, key=12)[0][:50])
    # the same per-entry rate at a large density
    idx, valid = rng.hash_sparse_keep(100_000, 0.4, key=1)
    assert abs(int(valid.sum()) - 40_000) < 5 * math.sqrt(100_000 * 0.24)
    all_idx, all_valid = rng.hash_sparse_keep(5, 1.0, key=1)
    assert all_idx.tolist() == list(range(5)) and all_valid.all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_and_stays_on_neighbours(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=g) + 0.5) * torch.randn(200_000, generator=g).sign()
    r = rounding.stochastic_round(x, dtype, key=5)
    assert r.dtype == dtype
    lo = torch.minimum(x.to(dtype).float(), r.float())
    near = x.to(dtype)
    # always one of the two neighbours of x
    down = torch.where(
        near.float() <= x, near, torch.nextafter(near, torch.tensor(-1e9, dtype=dtype))
    )
    up = torch.where(near.float() >= x, near, torch.nextafter(near, torch.tensor(1e9, dtype=dtype)))
    assert ((r == down) | (r == up)).all()
    # unbiased: the mean rounding error is ~0, far below round-to-nearest's for a biased input
    ulp = (up.float() - down.float()).clamp_min(1e-30)
    err = ((r.float() - x) / ulp).mean()
    assert abs(float(err)) < 5 * 0.5 / math.sqrt(x.numel())
    shifted = down.float() + 0.1 * ulp  # 0.1 ulp above the lower neighbour: nearest never moves
    got = rounding.stochastic_round(shifted, dtype, key=6).float()
    frac_up = float(((got - down.float()) / ulp).mean())
    assert abs(frac_up - 0.1) < 0.005
    assert torch.equal(rounding.stochastic_round(x, dtype, key=5), r)  # deterministic
    del lo


def test_static_top_k_matches_the_host_selection() -> None:
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(300_000, generator=gen)
    cases = {"smooth": smooth, "tied": smooth.round(decimals=1), "zeros": torch.zeros(5000)}
    cases["small"] = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 0.0, 1.0, -3.0])
    for name, x in cases.items():
        for k in (0, 1, 4, 2999, 70_000):
            if k <= x.numel():
                got = selection.top_magnitude_indices_static(x, k)
                assert torch.equal(got, ref_topk_indices(x, k)), (name, k)


@pytest.mark.parametrize(
    "test", [test_onties_by_hand_over_three_steps, test_onties_zero_tau_is_topk_masked_adam]
)
def test_onties_oracles_on_the_sync_free_path(test, monkeypatch) -> None:
    # the accelerator path (radix select, no host syncs) runs here on the CPU
    monkeypatch.setattr(om, "HOST_SELECTION_DEVICES", ())
    calls = []
    real = selection.top_magnitude_indices_static
    monkeypatch.setattr(
        selection, "top_magnitude_indices_static", lambda x, k: calls.append(k) or real(x, k)
    )
    test()
    assert calls


def test_onties_clip_val_clamps_tau() -> None:
    lin = nn.Linear(64, 64, bias=False)
    tau = {"w": torch.randn(64, 64) * 3}
    for clip_val, bound in ((0.5, 0.5), (None, float(tau["w"].abs().max()))):
        opt = OnlineMergingAdamW(
            [("w", lin.weight)], tau, mode="onties", reserve_p=0.1, clip_val=clip_val
        )
        stored = opt.state[lin.weight]["tau"].float()
        assert float(stored.abs().max()) == pytest.approx(bound, rel=1e-2)
        want = tau["w"].reshape(-1)[ref_topk_indices(tau["w"], int(0.1 * 4096))]
        torch.testing.assert_close(stored, clip(want, clip_val).bfloat16().float())


def clip(x: Tensor, c: float | None) -> Tensor:
    return x if c is None else x.clamp(-c, c)


# -- low-precision parameters (issue 11 item 2) ----------------------------------------------------


def sub_ulp_run(mode: str, dtype: torch.dtype, rounding: bool, merge_every: int = 1) -> Tensor:
    """Movement of a [256, 256] weight after 300 steps whose pushes are all below half a bf16
    ulp: weights in +-[0.5, 1) (ulp 2^-8), alpha * tau / p = 1e-4 and |Delta| / p = 1e-3 per
    step. The initial weights are bf16 values, so float32 and bf16 runs start equal."""
    g = torch.Generator().manual_seed(0)
    init = (torch.rand(256, 256, generator=g) + 0.5) * torch.randn(256, 256, generator=g).sign()
    init = init.bfloat16().float()
    weight = nn.Parameter(init.to(dtype, copy=True))
    tau = {"w": torch.randn(256, 256, generator=g).sign() * 0.01}
    grad = torch.randn(256, 256, generator=g).bfloat16().to(dtype)  # the same in every run
    opt = OnlineMergingAdamW(
        [("w", weight)], tau, mode=mode, lr=1e-4, reserve_p=0.1, alpha=1e-3, clip_val=None,
        stochastic_rounding=rounding, merge_every=merge_every, tau_dtype=torch.float32,
    )  # fmt: skip
    for _ in range(300):
        weight.grad = grad.clone()
        opt.step()
    opt.flush()
    state = opt.state[weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert merge_every == 1 or state["acc"].dtype == torch.float32
    return weight.detach().float() - init


@pytest.fixture
def one_thread():
    """300 steps of small ops: one thread avoids thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode,merge_every", [("ondare", 1), ("onties", 1), ("ondare", 3)])
def test_bf16_sub_ulp_pushes_match_float32(mode: str, merge_every: int, one_thread) -> None:
    want = sub_ulp_run(mode, torch.float32, True, merge_every)
    assert float(want.abs().max()) > 2**-8  # several ulps in total, from sub-ulp steps
    direction = want.sign()
    for dtype in (torch.bfloat16, torch.float16):
        got = sub_ulp_run(mode, dtype, True, merge_every)
        # the movement along the float32 run's, summed over every moved entry: within 3%
        ratio = float((got * direction).sum() / want.abs().sum())
        assert 0.97 < ratio < 1.03, (dtype, ratio)
    if mode == "ondare" and merge_every == 1:
        # round-to-nearest (the option off) drops nearly all of it: what the default fixes
        nearest = sub_ulp_run(mode, torch.bfloat16, False)
        assert float((nearest * direction).sum() / want.abs().sum()) < 0.2


def test_bf16_stochastic_rounding_is_the_same_for_every_replica(one_thread) -> None:
    a = sub_ulp_run("onties", torch.bfloat16, True)
    b = sub_ulp_run("onties", torch.bfloat16, True)
    assert torch.equal(a, b) and a.abs().sum() > 0


# -- merge_every at the end of training (issue 11 item 3) ------------------------------------------


@pytest.mark.slow  # trains end to end with a TRL trainer
@pytest.mark.parametrize("mode", ["ondare", "onties"])
def test_train_flushes_the_pending_update_at_the_end(family, tmp_path, mode: str) -> None:
    """`rlmerge train` with max_steps (2) < merge_every (5): nothing was merged during training,
    so the final model must be the checkpoint of step 2 (the initial weights, the pending
    buffer in its optimizer state) with that buffer flushed."""
    import yaml
    from transformers import AutoModelForCausalLM, Trainer

    from mergekit_rl.train.recipe import parse_train_recipe
    from mergekit_rl.train.run import make_optimizer
    from tests.conftest import load_state
    from tests.train.test_run import dpo_text, run

    out = tmp_path / "run"
    doc = yaml.safe_load(dpo_text(family, out, max_steps=2, save_steps=2))
    doc["optimizer"].update(name=mode, merge_every=5, reserve_p=0.3, weight_decay=0.01)
    text = yaml.safe_dump(doc)
    run(text)
    final, start = load_state(out / "final"), load_state(family["sft1"])
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the steps are not lost

    ckpt = out / "checkpoint-2"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    held = {k: v for k, v in model.state_dict().items() if k in start}
    assert all(torch.equal(held[k], start[k]) for k in start)  # parameters stay put mid-cycle
    recipe = parse_train_recipe(text, "r.yaml")
    opt = make_optimizer(recipe, model, Trainer.get_decay_parameter_names(None, model))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    assert opt.flush() and not opt.flush()  # the second has nothing left
    flushed = model.state_dict()
    for k in start:
        assert torch.equal(final[k], flushed[k].to(final[k].dtype)), k


def test_geometric_gaps_equal_a_search_of_the_integer_cuts() -> None:
    # the float64 log estimate, corrected by one comparison each side, is the exact table lookup
    for density in (0.01, 0.3, 0.999, 1e-4):
        cuts = rng.gap_cuts(density)
        inner = cuts[1:-1]
        u = torch.cat(
            [torch.tensor([0, 1, 2, (1 << 31) - 1]), inner, inner - 1, (inner + 1)[1:],
             torch.randint(0, 1 << 31, (100_000,), generator=torch.Generator().manual_seed(0))]
        ).clamp(0, (1 << 31) - 1)  # fmt: skip
        want = cuts.numel() - torch.searchsorted(cuts.flip(0), u, right=True)  # 1 + max{D_j > u}
        assert torch.equal(rng.geometric_gaps(u, density), want), density


def test_batched_masks_equal_one_call_per_tensor() -> None:
    numels = [128, 16, 64, 4, 100_000, 1, 3000]
    keys = [rng.tensor_seed(1, str(i)) for i in range(len(numels))]
    assert torch.equal(
        rng.hash_bits_many(numels, keys),
        torch.cat([rng.hash_bits(n, k) for n, k in zip(numels, keys, strict=True)]),
    )
    for density in (0.01, 0.3):
        idx, valid, draws = rng.hash_sparse_keep_many(numels, density, keys)
        assert draws == [rng.sparse_draws(n, density) for n in numels]
        parts = zip(idx.split(draws), valid.split(draws), numels, keys, strict=True)
        for i, v, n, k in parts:
            want = rng.hash_sparse_keep(n, density, k)
            assert torch.equal(i, want[0]) and torch.equal(v, want[1]), (n, density)


# -- the fused-kernel path (torch's fused AdamW kernel computes the moments and Delta) ------------


def test_fused_adam_deltas_are_the_hf_update_with_identical_moments() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(300,), (17, 5), (1,)]
    grads = [torch.randn(s, generator=gen).reshape(-1) for s in shapes]
    ms = [torch.randn(g.shape, generator=gen) * 0.1 for g in grads]
    vs = [torch.rand(g.shape, generator=gen) * 0.01 for g in grads]
    m_ref, v_ref = [m.clone() for m in ms], [v.clone() for v in vs]
    steps, lr = [3, 3, 7], 1e-3  # two distinct step counts: two kernels
    out = [torch.zeros_like(g) for g in grads]
    om.fused_adam_deltas_(out, grads, ms, vs, steps, lr, BETAS, EPS)
    b1, b2 = BETAS
    for i, t in enumerate(steps):
        # the moments are the multi-tensor path's (to rounding: the kernel may fuse multiply-adds)
        m_ref[i].lerp_(grads[i], 1 - b1)
        v_ref[i].mul_(b2).addcmul_(grads[i], grads[i], value=1 - b2)
        torch.testing.assert_close(ms[i], m_ref[i], rtol=1e-6, atol=0)
        torch.testing.assert_close(vs[i], v_ref[i], rtol=1e-6, atol=0)
        # Delta is HF's formula (eps before the bias correction), in float64, to a few ulp
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        ref = -step_size * m_ref[i].double() / (v_ref[i].double().sqrt() + EPS)
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-6, atol=0)


def test_chunks_cover_every_index_in_order_within_the_budget() -> None:
    numels = [5, 3, 9, 1, 1, 8, 2]
    runs = om.chunks(numels, budget=10)
    assert [list(r) for r in runs] == [[0, 1], [2, 3], [4, 5], [6]]
    assert [list(r) for r in om.chunks([3, 20, 3], budget=10)] == [[0], [1], [2]]
    assert [list(r) for r in om.chunks([4, 4], budget=100)] == [[0, 1]]
    for run in om.chunks(numels, budget=1):  # the largest parameter is the floor
        assert sum(numels[i] for i in run) <= max(numels)


@pytest.mark.parametrize(
    "test",
    [
        test_ondare_full_keep_alpha0_is_hf_adamw,
        test_full_keep_alpha_adds_alpha_tau_each_step,
        test_onties_zero_tau_is_topk_masked_adam,
        test_ondare_by_hand_over_three_steps,
        test_onties_by_hand_over_three_steps,
    ],
)
def test_oracles_on_the_unfused_path(test, monkeypatch) -> None:
    # devices without torch's fused AdamW kernel: multi-tensor moments, Delta per parameter
    monkeypatch.setattr(om, "FUSED_ADAM_DEVICES", ())
    monkeypatch.setattr(om, "fused_adam_deltas_", None)  # any use fails
    kwargs = {"wd": 0.1, "after": False} if test is test_ondare_full_keep_alpha0_is_hf_adamw else {}
    test(**kwargs)


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge_every", [1, 2])
def test_fused_and_unfused_paths_agree(mode, dtype, merge_every, monkeypatch) -> None:
    # a chunk budget below the largest parameter: every chunk boundary is crossed
    monkeypatch.setattr(om, "CHUNK_ELEMS", 40)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(om, "FUSED_ADAM_DEVICES", ())
        model = tiny_model().to(dtype)
        opt = OnlineMergingAdamW(
            model.named_parameters(), random_tau(model), mode=mode, lr=LR, eps=EPS, alpha=0.01,
            reserve_p=0.3, merge_every=merge_every, weight_decay=0.01,
        )  # fmt: skip
        for step in range(4):
            grads = grads_for(step, model)
            for n, p in model.named_parameters():
                p.grad = grads[n].to(dtype)
            opt.step()
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert not torch.equal(p, tiny_model().to(dtype).state_dict()[n]), n  # it trained
        # Delta differs by a few ulp (eps placement), which a bf16 weight may round across
        tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0}
        torch.testing.assert_close(p.float(), q.float(), **tol, msg=n)
        sa, sb = opt_a.state[p], opt_b.state[q]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=0, msg=n)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=0, msg=n)


def test_tau_at_locates_sparse_tau_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    numel = 50_000
    tau_idx = torch.randperm(numel, generator=gen)[:700].sort().values
    state = {"tau": torch.randn(700, generator=gen).to(torch.bfloat16), "tau_idx": tau_idx}
    # wanted indices: half stored ones, half others, plus the first and last entry
    others = torch.randperm(numel, generator=gen)[:400]
    idx = torch.cat([tau_idx[::2], others, torch.tensor([0, numel - 1])]).unique()
    got = om.tau_at(state, idx, numel, like=torch.zeros(1))
    dense = torch.zeros(numel)  # the reference by hand: a dense tau
    dense[tau_idx] = state["tau"].float()
    assert torch.equal(got, dense[idx])
    assert (got != 0).sum() >= 350  # the stored half was found


def test_the_sync_detector_sees_syncs() -> None:
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        int(x.sum()), x[x > 2], x.nonzero(), torch.repeat_interleave(x, torch.tensor([1] * 6))
        x[torch.tensor(1)], x.nonzero_static(size=2), torch.repeat_interleave(x, 2)  # no syncs
        torch.repeat_interleave(x, torch.tensor([1] * 6), output_size=6)
    ops = [op for op, _ in syncs.found]
    assert ops == [
        "_local_scalar_dense",
        "index",
        "nonzero",
        "repeat_interleave",
        "_local_scalar_dense",
    ]


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge_every", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_a_step_on_the_accelerator_path_never_syncs(mode, dtype, merge_every, fused, monkeypatch):
    # the accelerator path forced on the CPU (no C kernels, no host-side selection); every op
    # that would make a GPU wait for the host is recorded. (Branches keyed on the CPU device
    # itself, such as the host cast of bf16 gradients, still take their host form here.)
    accelerator_path(monkeypatch)
    if not fused:
        monkeypatch.setattr(om, "FUSED_ADAM_DEVICES", ())
    model = tiny_model().to(dtype)
    opt = OnlineMergingAdamW(
        model.named_parameters(), random_tau(model), mode=mode, lr=LR, alpha=0.01, reserve_p=0.3,
        merge_every=merge_every, weight_decay=0.01,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2 * merge_every):
        set_grads(model, {n: g.to(dtype) for n, g in grads_for(step, model).items()})
        with HostSyncs() as syncs:
            opt.step()
        assert not syncs.found, "\n".join(f"{op} at\n{where}" for op, where in syncs.found)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n  # the steps merged something


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_bits_drawn_per_chunk_equal_the_per_parameter_draws(mode, dtype, monkeypatch):
    # without the host kernels the rounding bits of a whole chunk come from one hash_bits_many;
    # they must be the bits each add would draw under its own key, so the weights are the same
    accelerator_path(monkeypatch)
    monkeypatch.setattr(om, "CHUNK_ELEMS", 100)  # several chunks
    batched = om.OnlineMergingAdamW._rounding
    runs = []
    for per_parameter in (False, True):
        if per_parameter:  # every add hashes its own key
            monkeypatch.setattr(
                om.OnlineMergingAdamW,
                "_rounding",
                lambda self, merges, pushes: [m.rounds for m in merges],
            )
        model = tiny_model().to(dtype)
        opt = OnlineMergingAdamW(
            model.named_parameters(), random_tau(model), mode=mode, lr=LR, alpha=0.01,
            reserve_p=0.3, weight_decay=0.1,
        )  # fmt: skip
        for step in range(3):
            set_grads(model, {n: g.to(dtype) for n, g in grads_for(step, model).items()})
            opt.step()
        runs.append(model)
    assert batched is not om.OnlineMergingAdamW._rounding  # the second run was per parameter
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_step_never_synchronises(mode, dtype) -> None:
    # torch raises on every synchronising CUDA call (item, nonzero, pageable copies, ...)
    model = tiny_model().to("cuda", dtype)
    opt = OnlineMergingAdamW(
        model.named_parameters(), random_tau(model), mode=mode, lr=LR, alpha=0.01, reserve_p=0.3,
        weight_decay=0.01,
    )  # fmt: skip
    for step in range(3):
        grads = grads_for(step, model)
        for n, p in model.named_parameters():
            p.grad = grads[n].to("cuda", dtype)
        torch.cuda.synchronize()
        if step == 0:  # the first step builds the scratch buffers and cached tables
            opt.step()
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [40, 1 << 22])
@pytest.mark.parametrize("accelerator", [False, True])
def test_chunk_batched_merges_equal_the_per_parameter_merges(
    mode, dtype, chunk, accelerator, monkeypatch
):
    # the chunk path (one gather, one tau lookup and election for all parameters of a chunk)
    # against each parameter merging on its own; tau sparse for the weights, dense for the
    # 4-entry bias (it keeps every entry), absent for one parameter
    monkeypatch.setattr(om, "CHUNK_ELEMS", chunk)
    if accelerator:
        accelerator_path(monkeypatch)
    taus = random_tau(tiny_model())
    del taus["0.bias"]
    runs = []
    for per_parameter in (False, True):
        if per_parameter:
            for name in ("_ondare_chunk", "_onties_chunk"):
                monkeypatch.setattr(
                    om.OnlineMergingAdamW, name, lambda self, group, run, *a: [None] * len(run)
                )
        model = tiny_model().to(dtype)
        opt = OnlineMergingAdamW(
            model.named_parameters(), taus, mode=mode, lr=LR, alpha=0.05, reserve_p=0.1,
            weight_decay=0.01,
        )  # fmt: skip
        if mode == "onties":  # (OnDARE's tau is a random draw: the small bias may keep none)
            assert "tau_idx" in opt.state[model[0].weight]
            assert "tau_idx" not in opt.state[model[2].bias]
        for step in range(3):
            set_grads(model, {n: g.to(dtype) for n, g in grads_for(step, model).items()})
            opt.step()
        runs.append(model)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q), n
        assert not torch.equal(p, tiny_model().to(dtype).state_dict()[n]), n  # it trained


@pytest.mark.parametrize("mode", ["ondare", "onties"])
def test_bf16_weights_are_the_same_on_the_host_and_the_accelerator_path(mode, monkeypatch):
    # the C kernels and top-k on the host against the torch ops accelerators run (forced here),
    # with steps big enough that sums cross zero (where an add of new - old would round)
    runs = []
    for accelerator in (False, True):
        if accelerator:
            accelerator_path(monkeypatch)
        model = tiny_model().to(torch.bfloat16)
        opt = OnlineMergingAdamW(
            model.named_parameters(), random_tau(model, scale=0.5), mode=mode, lr=0.2, alpha=0.1,
            reserve_p=0.3, weight_decay=0.01,
        )  # fmt: skip
        for step in range(3):
            set_grads(model, {n: g.bfloat16() for n, g in grads_for(step, model).items()})
            opt.step()
        runs.append(model)
    for (n, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), n


# -- edge parameters: empty ones, and ones without a gradient on a step -------------------------


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["host", "accelerator"])
def test_an_empty_parameter_is_skipped(mode, dtype, path, monkeypatch) -> None:
    # a zero-size trainable parameter (an empty embedding slice, a pruned head): its mask
    # would index -1; it has nothing to update, and the others train as without it
    if path == "accelerator":
        accelerator_path(monkeypatch)
    runs = []
    for with_empty in (True, False):
        model = tiny_model().to(dtype)
        if with_empty:
            model.register_parameter("empty", nn.Parameter(torch.zeros(0, 8, dtype=dtype)))
        tau = random_tau(model)
        opt = OnlineMergingAdamW(
            model.named_parameters(), tau, mode=mode, lr=LR, reserve_p=0.3, alpha=0.01
        )
        for step in range(3):
            set_grads(model, {n: g.to(dtype) for n, g in grads_for(step, model).items()})
            opt.step()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.numel()})
    assert runs[0].keys() == runs[1].keys()
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("path", ["host", "accelerator"])
def test_a_parameter_without_a_gradient_still_gets_the_tau_push(mode, path, monkeypatch) -> None:
    # an MoE expert no token was routed to: alpha * tau every step (the push is independent of
    # the gradient), no Adam update, no weight decay, no Adam state
    if path == "accelerator":
        accelerator_path(monkeypatch)
    model, alpha = tiny_model(), 0.05
    tau = random_tau(model)
    opt = OnlineMergingAdamW(
        model.named_parameters(), tau, mode=mode, lr=LR, reserve_p=1.0, alpha=alpha,
        weight_decay=0.1,
    )  # fmt: skip
    idle = dict(model.named_parameters())["2.weight"]
    start = idle.detach().clone()
    tau_ref = tau["2.weight"].clamp(-1, 1).to(torch.bfloat16).float()  # stored in bf16
    expected = start.clone()
    for step in range(3):
        set_grads(model, grads_for(step, model))
        idle.grad = None
        opt.step()
        expected = expected + alpha * tau_ref
    assert torch.equal(idle.detach(), expected)
    assert "step" not in opt.state[idle]  # Adam never ran on it
    moved = dict(model.named_parameters())["0.weight"]
    assert opt.state[moved]["step"] == 3


# -- a diverged update stops the run -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ondare", "onties"])
@pytest.mark.parametrize("path", ["host", "accelerator"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_update_stops_with_the_parameter_and_step(mode, path, fused, bad, monkeypatch):
    # a NaN in 3 entries of one gradient: the host top-k kept fewer than k entries and the
    # parameter trained on with NaN moments; now the step names it (the accelerator path a step
    # later: its flags come back without a sync)
    if path == "accelerator":
        accelerator_path(monkeypatch)
    if not fused:
        monkeypatch.setattr(om, "FUSED_ADAM_DEVICES", ())
    model = tiny_model()
    opt = OnlineMergingAdamW(
        model.named_parameters(), random_tau(model), mode=mode, lr=LR, reserve_p=0.3, alpha=0.01
    )
    raised_at = None
    for step in range(1, 5):
        grads = grads_for(step, model)
        if step == 2:
            grads["2.weight"].view(-1)[[3, 17, 40]] = bad
        set_grads(model, grads)
        try:
            opt.step()
        except RunError as e:
            raised_at, message = step, str(e)
            break
    if raised_at is None:
        with pytest.raises(RunError) as info:
            opt.flush()
        raised_at, message = 5, str(info.value)
    assert "parameter '2.weight'" in message and "optimizer step 2:" in message, message
    assert raised_at == 2 if path == "host" else raised_at in (2, 3)


def test_finite_updates_raise_nothing_and_flush_reads_every_flag(monkeypatch) -> None:
    accelerator_path(monkeypatch)
    model = tiny_model()
    opt = OnlineMergingAdamW(model.named_parameters(), random_tau(model), lr=LR, reserve_p=0.3)
    for step in range(3):
        set_grads(model, grads_for(step, model))
        opt.step()
    opt.flush()
    assert not opt._finite_checks
