"""Baselines (issue 5): AdaBN, AdaptSegNet, Seg-JDOT and the oracle on tiny synthetic data and networks."""

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from torch import nn

from aiva_monai.batchnorm import adapt_batchnorm, batchnorm_layers
from aiva_monai.engines import AdaptSegNetTrainer, OracleTrainer, OutputDiscriminator, SegJDOTTrainer
from aiva_monai.jdot import jdot_plan, segjdot_loss
from aiva_monai.methods import METHODS, reads_target_labels
from aiva_monai.networks import PreActResUNet
from tests.helpers import GuardedLoader, synthetic_site

BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "aiva_brain" / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tensors here are tiny: with several threads on a shared 2-core machine, thread hand-offs cost
    # 100x the arithmetic (3 iterations: 10 s instead of 0.1 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loader(data, seed, batch_size=4):
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def sites(n=12):
    source = synthetic_site(n, size=16, seed=0)
    target = synthetic_site(n, size=16, contrast=1.8, seed=1)  # a brighter "scanner"
    return source, target


def target_variants(target):
    """The same target images with labels (guarded), without the label key, and with garbage labels."""
    without = [{k: v for k, v in s.items() if k != "label"} for s in target]
    garbage = [{**s, "label": torch.rand_like(s["label"]) * 7} for s in target]
    return [(target, True), (without, False), (garbage, False)]


# ----------------------------------------------------------------------------------------------------
# AdaBN


class ToyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def test_adabn_reestimates_only_batchnorm_buffers_as_a_cumulative_average():
    torch.manual_seed(0)
    net = ToyBN()
    with torch.no_grad():  # give the BN a source history: the old statistics must be discarded, not blended
        for _ in range(5):
            net(torch.randn(4, 1, 8, 8) * 0.3)
    net.eval()
    net.drop.train()  # a mixed mode, to check each module's mode is restored, not the root's
    params_before = snapshot(net)
    old_mean = net.bn.running_mean.clone()

    batches = [{"image": torch.randn(4, 1, 8, 8) * (1 + i) + 2 * i, "label": torch.zeros(4, 1, 8, 8)} for i in range(3)]
    adapt_batchnorm(net, GuardedLoader(batches))

    with torch.no_grad():  # by hand: per-batch channel statistics of the BN input, averaged over the batches
        inputs = [net.conv(b["image"]) for b in batches]
    batch_means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs])
    batch_vars = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs])
    everything = torch.cat(inputs)
    torch.testing.assert_close(net.bn.running_mean, batch_means.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(net.bn.running_mean, everything.mean(dim=(0, 2, 3)), rtol=0, atol=1e-5)  # equal batches
    torch.testing.assert_close(net.bn.running_var, batch_vars.mean(0), rtol=0, atol=1e-5)
    assert not torch.allclose(net.bn.running_mean, old_mean, atol=1e-2)
    assert int(net.bn.num_batches_tracked) == 3

    assert same(params_before, snapshot(net))  # weights and biases bit-identical
    assert all(p.grad is None for p in net.parameters())
    assert net.bn.momentum == 0.1
    assert [m.training for m in (net, net.conv, net.bn, net.drop, net.head)] == [False, False, False, True, False]


def test_adabn_on_the_bundle_network_changes_every_batchnorm_and_no_parameter():
    network_def = json.loads((BUNDLE_CONFIGS / "train.json").read_text())["network_def"]
    assert network_def["_target_"] == "aiva_monai.networks.PreActResUNet"
    assert network_def.get("norm", "batch") == "batch"  # AdaBN is meaningful for the shipped network
    torch.manual_seed(0)
    net = PreActResUNet(
        channels=(4, 8, 16), blocks_per_level=1, **{k: v for k, v in network_def.items() if k in ("norm",)}
    )
    layers = batchnorm_layers(net)
    assert layers and all(isinstance(m, nn.BatchNorm2d) for _, m in layers)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in net.modules())
    net.train()
    params_before = snapshot(net)
    buffers_before = {name: m.running_mean.clone() for name, m in layers}
    _, target = sites(8)
    adapt_batchnorm(net, loader(target, seed=3), device="cpu")
    assert same(params_before, snapshot(net))
    assert net.training and all(m.training for m in net.modules())
    for name, m in layers:
        assert not torch.equal(m.running_mean, buffers_before[name]), name
        assert int(m.num_batches_tracked) == 2 and m.momentum == 0.1


def test_adabn_refuses_networks_without_running_batchnorm_statistics_and_keeps_state_on_failure():
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(PreActResUNet(channels=(4, 8), blocks_per_level=1, norm="instance"), [torch.zeros(2, 1, 8, 8)])
    untracked = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="do not track"):
        adapt_batchnorm(untracked, [torch.zeros(2, 1, 8, 8)])

    net = ToyBN()
    with torch.no_grad():
        net(torch.randn(4, 1, 8, 8) + 3)
    stats = (net.bn.running_mean.clone(), net.bn.running_var.clone(), net.bn.num_batches_tracked.clone())
    with pytest.raises(ValueError, match="no batch"):
        adapt_batchnorm(net, [])
    assert all(
        torch.equal(a, b) for a, b in zip(stats, (net.bn.running_mean, net.bn.running_var, net.bn.num_batches_tracked))
    )
    assert net.bn.momentum == 0.1 and net.training


# ----------------------------------------------------------------------------------------------------
# AdaptSegNet


def test_output_discriminator_is_the_papers_architecture():
    disc = OutputDiscriminator(2)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    relus = [m for m in disc.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)
    assert isinstance(disc.model[-1], nn.Conv2d)  # logits: no activation after the last layer
    assert disc(torch.rand(2, 2, 64, 64)).shape == (2, 1, 2, 2)
    assert OutputDiscriminator(3, channels=(4, 8))(torch.rand(1, 3, 16, 16)).shape == (1, 1, 2, 2)


def make_adaptsegnet(source, target, seed=0, lambda_adv=0.001, **kwargs):
    torch.manual_seed(seed)
    net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    disc = OutputDiscriminator(2, channels=(4, 8))
    return AdaptSegNetTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=3,
        train_data_loader=loader(source, seed),
        target_data_loader=loader(target, seed + 1),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        discriminator=disc,
        lambda_adv=lambda_adv,
        decollate=False,
        **kwargs,
    )


def test_adaptsegnet_updates_each_network_only_through_its_own_optimiser():
    source, target = sites()
    trainer = make_adaptsegnet(source, target, lambda_adv=0.5)  # a large weight: a leak would show
    net, disc = trainer.network, trainer.discriminator
    d_opt = trainer.discriminator_optimizer
    assert isinstance(d_opt, torch.optim.Adam)
    assert d_opt.defaults["lr"] == 1e-4 and d_opt.defaults["betas"] == (0.9, 0.99)
    g_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    d_ids = {id(p) for g in d_opt.param_groups for p in g["params"]}
    assert g_ids == {id(p) for p in net.parameters()} and d_ids == {id(p) for p in disc.parameters()}
    assert not g_ids & d_ids

    log = []  # (event, segmenter snapshot, discriminator snapshot)

    def record(event):
        return lambda engine: log.append((event, snapshot(net), snapshot(disc)))

    def wrap(optimizer, name):
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            log.append((f"{name}-before", snapshot(net), snapshot(disc)))
            result = step(*args, **kwargs)
            log.append((f"{name}-after", snapshot(net), snapshot(disc)))
            return result

        optimizer.step = recorded_step

    wrap(trainer.optimizer, "g")
    wrap(d_opt, "d")
    trainer.add_event_handler(Events.ITERATION_STARTED, record("start"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, record("end"))

    d_grads_after_segmenter_backward = []
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: d_grads_after_segmenter_backward.append([p.grad for p in disc.parameters()]),
    )
    d_inputs = []  # what D saw in each call, to recompute its loss by hand
    disc.register_forward_hook(lambda m, inputs, out: d_inputs.append(inputs[0].detach().clone()))
    d_grad_checks = []

    def check_d_grads(engine):  # just before D's step: its gradient is that of its own loss only
        source_prob, target_prob = d_inputs[-2], d_inputs[-1]
        fresh = copy.deepcopy(disc)
        fresh.zero_grad(set_to_none=True)
        out_s, out_t = fresh(source_prob), fresh(target_prob)
        loss = 0.5 * (
            F.binary_cross_entropy_with_logits(out_s, torch.zeros_like(out_s))
            + F.binary_cross_entropy_with_logits(out_t, torch.ones_like(out_t))
        )
        loss.backward()
        d_grad_checks.append(
            all(torch.allclose(a.grad, b.grad, atol=1e-7) for a, b in zip(fresh.parameters(), disc.parameters()))
        )

    original_d_step = d_opt.step

    def d_step_with_check(*args, **kwargs):
        check_d_grads(trainer)
        return original_d_step(*args, **kwargs)

    d_opt.step = d_step_with_check
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: outputs.append(
            {
                k: float(torch.as_tensor(e.state.output[k]).detach())
                for k in ("loss", "seg_loss", "adv_loss", "disc_loss")
            }
        ),
    )
    trainer.run()

    assert [event for event, _, _ in log] == ["start", "g-before", "g-after", "d-before", "d-after", "end"] * 3
    for i in range(0, len(log), 6):
        (_, g0, d0), (_, g1, d1), (_, g2, d2), (_, g3, d3), (_, g4, d4), (_, g5, d5) = log[i : i + 6]
        assert same(g0, g1) and same(d0, d1)  # nothing moves before the segmenter's step
        assert not same(g1, g2) and same(d1, d2)  # the segmenter's step moves the segmenter only
        assert same(g2, g3) and same(g3, g4) and not same(d3, d4)  # the discriminator's step moves D only
        assert same(g4, g5) and same(d4, d5)  # nothing moves after
    # the segmenter's backward left no gradient on D (it was frozen), and D's gradients came from its loss only
    assert all(g is None for grads in d_grads_after_segmenter_backward for g in grads)
    assert d_grad_checks == [True] * 3
    assert all(p.requires_grad for p in disc.parameters())
    for o in outputs:
        assert all(np.isfinite(v) for v in o.values())
        assert o["loss"] == pytest.approx(o["seg_loss"] + 0.5 * o["adv_loss"], rel=1e-5)
        assert 0 < o["disc_loss"] < 2


def test_adaptsegnet_rejects_shared_optimisers_and_checkpoints_its_discriminator(tmp_path):
    source, target = sites(8)
    net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    disc = OutputDiscriminator(2, channels=(4, 8))
    both = torch.optim.SGD(list(net.parameters()) + list(disc.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="segmenter's optimizer holds discriminator"):
        AdaptSegNetTrainer("cpu", 1, loader(source, 0), loader(target, 1), net, both, discriminator=disc)
    with pytest.raises(ValueError, match="not the discriminator's"):
        AdaptSegNetTrainer(
            "cpu",
            1,
            loader(source, 0),
            loader(target, 1),
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            discriminator=disc,
            discriminator_optimizer=torch.optim.Adam(net.parameters()),
        )

    def build(seed):
        torch.manual_seed(seed)
        d = OutputDiscriminator(2, channels=(4, 8))
        d_opt = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.PolynomialLR(d_opt, total_iters=10, power=0.9)
        n = PreActResUNet(channels=(4, 8), blocks_per_level=1)
        return AdaptSegNetTrainer(
            "cpu",
            1,
            loader(source, 0),
            loader(target, 1),
            n,
            torch.optim.SGD(n.parameters(), lr=0.01),
            discriminator=d,
            discriminator_optimizer=d_opt,
            discriminator_lr_scheduler=sched,
            epoch_length=2,
            decollate=False,
        )

    trainer = build(0)
    trainer.run()
    objects = trainer.checkpoint_dict()
    assert set(objects) == {"discriminator", "discriminator_optimizer", "discriminator_lr_scheduler"}
    # its own schedule: stepped once per iteration, independently of the segmenter's optimiser
    assert objects["discriminator_lr_scheduler"].last_epoch == 2
    assert trainer.discriminator_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - 2 / 10) ** 0.9)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01
    assert len(trainer.discriminator_optimizer.state) == len(list(trainer.discriminator.parameters()))
    torch.save({k: v.state_dict() for k, v in objects.items()}, tmp_path / "ckpt.pt")

    restored = build(1)
    saved = torch.load(tmp_path / "ckpt.pt")
    for k, v in restored.checkpoint_dict().items():
        v.load_state_dict(saved[k])
    assert same(snapshot(trainer.discriminator), snapshot(restored.discriminator))
    assert restored.discriminator_lr_scheduler.last_epoch == 2
    a, b = trainer.discriminator_optimizer.state_dict(), restored.discriminator_optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, state in a["state"].items():
        assert torch.equal(state["exp_avg"], b["state"][key]["exp_avg"])


# ----------------------------------------------------------------------------------------------------
# Seg-JDOT


def random_batch(n_s, n_t, seed, classes=2, size=4):
    g = torch.Generator().manual_seed(seed)
    fs, ft = torch.randn(n_s, 3, 2, 2, generator=g), torch.randn(n_t, 3, 2, 2, generator=g)
    ys = F.one_hot(torch.randint(0, classes, (n_s, size, size), generator=g), classes).permute(0, 3, 1, 2).float()
    pt = torch.softmax(torch.randn(n_t, classes, size, size, generator=g) * 2, dim=1)
    return fs, ft, ys, pt


def test_jdot_plan_is_the_exact_optimum_with_uniform_marginals():
    alpha, beta = 0.3, 0.05
    for seed in range(5):
        fs, ft, ys, pt = random_batch(3, 3, seed)
        plan, cost = jdot_plan(fs, ft, ys, pt, alpha, beta)
        expected = torch.tensor(
            [
                [alpha * ((fs[i] - ft[j]) ** 2).sum() + beta * ((ys[i] - pt[j]) ** 2).sum() for j in range(3)]
                for i in range(3)
            ]
        )
        torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plan.sum(1), torch.full((3,), 1 / 3))
        torch.testing.assert_close(plan.sum(0), torch.full((3,), 1 / 3))
        # uniform n x n marginals: an optimum lies at a permutation (Birkhoff); random costs make it unique
        best = min(itertools.permutations(range(3)), key=lambda perm: sum(expected[i, perm[i]] for i in range(3)))
        brute = torch.zeros(3, 3)
        brute[range(3), best] = 1 / 3
        torch.testing.assert_close(plan, brute)
        assert not plan.requires_grad

    fs, ft, ys, pt = random_batch(5, 3, seed=7)  # unequal batches: rows 1/5, columns 1/3
    plan, cost = jdot_plan(fs, ft, ys, pt, alpha, beta)
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 1 / 5))
    torch.testing.assert_close(plan.sum(0), torch.full((3,), 1 / 3))
    assert (plan >= 0).all()
    independent = torch.full((5, 3), 1 / 15)
    assert (plan * cost).sum() <= (independent * cost).sum()

    plan, cost = jdot_plan(fs, ft, ys, pt, alpha, beta, label_cost="cross_entropy")
    ce = torch.tensor([[-(ys[i] * pt[j].log()).sum() for j in range(3)] for i in range(5)])
    feature = torch.tensor([[((fs[i] - ft[j]) ** 2).sum() for j in range(3)] for i in range(5)])
    torch.testing.assert_close(cost, alpha * feature + beta * ce, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction's resolution"):
        jdot_plan(fs, ft, ys[:, :, :2], pt, alpha, beta)


def test_segjdot_loss_differentiates_the_cost_with_the_plan_held_constant():
    alpha, beta = 0.2, 0.1
    fs, ft, ys, pt_logits = random_batch(4, 3, seed=11)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    plan, cost = jdot_plan(fs, ft, ys, torch.softmax(pt_logits, 1), alpha, beta)
    loss = segjdot_loss(fs, ft, ys, torch.softmax(pt_logits, 1), alpha, beta)
    torch.testing.assert_close(loss, (plan * cost).sum())
    loss.backward()
    # d/d f_t[j] of sum_ij plan_ij * alpha * ||f_s[i] - f_t[j]||^2 = 2 alpha sum_i plan_ij (f_t[j] - f_s[i])
    p = plan.detach()
    expected_t = (
        2 * alpha * (p.sum(0)[:, None, None, None] * ft.detach() - torch.einsum("ij,i...->j...", p, fs.detach()))
    )
    expected_s = (
        2 * alpha * (p.sum(1)[:, None, None, None] * fs.detach() - torch.einsum("ij,j...->i...", p, ft.detach()))
    )
    torch.testing.assert_close(ft.grad, expected_t, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fs.grad, expected_s, rtol=1e-4, atol=1e-6)


def make_segjdot(source, target, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    return SegJDOTTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=3,
        train_data_loader=loader(source, seed),
        target_data_loader=loader(target, seed + 1),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        decollate=False,
        **kwargs,
    )


def test_segjdot_trainer_adds_the_transport_loss_to_the_segmentation_loss():
    source, target = sites()
    trainer = make_segjdot(source, target, alpha=0.01, beta=0.01)
    feature_shapes = []
    trainer.add_event_handler(
        IterationEvents.FORWARD_COMPLETED, lambda e: feature_shapes.append(e.bottleneck_tap.features.shape)
    )
    before = snapshot(trainer.network)
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: outputs.append(
            {k: float(torch.as_tensor(e.state.output[k]).detach()) for k in ("loss", "seg_loss", "jdot_loss")}
        ),
    )
    trainer.run()
    assert feature_shapes == [torch.Size([4, 8, 8, 8])] * 3  # the bottleneck: 8 channels at 16 / 2
    assert trainer.bottleneck_tap.features is None  # no graph kept between iterations
    assert len(outputs) == 3
    for o in outputs:
        assert o["jdot_loss"] > 0
        assert o["loss"] == pytest.approx(o["seg_loss"] + o["jdot_loss"], rel=1e-5)
    assert not same(before, snapshot(trainer.network))

    # with alpha = beta = 0 the transport term adds nothing: the weights follow plain supervised training
    # on the source batches exactly (the target pass only changes BatchNorm running statistics)
    zero = make_segjdot(source, target, alpha=0.0, beta=0.0)
    zero.run()
    torch.manual_seed(0)
    net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    plain = OracleTrainer(  # a plain SupervisedTrainer with the same loss, here on the source batches
        "cpu",
        1,
        loader(source, 0),
        net,
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        epoch_length=3,
        decollate=False,
    )
    plain.run()
    assert float(zero.state.output["jdot_loss"]) == 0.0
    assert same(snapshot(zero.network), snapshot(net))


# ----------------------------------------------------------------------------------------------------
# No target label is read (except by the oracle)


def run_method(method, source, target, guard):
    if method == "adabn":
        torch.manual_seed(0)
        net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
        target_loader = loader(target, 1)
        adapt_batchnorm(net, GuardedLoader(target_loader) if guard else target_loader)
        return net.state_dict(), []
    trainer = (make_adaptsegnet if method == "adaptsegnet" else make_segjdot)(source, target)
    if guard:
        trainer.target_data_loader = GuardedLoader(trainer.target_data_loader)
    outputs = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.append(float(torch.as_tensor(e.state.output["loss"]).detach()))
    )
    trainer.run()
    state = dict(trainer.network.state_dict())
    if method == "adaptsegnet":
        state.update({f"D.{k}": v for k, v in trainer.discriminator.state_dict().items()})
    return state, outputs


@pytest.mark.parametrize("method", ["adabn", "adaptsegnet", "segjdot"])
def test_unsupervised_methods_never_read_target_labels(method):
    assert not reads_target_labels(method)
    source, target = sites(8)
    reference, reference_outputs = run_method(method, source, target, guard=False)
    for variant, guard in target_variants(target):
        state, outputs = run_method(method, source, variant, guard)
        assert outputs == reference_outputs
        assert state.keys() == reference.keys()
        for name, value in state.items():
            assert torch.equal(value, reference[name]), name


def test_oracle_is_the_only_reader_of_target_labels():
    assert [name for name in METHODS if reads_target_labels(name)] == ["oracle"]
    assert set(METHODS) == {"source", "adabn", "adaptsegnet", "segjdot", "aiva", "aiva_v1", "aiva+adabn", "oracle"}
    with pytest.raises(ValueError, match="unknown method"):
        reads_target_labels("dann")
    _, target = sites(8)
    torch.manual_seed(0)
    net = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    oracle = OracleTrainer(
        "cpu", 1, loader(target, 0), net, torch.optim.SGD(net.parameters(), lr=0.05), epoch_length=2, decollate=False
    )
    assert OracleTrainer.reads_target_labels and oracle.state.reads_target_labels
    before = snapshot(net)
    oracle.run()
    assert not same(before, snapshot(net))  # it trains on the target slices and their labels
    # the guard used above does catch a reader: the oracle trips it
    oracle = OracleTrainer(
        "cpu",
        1,
        GuardedLoader(loader(target, 0)),
        net,
        torch.optim.SGD(net.parameters(), lr=0.05),
        epoch_length=2,
        decollate=False,
    )
    with pytest.raises(AssertionError, match="target label was read"):
        oracle.run()
