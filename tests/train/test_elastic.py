"""Elastic Reset: EMA, resets and checkpoints against a float64 hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mergekit_rl.errors import InputNotFoundError, MismatchError, UsageError
from mergekit_rl.train.elastic import META_FILE, STATE_FILE, ElasticResetCallback


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def save_weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def update(step: int, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """A deterministic stand-in for an optimizer step (float64)."""
    gen = torch.Generator().manual_seed(100 + step)
    return {n: 0.1 * torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in names}


def fake_step(model: nn.Module, step: int) -> None:
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    with torch.no_grad():
        for n, d in update(step, list(params), shapes).items():
            params[n].add_(d.float())


def drive(model: nn.Module, cb: ElasticResetCallback, steps: range) -> None:
    """fake optimizer steps, each followed by the callback (as on_step_end does)."""
    for step in steps:
        fake_step(model, step)
        cb.on_step(model, None, step)


def hand_run(theta0: dict[str, Tensor], steps: int, decay: float, ema_every: int, reset_every: int):
    """The algorithm in float64 (notes section 3): EMA update, then reset on reset steps."""
    theta = {n: t.double().clone() for n, t in theta0.items()}
    ema = {n: t.double().clone() for n, t in theta0.items()}
    shapes = {n: t.shape for n, t in theta0.items()}
    for t in range(1, steps + 1):
        # the model itself is float32: apply each step's update as float32 does
        for n, d in update(t, list(theta), shapes).items():
            theta[n] = (theta[n].float() + d.float()).double()
        if t % ema_every == 0:
            ema = {n: decay * ema[n] + (1 - decay) * theta[n] for n in ema}
        if t % reset_every == 0:
            theta = {n: ema[n].float().double() for n in ema}
            ema = {n: theta0[n].double().clone() for n in theta0}
    return theta, ema


@pytest.mark.parametrize("ema_every,reset_every", [(1, 3), (2, 3)])
def test_ema_and_resets_match_hand_computation(
    tmp_path: Path, ema_every: int, reset_every: int
) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = ElasticResetCallback(init, ema_decay=0.9, ema_every=ema_every, reset_every=reset_every)
    cb.attach(model)
    drive(model, cb, range(1, 8))
    want_theta, want_ema = hand_run(theta0, 7, 0.9, ema_every, reset_every)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.double(), want_theta[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(cb.ema[n].double(), want_ema[n], atol=1e-6, rtol=0)
    assert cb.num_resets == 7 // reset_every
    assert all(e.dtype == torch.float32 for e in cb.ema.values())


@pytest.mark.parametrize("keep_init_on_cpu", [False, True])
def test_reset_reads_initial_weights_from_disk(tmp_path: Path, keep_init_on_cpu: bool) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = ElasticResetCallback(init, reset_every=2, keep_init_on_cpu=keep_init_on_cpu)
    cb.attach(model)
    # a different theta_0 on disk after attach: only a run that reads the disk at reset sees it
    on_disk = small_model(seed=5)
    save_weights(on_disk, init)
    drive(model, cb, range(1, 3))
    want = original if keep_init_on_cpu else dict(on_disk.named_parameters())
    for n in original:
        torch.testing.assert_close(cb.ema[n], want[n].detach(), atol=0, rtol=0)
    assert cb.init.keys() == (original.keys() if keep_init_on_cpu else set())


def test_parameters_missing_from_checkpoint_keep_their_attach_value(tmp_path: Path) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    model.add_module("value_head", nn.Linear(3, 1))  # a head the checkpoint does not hold
    head0 = model.value_head.weight.detach().clone()
    cb = ElasticResetCallback(init, reset_every=1)
    cb.attach(model)
    drive(model, cb, range(1, 2))
    torch.testing.assert_close(cb.ema["value_head.weight"], head0, atol=0, rtol=0)


def test_kl_anchor_ema_reference_follows_the_ema(tmp_path: Path) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    ref = small_model(seed=3)
    cb = ElasticResetCallback(init, ema_decay=0.8, ema_every=2, reset_every=5, kl_anchor="ema")
    cb.attach(model)
    cb.bind_reference(ref)
    for step in range(1, 8):
        drive(model, cb, range(step, step + 1))
        for n, p in ref.named_parameters():
            assert torch.equal(p, cb.ema[n]), (step, n)
    assert cb.num_resets == 1


def test_kl_anchor_errors(tmp_path: Path) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    with pytest.raises(UsageError, match="kl_anchor='init'"):
        ElasticResetCallback(init, reset_every=2).bind_reference(small_model())
    cb = ElasticResetCallback(init, reset_every=2, kl_anchor="ema")
    cb.attach(model)
    with pytest.raises(UsageError, match="bind_reference"):
        cb.on_step(model, None, 1)
    with pytest.raises(MismatchError, match="no parameter '0.weight'"):
        cb.bind_reference(nn.Sequential(nn.Identity(), nn.Tanh(), nn.Linear(4, 3)))
    late = ElasticResetCallback(init, reset_every=2, kl_anchor="ema")
    ref = small_model(seed=4)
    late.bind_reference(ref)  # bound before attach: checked and copied at attach
    late.attach(model)
    assert torch.equal(ref[0].weight, model[0].weight)


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_reset_optimizer_option(tmp_path: Path, reset_optimizer: bool) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = ElasticResetCallback(init, reset_every=2, reset_optimizer=reset_optimizer)
    cb.attach(model)
    for step in (1, 2):
        model(torch.ones(2, 5)).sum().backward()
        opt.step()
        opt.zero_grad()
        cb.on_step(model, opt, step)
    steps = [float(s.get("step", 0)) for s in opt.state.values()]
    assert steps == [0.0 if reset_optimizer else 2.0] * 4
    model(torch.ones(2, 5)).sum().backward()
    opt.step()  # a cleared state re-initialises lazily


def test_save_load_resumes_exactly(tmp_path: Path) -> None:
    init = save_weights(small_model(), tmp_path / "init.safetensors")
    kwargs = dict(ema_decay=0.9, ema_every=1, reset_every=4)

    straight = small_model()
    cb = ElasticResetCallback(init, **kwargs)
    cb.attach(straight)
    drive(straight, cb, range(1, 10))

    first = small_model()
    cb1 = ElasticResetCallback(init, **kwargs)
    cb1.attach(first)
    drive(first, cb1, range(1, 6))
    cb1.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / META_FILE).read_text())
    assert meta["step"] == 5 and meta["num_resets"] == 1

    resumed = small_model(seed=9)
    resumed.load_state_dict(first.state_dict())  # what the Trainer restores itself
    cb2 = ElasticResetCallback(init, **kwargs)
    cb2.attach(resumed)
    cb2.load(tmp_path / "ckpt")
    drive(resumed, cb2, range(6, 10))
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    for n in cb.ema:
        assert torch.equal(cb.ema[n], cb2.ema[n]), n
    assert cb2.num_resets == cb.num_resets == 2


def test_bad_options_and_inputs(tmp_path: Path) -> None:
    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    for bad in ({"ema_decay": 1.0}, {"ema_every": 0}, {"reset_every": 0}, {"kl_anchor": "x"}):
        with pytest.raises(UsageError):
            ElasticResetCallback(init, **{"reset_every": 3, **bad})
    with pytest.raises(InputNotFoundError):
        ElasticResetCallback(tmp_path / "nope", reset_every=3)
    wide = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(MismatchError, match="'0.weight'"):
        ElasticResetCallback(init, reset_every=3).attach(wide)
    cb = ElasticResetCallback(init, reset_every=3)
    cb.attach(model)
    with pytest.raises(InputNotFoundError, match=STATE_FILE):
        cb.load(tmp_path)


# -- with a real transformers Trainer -----------------------------------------------------------


class _StopAt:
    """A callback that stops training after optimizer step n (the save at n still happens)."""

    def __init__(self, n: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                if state.global_step == n:
                    control.should_training_stop = True

        self.callback = Stop()


def _train(family: dict[str, Path], out: Path, stop_at: int | None, resume: bool):
    """Six steps of causal-LM training on tiny Llama sft1 with Elastic Reset (reset every 2)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from mergekit_rl.tiny import CORPUS, build_tokenizer

    tok = build_tokenizer()
    rows = [tok(text)["input_ids"][:12] for text in CORPUS[:24]]
    data = [{"input_ids": r, "labels": r} for r in rows if len(r) == 12]
    model = AutoModelForCausalLM.from_pretrained(family["sft1"], dtype=torch.float32)
    cb = ElasticResetCallback(family["sft1"], ema_decay=0.7, reset_every=2)
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=3,
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    callbacks = [cb] + ([_StopAt(stop_at).callback] if stop_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
    return model, cb


@pytest.mark.slow  # trains end to end with a TRL trainer
def test_trainer_stopped_and_resumed_equals_uninterrupted(
    family: dict[str, Path], tmp_path: Path
) -> None:
    straight, cb = _train(family, tmp_path / "a", stop_at=None, resume=False)
    assert cb.num_resets == 3
    _, cb_first = _train(family, tmp_path / "b", stop_at=3, resume=False)
    assert cb_first.last_step == 3 and (tmp_path / "b" / "checkpoint-3" / STATE_FILE).is_file()
    resumed, cb_resumed = _train(family, tmp_path / "b", stop_at=None, resume=True)
    assert cb_resumed.num_resets == 3
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    for n in cb.ema:
        assert torch.equal(cb.ema[n], cb_resumed.ema[n]), n


def test_log_hook_adds_the_reset_count(tmp_path: Path) -> None:
    model = small_model()
    cb = ElasticResetCallback(save_weights(model, tmp_path / "init.safetensors"), reset_every=2)
    cb.attach(model)
    drive(model, cb, range(1, 5))
    logs = {"loss": 1.0}
    cb.on_log(None, None, None, logs=logs)
    assert logs == {"loss": 1.0, "elastic/num_resets": 2.0}


def test_tied_bf16_policy_tracks_the_shared_embedding_once(tied_family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_family["sft1"], dtype=torch.bfloat16)
    cb = ElasticResetCallback(tied_family["sft1"], ema_decay=0.5, reset_every=1)
    cb.attach(model)
    assert "lm_head.weight" not in cb.ema and "model.embed_tokens.weight" in cb.ema
    emb0 = model.model.embed_tokens.weight.detach().float().clone()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    moved = model.model.embed_tokens.weight.detach().float().clone()  # theta_0 + 1 in bf16
    cb.on_step(model, None, 1)  # EMA in float32, then theta <- EMA rounded to bf16
    want = (0.5 * emb0 + 0.5 * moved).bfloat16()
    assert torch.equal(model.model.embed_tokens.weight, want)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(cb.ema["model.embed_tokens.weight"], emb0)  # theta_0 from disk (bf16)


def test_train_begin_finds_the_checkpoint_to_resume(tmp_path: Path) -> None:
    from types import SimpleNamespace

    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    saved = ElasticResetCallback(init, reset_every=2)
    saved.attach(model)
    drive(model, saved, range(1, 4))
    saved.save(tmp_path / "out" / "checkpoint-3")
    saved.save(tmp_path / "elsewhere")

    def begin(state_step: int, resume_arg: str | None = None, **kw) -> ElasticResetCallback:
        cb = ElasticResetCallback(init, reset_every=2, **kw)
        args = SimpleNamespace(output_dir=str(tmp_path / "out"), resume_from_checkpoint=resume_arg)
        cb.on_train_begin(args, SimpleNamespace(global_step=state_step), None, model=model)
        return cb

    assert begin(0).last_step == 0  # a fresh run loads nothing
    assert begin(3).num_resets == 1  # output_dir/checkpoint-3
    assert begin(3, str(tmp_path / "elsewhere")).last_step == 3
    assert begin(3, resume_from=tmp_path / "elsewhere").last_step == 3
    with pytest.raises(MismatchError, match="step 3"):
        begin(5, str(tmp_path / "elsewhere"))
    with pytest.raises(InputNotFoundError):
        begin(4)  # no checkpoint-4 with Elastic Reset state
    args = SimpleNamespace(output_dir=str(tmp_path), deepspeed="ds.json")
    with pytest.raises(UsageError, match="DeepSpeed"):
        ElasticResetCallback(init, reset_every=2).on_train_begin(
            args, SimpleNamespace(global_step=0), None, model=model
        )
    # FSDP runs (on FSDP2 shards: tests/train/test_fsdp_optim.py)
    cb = ElasticResetCallback(init, reset_every=2)
    args = SimpleNamespace(output_dir=str(tmp_path), fsdp="full_shard")
    cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    assert set(cb.ema) == set(dict(model.named_parameters()))


def test_optimizer_reset_keeps_the_online_merging_task_vector(tmp_path: Path) -> None:
    from mergekit_rl.train.optim import OnlineMergingAdamW

    model = small_model()
    init = save_weights(model, tmp_path / "init.safetensors")
    tau = {n: torch.full_like(p, 0.01) for n, p in model.named_parameters()}
    opt = OnlineMergingAdamW(model.named_parameters(), tau, reserve_p=0.5)
    taus = {p: (s["tau"].clone(), s.get("tau_idx")) for p, s in opt.state.items()}
    cb = ElasticResetCallback(init, reset_every=1, reset_optimizer=True)
    cb.attach(model)
    model(torch.ones(2, 5)).sum().backward()
    opt.step()
    cb.on_step(model, opt, 1)
    for p, (t, idx) in taus.items():
        assert set(opt.state[p]) == ({"tau"} if idx is None else {"tau", "tau_idx"})
        assert torch.equal(opt.state[p]["tau"], t)
    opt.step()  # moments re-initialise lazily


@pytest.mark.parametrize(
    "changed,words",
    [
        ({"ema_decay": 0.95}, "ema_decay: saved 0.9, now 0.95"),
        ({"reset_every": 5}, "reset_every: saved 4, now 5"),
        ({"ema_every": 2}, "ema_every: saved 1, now 2"),
        ({"kl_anchor": "ema"}, "kl_anchor: saved 'init', now 'ema'"),
    ],
)
def test_resume_with_changed_settings_is_refused(tmp_path: Path, changed: dict, words: str):
    init = save_weights(small_model(), tmp_path / "init.safetensors")
    kwargs = dict(ema_decay=0.9, ema_every=1, reset_every=4, kl_anchor="init")
    model = small_model()
    cb = ElasticResetCallback(init, **kwargs)
    cb.attach(model)
    drive(model, cb, range(1, 3))
    cb.save(tmp_path / "ckpt")
    other = ElasticResetCallback(init, **{**kwargs, **changed})
    other.attach(model)
    with pytest.raises(MismatchError, match="other settings") as err:
        other.load(tmp_path / "ckpt")
    assert words in str(err.value) and str(tmp_path / "ckpt" / META_FILE) in str(err.value)
    same = ElasticResetCallback(init, **kwargs)  # unchanged settings still resume
    same.attach(model)
    same.load(tmp_path / "ckpt")
    assert same.last_step == 2


def test_ema_update_is_one_multi_tensor_lerp(tmp_path: Path, monkeypatch) -> None:
    init = save_weights(small_model(), tmp_path / "init.safetensors")
    model = small_model()
    cb = ElasticResetCallback(init, ema_decay=0.9, reset_every=100)
    cb.attach(model)
    before = {n: e.clone() for n, e in cb.ema.items()}
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or real(*a))
    fake_step(model, 1)
    cb.on_step(model, None, 1)
    assert calls == [len(cb.ema)]  # every tracked tensor in one call
    for n, p in model.named_parameters():
        want = 0.9 * before[n].double() + 0.1 * p.detach().double()
        torch.testing.assert_close(cb.ema[n].double(), want, atol=1e-7, rtol=0)


def test_reset_optimizer_draws_fresh_ondare_masks_every_cycle(tmp_path: Path) -> None:
    # OnDARE with alpha 0: a step moves exactly the entries its mask keeps. Resetting the
    # optimizer state must not replay the masks of the previous cycle.
    from mergekit_rl.train.optim import OnlineMergingAdamW

    torch.manual_seed(0)
    model = nn.Linear(100, 100, bias=False)  # 10,000 weights
    init = save_weights(model, tmp_path / "init.safetensors")
    tau = {"weight": torch.zeros(100, 100)}
    p_keep, every, cycles = 0.05, 4, 8
    opt = OnlineMergingAdamW(model.named_parameters(), tau, lr=1e-3, reserve_p=p_keep, alpha=0.0)
    cb = ElasticResetCallback(init, reset_every=every, reset_optimizer=True, ema_decay=0.5)
    cb.attach(model)
    gen = torch.Generator().manual_seed(1)
    moved = []
    for step in range(1, every * cycles + 1):
        model.weight.grad = torch.randn(100, 100, generator=gen)
        before = model.weight.detach().clone()
        opt.step()
        moved.append((model.weight != before).reshape(-1))
        cb.on_step(model, opt, step)
    assert 0.03 < float(moved[0].float().mean()) < 0.07  # a p-fraction moves per step
    for t in range(every):  # step t and step t + reset_every: independent masks
        overlap = (moved[t] & moved[t + every]).sum() / moved[t].sum()
        assert overlap < 3 * p_keep, (t, float(overlap))
    ever = torch.stack(moved).any(0).float().mean()
    expected = 1 - (1 - p_keep) ** (every * cycles)  # 0.806
    assert abs(float(ever) - expected) < 0.02, (float(ever), expected)
    assert opt.param_groups[0]["draw_step"] == every * cycles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_resumed_optimizer_continues_the_draws_after_a_reset(dtype: torch.dtype) -> None:
    # reset the optimizer state at step 3, save and load it there: the resumed run draws the
    # masks (and rounding bits) of the run that went on, not those of steps 1, 2, ...
    from mergekit_rl.train.elastic import reset_optimizer_state_
    from mergekit_rl.train.optim import OnlineMergingAdamW

    def run(resume: bool) -> Tensor:
        torch.manual_seed(0)
        model = nn.Linear(30, 20).to(dtype)
        tau = {n: torch.full(p.shape, 0.01) for n, p in model.named_parameters()}

        def make() -> OnlineMergingAdamW:
            named = model.named_parameters()
            return OnlineMergingAdamW(named, tau, lr=1e-3, reserve_p=0.2, alpha=1e-3)

        opt = make()
        gen = torch.Generator().manual_seed(3)
        for step in range(6):
            if step == 3:
                reset_optimizer_state_(opt)
                if resume:
                    state = opt.state_dict()
                    opt = make()
                    opt.load_state_dict(state)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run(True), run(False))
