"""bsnas.ops.mbconv_folded (the folded spring block in inference) against F.conv2d, and
SpringBlock's eval path that runs on it."""
import random

import pytest
import torch
import torch.nn.functional as F

from bsnas.nn import SpringBlock
from bsnas.ops import mbconv_folded
from bsnas.ops.masked_conv import _format
from reference import ACTS
from test_spring_block import _randomise  # tests/ is on sys.path

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def reference(x, ew, eb, dw, db, pw, pb, stride, act, residual):
    a = ACTS[act]
    k = dw.shape[-1]
    h = a(F.conv2d(x, ew, eb))
    h = a(F.conv2d(h, dw, db, stride, k // 2, 1, dw.shape[0]))
    h = F.conv2d(h, pw, pb)
    return h + x if residual else h


def make_case(rng, dtype, fmt, device="cpu"):
    cin = rng.choice([1, 3, 8, 16])
    c = rng.randint(1, 40)
    k = rng.choice([3, 5, 7])
    stride = rng.choice([1, 2])
    residual = stride == 1 and rng.random() < 0.6
    cout = cin if residual else rng.choice([1, 5, 8, 24])
    n, h, w = rng.randint(1, 3), rng.randint(1, 13), rng.randint(1, 13)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype)).to(device)

    x = t(n, cin, h, w).contiguous(memory_format=fmt)
    ws = (t(c, cin, 1, 1, scale=0.5), t(c), t(c, 1, k, k, scale=0.4), t(c),
          t(cout, c, 1, 1, scale=0.3), t(cout))
    return x, ws, stride, residual


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, act, fmt):
    rng = random.Random(f"{dtype}-{act}-{fmt}")  # str seeds are stable across runs
    torch.manual_seed(rng.randint(0, 1 << 30))
    for _ in range(12):
        x, ws, stride, residual = make_case(rng, dtype, fmt)
        y = mbconv_folded(x, *ws, stride=stride, activation=act, residual=residual)
        ref = reference(x.double(), *(w.double() for w in ws), stride, act, residual)
        assert y.dtype == dtype and y.shape == ref.shape
        assert y.is_contiguous(memory_format=_format(x))  # x's format, as every op
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                                atol=1e-5)
        torch.testing.assert_close(y.double(), ref, **tol)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
def test_opcheck(fmt):
    rng = random.Random(5)
    for _ in range(3):
        x, ws, stride, residual = make_case(rng, torch.float32, fmt)
        torch.library.opcheck(torch.ops.bsnas.mbconv_folded.default,
                              (x, *ws, stride, 2, residual),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static",
                                          "test_aot_dispatch_dynamic"))
        ew, eb, dw, db, pw, pb = ws
        z = F.conv2d(x, ew).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.bsnas._mbconv_folded_depthwise.default,
                              (z, eb, dw, db, pb, x if residual else None, stride, 1))


def test_depthwise_stage_writes_both_outputs():
    """Stage 2 alone: h = act(dw(act(z + eb)) + db), out = pb (+ shortcut)."""
    torch.manual_seed(3)
    z, eb, dw, db = torch.randn(2, 6, 7, 5), torch.randn(6), torch.randn(6, 1, 5, 5), torch.randn(6)
    pb, s = torch.randn(4), torch.randn(2, 4, 4, 3)
    h, out = torch.ops.bsnas._mbconv_folded_depthwise(z, eb, dw, db, pb, s, 2, 2)
    ref = F.relu6(F.conv2d(F.relu6(z + eb.view(1, -1, 1, 1)), dw, db, 2, 2, 1, 6))
    torch.testing.assert_close(h, ref)
    torch.testing.assert_close(out, s + pb.view(1, -1, 1, 1))
    _, out = torch.ops.bsnas._mbconv_folded_depthwise(z, eb, dw, db, pb, None, 2, 2)
    torch.testing.assert_close(out, pb.view(1, -1, 1, 1).expand(2, 4, 4, 3))


def test_compile_fullgraph():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 9, 9)
    ws = (torch.randn(16, 8, 1, 1), torch.randn(16), torch.randn(16, 1, 3, 3), torch.randn(16),
          torch.randn(8, 16, 1, 1), torch.randn(8))
    fn = torch.compile(lambda *a: mbconv_folded(*a, stride=1, residual=True), fullgraph=True)
    torch.testing.assert_close(fn(x, *ws), reference(x, *ws, 1, "relu6", True))


def test_empty_batch():
    x = torch.randn(0, 4, 6, 6)
    ws = (torch.randn(6, 4, 1, 1), torch.randn(6), torch.randn(6, 1, 3, 3), torch.randn(6),
          torch.randn(4, 6, 1, 1), torch.randn(4))
    assert mbconv_folded(x, *ws, stride=2).shape == (0, 4, 3, 3)


def test_bad_input():
    x = torch.randn(2, 4, 6, 6)
    ew, eb, dw, db = torch.randn(6, 4, 1, 1), torch.randn(6), torch.randn(6, 1, 3, 3), torch.randn(6)
    pw, pb = torch.randn(4, 6, 1, 1), torch.randn(4)
    op = torch.ops.bsnas.mbconv_folded
    with pytest.raises(RuntimeError, match="expand_w must be"):
        op(x, torch.randn(6, 5, 1, 1), eb, dw, db, pw, pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="project_w must be"):
        op(x, ew, eb, dw, db, torch.randn(4, 7, 1, 1), pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="expand_b must be 1-D of the active width 6"):
        op(x, ew, torch.randn(5), dw, db, pw, pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="dw_b is"):
        op(x, ew, eb, dw, db.double(), pw, pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="residual block needs stride 1"):
        op(x, ew, eb, dw, db, pw, pb, 2, 2, True)
    with pytest.raises(RuntimeError, match="residual block needs"):
        op(x, ew, eb, dw, db, torch.randn(5, 6, 1, 1), torch.randn(5), 1, 2, True)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        op(x, ew, eb, dw, db, pw, pb, 3, 2, False)
    with pytest.raises(RuntimeError, match="kernel size must be odd"):
        op(x, ew, eb, torch.randn(6, 1, 4, 4), db, pw, pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="activation code must be"):
        op(x, ew, eb, dw, db, pw, pb, 1, 9, False)
    with pytest.raises(RuntimeError, match="half precision is supported on CUDA only"):
        op(x.half(), ew.half(), eb.half(), dw.half(), db.half(), pw.half(), pb.half(), 1, 2,
           False)
    with pytest.raises(RuntimeError, match="expand_w is"):
        op(x, ew.double(), eb, dw, db, pw, pb, 1, 2, False)
    with pytest.raises(RuntimeError, match="project_b must be 1-D"):
        op(x, ew, eb, dw, db, pw, pb.view(2, 2), 1, 2, False)
    with pytest.raises(ValueError, match="activation must be one of"):
        mbconv_folded(x, ew, eb, dw, db, pw, pb, activation="gelu")


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["relu6", "relu", "hswish"])
def test_spring_block_eval_runs_on_it(act, fmt):
    """SpringBlock in eval without gradients takes the folded op (hswish: eager
    fallback) and equals the block's eval function computed in float64 eager code."""
    torch.manual_seed(7)
    rng = random.Random(7)
    for _ in range(4):
        cin = rng.choice([4, 8])
        stride = rng.choice([1, 2])
        block = SpringBlock(cin, rng.choice([cin, 6]), 24, rng.choice([3, 5, 7]), stride, act)
        _randomise(block)
        block.width = rng.randint(1, 24)
        block.eval()
        x = torch.randn(2, cin, 9, 34).contiguous(memory_format=fmt)  # >= 16 wide out
        with torch.no_grad():
            y = block(x)
            ref = block.double()(x.double().requires_grad_())  # eager folded path
        block.float()
        torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile() as prof, torch.no_grad():
            block(x)
        used = any(e.name == "bsnas::mbconv_folded" for e in prof.events())
        assert used == (act != "hswish")


def test_spring_block_eval_narrow_nchw_planes_run_in_channels_last():
    """On CPU, NCHW inputs with output planes under
    SpringBlock.CPU_FOLDED_NCHW_MIN_WIDTH wide run the op in channels_last and come back
    NCHW; wider ones and channels_last inputs run it as they are. Same function."""
    torch.manual_seed(8)
    block = SpringBlock(8, 8, 32, 5, 1).eval()
    for width in (7, SpringBlock.CPU_FOLDED_NCHW_MIN_WIDTH):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 8, 7, width).contiguous(memory_format=fmt)
            with torch.profiler.profile() as prof, torch.no_grad():
                y = block(x)
            assert sum(e.name == "bsnas::mbconv_folded" for e in prof.events()) == 1
            assert y.is_contiguous(memory_format=fmt)
            assert block._fold_in_channels_last(x) == (
                fmt == torch.contiguous_format and width < block.CPU_FOLDED_NCHW_MIN_WIDTH)
            with torch.no_grad():
                torch.testing.assert_close(y, block.to_static()(x), rtol=1e-5, atol=1e-5)
