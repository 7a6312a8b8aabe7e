"""xent_ext.patch() under a Hugging Face causal language model: the same training as torch's.

``transformers`` computes a causal-LM loss with ``ForCausalLMLoss``
(``transformers/loss/loss_utils.py``): it upcasts the logits to float32 and
calls ``nn.functional.cross_entropy`` (``reduction='mean'``, or ``'sum'``
divided by ``num_items_in_batch``, which the ``Trainer`` passes). Patched, that
call is xent_ext's. Models are built from small configs with the seeded
generator (no downloads); each test compares one model patched against a copy
of it unpatched: loss, every parameter's gradient, a few optimizer steps, and
a ``Trainer`` run, plain and under CPU autocast (bfloat16).

Skipped when ``transformers`` is not installed (the ``test`` extra installs
it, 4.46 or later: the release that brought ``ForCausalLMLoss``; written
against 5.x); the ``Trainer`` test also needs ``accelerate``.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import xent_ext

transformers = pytest.importorskip("transformers")

VOCAB = 500
BATCH, SEQ = 3, 20
TORCH_CROSS_ENTROPY = F.cross_entropy


def _config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def make_model(arch):
    """A tiny causal LM from the seeded generator, in training mode (no dropout)."""
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel
    return cls(_config(arch)).train()


def make_batch(ignored_rows=True):
    ids = torch.randint(VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    if ignored_rows:  # padding, as a collator marks it
        labels[0, :4] = -100
        labels[2, -5:] = -100
    return ids, labels


@pytest.fixture(autouse=True)
def torch_functions_restored():
    assert F.cross_entropy is TORCH_CROSS_ENTROPY
    yield
    leaked = F.cross_entropy is not TORCH_CROSS_ENTROPY
    xent_ext.unpatch()
    assert not leaked, "the test left torch.nn.functional.cross_entropy patched"


def autocast(enabled):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# Note [Comparing a model run with torch's]
# The two losses differ by rounding only (xent_ext's is the more exact), and
# the gradients carry that through the model. In float32 that stays at the
# rounding level, element by element. Under bfloat16 autocast a last-bit
# difference in the float32 gradient of the logits can flip a bfloat16 rounding
# inside the model: one bfloat16 ulp (~0.4%) in a few elements, which then
# spreads through the later matmuls and, over optimizer steps, through the
# parameters. There a whole tensor is compared, by the norm of the difference.
# The bounds below leave a margin of about ten over what is seen across seeds;
# the loss itself is float32 in both modes (HF upcasts the logits), so it is
# held to float32 rounding.
LOSS_RTOL = 2e-6
GRAD_REL = {False: 1e-5, True: 1e-2}  # max |error| / max |torch's| (fp32); norm ratio (autocast)
CURVE_LOSS_RTOL = {False: 2e-6, True: 2e-3}
CURVE_PARAM_REL = {False: 1e-4, True: 5e-2}


def assert_near(got, expected, rel, *, autocast_on, what):
    """got is within rel of expected, relative to the whole tensor (Note [Comparing a model run with torch's])."""
    err, ref = (got.detach() - expected.detach()).double(), expected.detach().double()
    if autocast_on:
        measure = err.norm() / ref.norm().clamp(min=1e-300)
    else:
        measure = err.abs().max() / ref.abs().max().clamp(min=1e-300)
    assert measure <= rel, f"{what}: error {measure.item():.3g} of torch's scale > {rel:g}"


def _forward_backward(model, ids, labels, autocast_on, **kwargs):
    model.zero_grad(set_to_none=True)
    with autocast(autocast_on):
        out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("autocast_on", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_loss_and_gradients(arch, num_items, autocast_on, xent_calls, fresh_seed):
    model = make_model(arch)
    twin = copy.deepcopy(model)
    ids, labels = make_batch()
    kwargs = {}
    if num_items:  # the Trainer's path: a 'sum' divided by the number of target tokens
        kwargs["num_items_in_batch"] = (labels[:, 1:] != -100).sum()

    expected, expected_grads = _forward_backward(model, ids, labels, autocast_on, **kwargs)
    assert xent_calls == []
    with xent_ext.patched():
        got, grads = _forward_backward(twin, ids, labels, autocast_on, **kwargs)
    assert xent_calls == ["sum" if num_items else "mean"], "the model's loss did not go through xent_ext"

    # Exactly xent_ext's loss of the model's logits (HF shifts the labels by one and pads with -100).
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    with autocast(autocast_on), torch.no_grad():
        own = xent_ext.cross_entropy(got.logits.float().reshape(-1, VOCAB), shifted,
                                     reduction="sum" if num_items else "mean")
    if num_items:
        own = own / kwargs["num_items_in_batch"]
    assert got.loss.dtype == expected.loss.dtype == torch.float32
    assert torch.equal(got.loss.detach(), own), f"{got.loss.item()} vs xent_ext's {own.item()} (seed={fresh_seed})"

    torch.testing.assert_close(got.loss, expected.loss, rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"loss (seed={fresh_seed}): {m}")
    assert grads.keys() == expected_grads.keys()
    for name, g in grads.items():
        assert_near(g, expected_grads[name], GRAD_REL[autocast_on], autocast_on=autocast_on,
                    what=f"gradient of {name} (seed={fresh_seed})")


@pytest.mark.parametrize("autocast_on", [False, True], ids=["fp32", "autocast_bf16"])
def test_training_curve(autocast_on, xent_calls, fresh_seed):
    steps = 5
    model = make_model("llama")
    twin = copy.deepcopy(model)
    ids, labels = make_batch()  # one batch, seen at every step: the loss must fall

    def train(m):
        # SGD: a parameter's difference stays proportional to the gradients'
        # (Adam's normalization would turn rounding in a near-zero gradient into a full step).
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5)
        losses = []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast(autocast_on):
                loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    expected = train(model)
    with xent_ext.patched():
        got = train(twin)
    assert len(xent_calls) == steps
    assert got[-1] < got[0], f"the model did not learn: {got.tolist()}"
    # The first loss comes before any step: float32 rounding apart, as in the test above.
    torch.testing.assert_close(got[0], expected[0], rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"first loss (seed={fresh_seed}): {m}")
    torch.testing.assert_close(got, expected, rtol=CURVE_LOSS_RTOL[autocast_on], atol=0,
                               msg=lambda m: f"losses (seed={fresh_seed}): {m}")
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        assert_near(p, q, CURVE_PARAM_REL[autocast_on], autocast_on=autocast_on,
                    what=f"parameter {name} after {steps} steps (seed={fresh_seed})")


def test_trainer_with_one_line(tmp_path, xent_calls, fresh_seed):
    # The line of xent_ext/_patch.py's docstring: `xent_ext.patch()` before building the Trainer.
    pytest.importorskip("accelerate")
    steps, accumulation = 3, 2
    model = make_model("llama")
    twin = copy.deepcopy(model)
    data = []
    for i in range(steps * accumulation * 2):
        ids, labels = make_batch()
        data.append({"input_ids": ids[0], "labels": labels[i % BATCH]})

    def train(m, out_dir):
        args = transformers.TrainingArguments(
            output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation, learning_rate=1e-2, use_cpu=True, seed=fresh_seed % 2**31,
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])

    expected = train(model, tmp_path / "torch")
    assert xent_calls == []
    xent_ext.patch()
    try:
        got = train(twin, tmp_path / "xent_ext")
    finally:
        xent_ext.unpatch()
    # The Trainer passes num_items_in_batch: each micro-batch's loss is a 'sum'.
    assert xent_calls == ["sum"] * (steps * accumulation)
    assert len(got) == steps
    # The first logged loss comes before any step; after it, AdamW's normalization
    # lets rounding in near-zero gradients move the runs apart a little faster than SGD.
    torch.testing.assert_close(got[0], expected[0], rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"first loss (seed={fresh_seed}): {m}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0, msg=lambda m: f"losses (seed={fresh_seed}): {m}")
