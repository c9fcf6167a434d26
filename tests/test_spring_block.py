"""SpringBlock against a plain PyTorch block built from the sliced weights."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from bsnas.nn import SpringBlock, recalibrate_bn
from bsnas.ops import channel_stats

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _randomise(block):
    """Non-trivial BN state, so folding and slicing mistakes show."""
    with torch.no_grad():
        for bn in (block.expand_bn, block.depthwise_bn, block.project_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)


def _reference(block, x, c, training, stats):
    """The block computed with F.conv2d/F.batch_norm on sliced weights; `stats` holds
    clones of the full running buffers, updated like the block's prefix."""
    act = F.relu6
    k, s = block.kernel_size, block.stride

    def bn(name, h, n):
        m = getattr(block, name)
        mean, var = stats[name]
        return F.batch_norm(h, mean[:n], var[:n], m.weight[:n], m.bias[:n], training,
                            m.momentum, m.eps)

    h = act(bn("expand_bn", F.conv2d(x, block.expand.weight[:c]), c))
    h = act(bn("depthwise_bn", F.conv2d(h, block.depthwise.weight[:c], None, s, k // 2, 1, c), c))
    h = bn("project_bn", F.conv2d(h, block.project.weight[:, :c]), block.out_channels)
    return h + x if block.residual else h


def _stats(block):
    return {n: (getattr(block, n).running_mean.clone(), getattr(block, n).running_var.clone())
            for n in ("expand_bn", "depthwise_bn", "project_bn")}


def _case(rng):
    cin = rng.choice([3, 8, 16])
    cout = rng.choice([cin, 8, 12])
    stride = rng.choice([1, 2])
    max_w = rng.randint(4, 40)
    return dict(in_channels=cin, out_channels=cout, max_width=max_w,
                kernel_size=rng.choice([3, 5, 7]), stride=stride), rng.randint(1, max_w)


# NCHW trains in channels_last inside on CPU (SpringBlock.CPU_TRAIN_CHANNELS_LAST);
# "nchw-direct" turns that off so the NCHW kernels are checked through the block too.
@pytest.mark.parametrize("fmt,cl_inside", [(torch.contiguous_format, True),
                                           (torch.contiguous_format, False),
                                           (torch.channels_last, True)],
                         ids=["nchw", "nchw-direct", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_sliced_reference(dtype, training, fmt, cl_inside):
    rng = random.Random(11)
    torch.manual_seed(26)
    for _ in range(6):
        args, width = _case(rng)
        block = SpringBlock(**args).to(dtype)
        block.CPU_TRAIN_CHANNELS_LAST = cl_inside
        _randomise(block)
        block.width = width
        block.train(training)
        # The reference runs in float64 on a copy of the block: a float32 plain-PyTorch
        # reference is itself off by up to 2e-2 on ill-conditioned draws (seen with
        # torch.manual_seed(26): near-constant channels after relu6 and train-mode BN).
        ref_block = copy.deepcopy(block).double()
        x = torch.randn(3, args["in_channels"], 10, 9, dtype=dtype).to(memory_format=fmt)
        x.requires_grad_()
        x_ref = x.detach().double().requires_grad_()
        stats = _stats(ref_block)
        y = block(x)
        assert y.is_contiguous(memory_format=fmt)  # the caller's layout comes back
        ref = _reference(ref_block, x_ref, width, training, stats)
        g = torch.randn_like(ref)

        def params(b):
            return [b.expand.weight, b.depthwise.weight, b.project.weight,
                    b.expand_bn.weight, b.depthwise_bn.bias, b.project_bn.weight]

        got = torch.autograd.grad(y, [x, *params(block)], g.to(dtype))
        want = torch.autograd.grad(ref, [x_ref, *params(ref_block)], g, allow_unused=True)
        want = [torch.zeros_like(b) if b is None else b for a, b in zip(got, want)]
        if dtype == torch.float64:
            for a, b in zip([y, *got], [ref, *want]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        else:
            # float32 against float64: within 1e-5 relative, normwise over the output
            # and over all the gradients together. Single gradients can cancel (at
            # width 1 the project BN is scale invariant, so the project weight's exact
            # gradient is ~0): each one separately within 1e-3 of its own norm.
            def rel(a, b):
                return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()

            assert rel(y, ref) < 1e-5
            flat = lambda ts: torch.cat([t.double().flatten() for t in ts])  # noqa: E731
            assert rel(flat(got), flat(want)) < 1e-5
            for a, b in zip(got, want):
                assert rel(a, b) < 1e-3
        if training:  # running statistics of the active prefix moved the same way
            for name, (mean, var) in stats.items():
                m = getattr(block, name)
                torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_inactive_channels_untouched_by_training_step():
    block = SpringBlock(8, 8, 32, 3, 1).double()
    block.width = 12
    before = _stats(block)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    block(x).square().sum().backward()
    for name in ("expand_bn", "depthwise_bn"):
        m = getattr(block, name)
        assert torch.equal(m.running_mean[12:], before[name][0][12:])
        assert not torch.equal(m.running_mean[:12], before[name][0][:12])
    assert not block.expand.weight.grad[12:].any()
    assert not block.depthwise.weight.grad[12:].any()
    assert not block.project.weight.grad[:, 12:].any()


@pytest.mark.parametrize("width", [1, 7, 24])
def test_to_static_agrees(width):
    block = SpringBlock(8, 16, 24, 5, 2).double()
    _randomise(block)
    block.width = width
    x = torch.randn(2, 8, 11, 11, dtype=torch.float64)
    for mode in (False, True):
        block.train(mode)
        static = block.to_static()
        assert all(type(m).__module__.startswith("torch.nn") for m in static.children())
        torch.testing.assert_close(static(x), block(x), rtol=1e-10, atol=1e-10)


def test_folded_cache_invalidated_when_weights_change():
    block = SpringBlock(4, 4, 16, 3, 1).double().eval()
    _randomise(block)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    block.width = 8
    y1 = block(x)
    assert block.folded_weights() is block.folded_weights()  # cached
    with torch.no_grad():
        block.depthwise.weight.mul_(2)
    y2 = block(x)
    static = block.to_static()
    torch.testing.assert_close(y2, static(x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y1, y2)
    block.width = 16
    torch.testing.assert_close(block(x), block.to_static()(x), rtol=1e-10, atol=1e-10)


def test_folded_cache_sees_running_statistics_updated_in_eval():
    # A running-statistics update through the fused op (not a tensor method) while the
    # block stays in eval: the fold key must see it through the buffers' versions.
    block = SpringBlock(4, 4, 16, 3, 1).double().eval()
    _randomise(block)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    block.width = 8
    with torch.no_grad():  # the folded path (with gradients wanted, eval runs eagerly)
        block(x)  # caches the folded weights
        z = torch.randn(3, 8, 4, 4, dtype=torch.float64) * 2 + 1
        block.expand_bn.update_running_stats(*channel_stats(z), z.numel() // 8)
        torch.testing.assert_close(block(x), block.to_static()(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("how", ["pruned", "parametrized"])
def test_weights_held_outside_the_parameter_dict(how):
    # torch.nn.utils.prune / parametrize move `weight` out of `_parameters`: the block
    # still computes with the weight the module shows, in training and eval.
    from torch.nn.utils import parametrize, prune

    torch.manual_seed(11)
    block = SpringBlock(4, 4, 16, 3, 1).double()
    _randomise(block)
    plain = copy.deepcopy(block)
    if how == "pruned":
        prune.l1_unstructured(block.project, "weight", amount=0.4)
        prune.l1_unstructured(block.expand_bn, "weight", amount=0.25)
    else:
        class Doubled(torch.nn.Module):
            def forward(self, w):
                return 2 * w
        parametrize.register_parametrization(block.expand, "weight", Doubled())
        parametrize.register_parametrization(block.depthwise_bn, "bias", Doubled())
    with torch.no_grad():
        for name in ("expand", "depthwise", "project", "expand_bn", "depthwise_bn"):
            for p in ("weight", "bias"):
                if getattr(getattr(plain, name), p, None) is not None:
                    getattr(getattr(plain, name), p).copy_(getattr(getattr(block, name), p))
    block.width = plain.width = 8
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        block.train(training), plain.train(training)
        with torch.no_grad():
            torch.testing.assert_close(block(x), plain(x), rtol=1e-10, atol=1e-10)
        if training:
            torch.testing.assert_close(block.expand_bn.running_mean,
                                       plain.expand_bn.running_mean, rtol=1e-12, atol=1e-12)


def test_pruned_weights_follow_training():
    # The fused and folded paths do not call the submodules, so pruning's forward
    # pre-hook (weight = weight_orig * weight_mask) is run by the block: after optimizer
    # steps the block computes with the current weight_orig, and training keeps working
    # (a stale `weight` from the first step's graph failed the second backward).
    from torch.nn.utils import prune

    torch.manual_seed(13)
    block = SpringBlock(4, 4, 16, 3, 1).double()
    _randomise(block)
    prune.l1_unstructured(block.expand, "weight", amount=0.4)
    prune.l1_unstructured(block.depthwise_bn, "weight", amount=0.25)
    block.width = 9
    start = block.expand.weight_orig.detach().clone()
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        block(x).square().sum().backward()
        opt.step()
    assert not torch.equal(block.expand.weight_orig, start)
    state = block.state_dict()
    for name in ("expand", "depthwise_bn"):
        state[f"{name}.weight"] = (state.pop(f"{name}.weight_orig") *
                                   state.pop(f"{name}.weight_mask"))
    ref = SpringBlock(4, 4, 16, 3, 1).double()
    ref.load_state_dict(state)
    ref.width = 9
    for training in (True, False):
        block.train(training), ref.train(training)
        with torch.no_grad():
            torch.testing.assert_close(block(x), ref(x), rtol=1e-10, atol=1e-10)


def test_sync_batchnorm_conversion_is_refused():
    block = SpringBlock(4, 4, 16, 3, 1)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(block)
    with pytest.raises(TypeError, match="expand_bn is a SyncBatchNorm.*convert_sync_batchnorm"):
        converted(torch.randn(2, 4, 5, 5))


def test_inference_tensor_parameters():
    # A block made under inference_mode holds inference tensors, which have no version
    # counter: eval computes the folded weights afresh each call (an in-place change made
    # in inference mode shows at once) instead of failing on the cache key.
    torch.manual_seed(14)
    with torch.inference_mode():
        block = SpringBlock(4, 4, 16, 3, 1).double().eval()
        _randomise(block)
    block.width = 7
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    want = _reference(block, x, 7, False, _stats(block))
    with torch.inference_mode():
        torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-10)
        block.depthwise.weight.mul_(2)
        want = _reference(block, x, 7, False, _stats(block))
        torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # outside inference mode too
        torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-10)


def test_batchnorm_data_parallel_replica():
    # nn.DataParallel's replicas hold their parameters outside `_parameters`.
    from bsnas.nn import DynamicBatchNorm2d

    torch.manual_seed(12)
    bn = DynamicBatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    replica = bn._replicate_for_data_parallel()
    replica.weight, replica.bias = bn.weight * 1, bn.bias * 1
    x = torch.randn(3, 5, 4, 4)
    want = F.batch_norm(x, torch.zeros(5), torch.ones(5), bn.weight[:5], bn.bias[:5], True)
    torch.testing.assert_close(replica(x), want, rtol=1e-5, atol=1e-5)


def test_folded_cache_survives_eval_and_is_freed_by_train():
    block = SpringBlock(4, 4, 16, 3, 1).double().eval()
    _randomise(block)
    folded = block.folded_weights()
    block.eval()
    assert block.folded_weights() is folded  # eval() again keeps the folded weights
    block.train()
    assert not block._folded_cache  # training frees them
    block.eval()
    assert block.folded_weights() is not folded


def test_folded_weights_carry_no_autograd_history():
    # Built under grad mode from parameters that want gradients: the copies are plain
    # tensors, so eval calls never grow or keep an autograd graph.
    block = SpringBlock(4, 4, 16, 3, 1).double().eval()
    _randomise(block)
    block.width = 8
    with torch.enable_grad():
        folded = block.folded_weights()
        assert block.folded_weights() is folded  # a cache hit returns the same copies
    assert all(not t.requires_grad and t.grad_fn is None for t in folded.values())


@pytest.mark.parametrize("training", [True, False])
def test_reorder_channels_keeps_full_width_function(training):
    block = SpringBlock(6, 6, 30, 3, 1).double()
    _randomise(block)
    block.train(training)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    opt = torch.optim.SGD(block.parameters(), lr=0.1, momentum=0.9)
    block(x).square().sum().backward()
    opt.step()
    momentum = opt.state[block.project.weight]["momentum_buffer"].clone()
    with torch.no_grad():
        before = block(x)
    imp_before = block.channel_importance()
    perm = block.reorder_channels(opt)
    with torch.no_grad():
        after = block(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    imp = block.channel_importance()
    assert torch.all(imp[:-1] >= imp[1:])
    torch.testing.assert_close(imp, imp_before[perm])
    torch.testing.assert_close(opt.state[block.project.weight]["momentum_buffer"],
                               momentum[:, perm])


def test_recalibrate_bn_matches_hand_computed_statistics():
    torch.manual_seed(3)
    block = SpringBlock(4, 8, 20, 3, 2).double()
    _randomise(block)
    block.width = 9
    batches = [torch.randn(5, 4, 8, 8, dtype=torch.float64) for _ in range(3)]
    block.eval()
    used = recalibrate_bn(block, batches)
    assert used == 3 and not block.training
    # By hand: the expand BN's statistics are the average over batches of the batch
    # mean and unbiased variance of the expand output.
    with torch.no_grad():
        z = [F.conv2d(b, block.expand.weight[:9]) for b in batches]
        mean = torch.stack([t.mean(dim=(0, 2, 3)) for t in z]).mean(0)
        var = torch.stack([t.transpose(0, 1).reshape(9, -1).var(dim=1) for t in z]).mean(0)
    torch.testing.assert_close(block.expand_bn.running_mean[:9], mean)
    torch.testing.assert_close(block.expand_bn.running_var[:9], var)
    assert block.expand_bn.momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(block, [])


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=0, out_channels=4, max_width=8, kernel_size=3, stride=1), "in_channels"),
    (dict(in_channels=4, out_channels=4, max_width=8, kernel_size=4, stride=1), "odd"),
    (dict(in_channels=4, out_channels=4, max_width=8, kernel_size=3, stride=3), "stride"),
    (dict(in_channels=4, out_channels=4, max_width=8, kernel_size=3, stride=1,
          activation="gelu"), "activation"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpringBlock(**kwargs)


def test_bad_width_and_input():
    block = SpringBlock(4, 4, 8, 3, 1)
    for bad in (0, 9, -1, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            block.width = bad
    with pytest.raises(ValueError, match=r"expects \[N, 4, H, W\]"):
        block(torch.randn(1, 5, 6, 6))


def test_compiled_training_step_matches_eager():
    """torch.compile (aot_eager, fullgraph) of a fused training step: the C++ autograd of
    the ops and the in-place running-statistics op trace; output, gradients and BN
    buffers equal eager. With allow_unspec_int_on_nn_module the width (a module int)
    becomes symbolic after the first recompile: three widths, two graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(7)
    eager = SpringBlock(8, 8, 32, 3, 1).double().train()
    compiled = copy.deepcopy(eager)

    def step(block, x):
        return block(x).square().sum()

    fn = torch.compile(step, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        for width in (16, 24, 32):
            eager.width = compiled.width = width
            x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
            eager.zero_grad(), compiled.zero_grad()
            a, b = step(eager, x), fn(compiled, x)
            a.backward(), b.backward()
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
            for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=n)
            for (n, p), (_, q) in zip(eager.named_buffers(), compiled.named_buffers()):
                torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=n)
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} graphs for 3 widths"
