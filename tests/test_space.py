"""Search space (YAML loading and validation, size, sampling), Arch and EnabledSpace."""
import collections
import copy
import itertools
import json
import random

import pytest
import yaml

import bsnas
from bsnas import Arch, EnabledSpace, LayerChoice, load_space
from bsnas.space import PRESETS_DIR, SearchSpace, preset_names

PRESETS = ["proxyless", "mobilenetv2", "tiny"]


def tiny_dict():
    with open(PRESETS_DIR / "tiny.yaml") as f:
        return yaml.safe_load(f)


def small_space():
    """A space small enough to enumerate: 3 layers, 2 widths each."""
    d = tiny_dict()
    d.update(name="small", stages=[{"channels": 16, "layers": 2, "stride": 1},
                                   {"channels": 24, "layers": 1, "stride": 2, "ops": ["k3", "k5"]}],
             width={"min_ratio": 1.0, "max_ratio": 2.0, "step": 1.0, "round_to": 8})
    return SearchSpace.from_dict(d)


# --------------------------------------------------------------------------- presets


def test_presets_listed():
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name,layers", [("proxyless", 21), ("mobilenetv2", 16), ("tiny", 6)])
def test_preset_layer_counts(name, layers):
    space = load_space(name)
    assert space.name == name
    assert space.num_layers == layers
    assert [l.index for l in space.layers] == list(range(layers))


def test_proxyless_structure():
    s = load_space("proxyless")
    assert s.resolution == 224 and s.classes == 1000 and s.stem.channels == 32
    assert s.first_block.channels == 16 and s.head.channels == 1280
    assert [st.channels for st in s.stages] == [24, 40, 80, 96, 192, 320]
    assert [st.layers for st in s.stages] == [4, 4, 4, 4, 4, 1]
    assert [st.stride for st in s.stages] == [2, 2, 2, 1, 2, 1]
    # skip in every layer that is not the first of its stage, and nowhere else
    for l in s.layers:
        assert l.allows_skip == (l.position > 0), l
        assert l.kernel_ops == ("k3", "k5", "k7")
    # 1x..6x input in 0.5x steps, rounded to multiples of 8
    assert s.layers[0].widths == (16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96)
    assert s.layers[1].widths == (24, 40, 48, 64, 72, 88, 96, 112, 120, 136, 144)  # 36 -> 40, 60 -> 64, ...
    assert all(w % 8 == 0 for l in s.layers for w in l.widths)
    assert s.layers[-1].max_width == 6 * 192


def test_mobilenetv2_structure():
    s = load_space("mobilenetv2")
    assert [(st.channels, st.layers, st.stride) for st in s.stages] == [
        (24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
    assert s.head.dropout == 0.2
    arch = s.uniform("k3", 6.0)
    assert [c.width for c in arch] == [6 * l.in_channels for l in s.layers]


def test_tiny_is_small():
    s = load_space("tiny")
    assert s.resolution == 32 and s.classes == 10 and 5 <= s.num_layers <= 8
    assert max(l.out_channels for l in s.layers) <= 32


def test_size_exact():
    s = load_space("proxyless")
    assert s.size() == 33 ** 6 * 34 ** 15  # first layers: 3 ops x 11 widths; others + skip
    assert isinstance(s.size(), int)
    small = small_space()
    all_archs = list(itertools.product(*[l.choices() for l in small.layers]))
    assert small.size() == len(all_archs) == len(set(all_archs)) == 7 * 7 * 4
    for choices in all_archs[::7]:
        small.validate(Arch("small", choices))


# --------------------------------------------------------------------------- loading


def test_dict_roundtrip_and_hash():
    for name in PRESETS:
        s = load_space(name)
        d = s.to_dict()
        json.dumps(d)  # checkpoint-friendly
        s2 = load_space(d)
        assert s2 == s and hash(s2) == hash(s)
        assert s2.layers == s.layers


def test_load_from_file(tmp_path):
    d = tiny_dict()
    d["name"] = "mine"
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(d))
    s = load_space(str(p))
    assert s.name == "mine" and s.num_layers == 6
    assert load_space(p) == s  # PathLike


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown space 'nope'.*proxyless"):
        load_space("nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_space(str(bad))
    with pytest.raises(ValueError, match="expected a space name"):
        load_space(3)


_DELETE = object()


def _set(d, path, value):
    """Set (or delete, with _DELETE) the dotted `path` of a parsed YAML dict."""
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is _DELETE:
        del d[keys[-1]]
    elif isinstance(d, list):
        d[int(keys[-1])] = value
    else:
        d[keys[-1]] = value


@pytest.mark.parametrize("path,value,message", [
    ("stages", _DELETE, r"missing required key\(s\) \['stages'\]"),
    ("stagez", [], r"unknown key\(s\) \['stagez'\]"),
    ("resolution", 0, r"resolution: must be >= 1"),
    ("resolution", True, r"resolution: expected an integer"),
    ("classes", "ten", r"classes: expected an integer"),
    ("name", "", r"name: expected a non-empty string"),
    ("activation", "gelu", r"activation: expected one of"),
    ("stem.channels", -3, r"stem.channels: must be >= 1"),
    ("stem.kernel", 4, r"stem.kernel: kernel size must be odd"),
    ("stem.size", 3, r"stem: unknown key"),
    ("ops", [], r"ops: expected a non-empty list"),
    ("ops", ["k3", "k4"], r"ops\[1\]: op 'k4'.*odd"),
    ("ops", ["k3", "conv"], r"ops\[1\]: unknown op 'conv'"),
    ("ops", ["k3", "k3"], r"ops: duplicate ops"),
    ("width.step", 0, r"width.step: must be > 0"),
    ("width.max_ratio", 0.5, r"width.max_ratio: must be >= min_ratio"),
    ("width.min_ratio", -1, r"width.min_ratio: must be > 0"),
    ("width.round_to", 0, r"width.round_to: must be >= 1"),
    ("stages", [], r"stages: expected a non-empty list"),
    ("stages.1.stride", 0, r"stages\[1\].stride: must be >= 1"),
    ("stages.2.layers", 1.5, r"stages\[2\].layers: expected an integer"),
    ("stages.0.channel", 3, r"stages\[0\]: unknown key"),
    ("stages.1.ops", ["skip"], r"stages\[1\] layer 0: no candidate op left.*stride 2"),
    ("head.dropout", 1.5, r"head.dropout: must be in \[0, 1\)"),
    ("head", _DELETE, r"missing required key\(s\) \['head'\]"),
])
def test_validation_errors(path, value, message):
    d = tiny_dict()
    _set(d, path, value)
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_dict(d, source="tiny.yaml")
    # errors name the source file
    with pytest.raises(ValueError, match=r"^tiny\.yaml: "):
        SearchSpace.from_dict(d, source="tiny.yaml")


def test_skip_dropped_where_not_allowed():
    d = tiny_dict()
    d["stages"][0]["channels"] = 24  # first layer: 16 -> 24, stride 1: no skip
    s = SearchSpace.from_dict(d)
    assert not s.layers[0].allows_skip and s.layers[1].allows_skip


# --------------------------------------------------------------------------- Arch


def test_arch_json_roundtrip():
    for name in PRESETS:
        s = load_space(name)
        rng = random.Random(0)
        for _ in range(20):
            a = s.sample(rng)
            text = a.to_json()
            b = Arch.from_json(text)
            assert b == a and hash(b) == hash(a)
            assert json.loads(text)["space"] == name
            assert Arch.from_dict(a.to_dict()) == a


def test_arch_json_format(tmp_path):
    a = Arch("tiny", [{"op": "k5", "width": 48}, {"op": "skip"}])
    assert json.loads(a.to_json()) == {"space": "tiny", "layers": [{"op": "k5", "width": 48}, {"op": "skip"}]}
    assert a[0] == LayerChoice("k5", 48) and a[1].is_skip and a[0].kernel_size == 5 and len(a) == 2
    assert str(a) == "tiny:k5/48,skip"
    p = tmp_path / "a.json"
    a.save(p)
    assert Arch.load(p) == a
    with pytest.raises(AttributeError):
        a.space = "other"  # immutable
    assert a.replace(1, {"op": "k3", "width": 16}) == Arch("tiny", [("k5", 48), ("k3", 16)])
    assert a[1].is_skip  # replace returned a copy


def test_arch_hashable_and_ordered():
    s = load_space("tiny")
    archs = [s.sample(i) for i in range(50)]
    assert len(set(archs + archs)) == len(set(archs))
    ordered = sorted(archs)
    assert ordered == sorted(reversed(archs))
    assert all(x <= y for x, y in zip(ordered, ordered[1:]))


@pytest.mark.parametrize("obj,message", [
    ({"space": "tiny", "layers": [{"op": "skip", "width": 8}]}, r"arch layer 0: op 'skip' takes no width"),
    ({"space": "tiny", "layers": [{"op": "k3"}]}, r"arch layer 0: op 'k3' needs a positive integer width"),
    ({"space": "tiny", "layers": [{"op": "k3", "width": 0}]}, r"positive integer width"),
    ({"space": "tiny", "layers": [{"op": "k3", "width": 8.0}]}, r"positive integer width"),
    ({"space": "tiny", "layers": [{"op": "conv", "width": 8}]}, r"arch layer 0: unknown op 'conv'"),
    ({"space": "tiny", "layers": [{"op": "k3", "width": 8, "x": 1}]}, r"unknown key"),
    ({"space": "tiny", "layers": ["k3"]}, r"arch layer 0: expected an object"),
    ({"space": "tiny", "layers": []}, r"'layers' is empty"),
    ({"space": "tiny"}, r"missing key\(s\) \['layers'\]"),
    ({"space": "", "layers": [{"op": "skip"}]}, r"'space' must be a non-empty string"),
    ([1, 2], r"expected an object"),
])
def test_arch_json_errors(obj, message):
    with pytest.raises(ValueError, match=message):
        Arch.from_json(json.dumps(obj))


def test_arch_invalid_json():
    with pytest.raises(ValueError, match="invalid JSON"):
        Arch.from_json("{not json")


# --------------------------------------------------------------------------- validate


def test_validate_errors():
    s = load_space("proxyless")
    good = s.sample(0)
    assert s.validate(good) is good
    with pytest.raises(ValueError, match="arch is for space 'tiny', not 'proxyless'"):
        s.validate(Arch("tiny", good.layers))
    with pytest.raises(ValueError, match="arch has 20 layers, space 'proxyless' has 21"):
        s.validate(Arch("proxyless", good.layers[:-1]))
    with pytest.raises(ValueError,
                       match=r"layer 0 \(stage 0, position 0\): op 'skip' not allowed \(stride 2\)"):
        s.validate(good.replace(0, LayerChoice("skip")))
    with pytest.raises(ValueError, match=r"layer 12 .*op 'skip' not allowed \(80 input channels != 96"):
        s.validate(good.replace(12, LayerChoice("skip")))
    with pytest.raises(ValueError, match=r"layer 3 .*width 36 not in the width grid \[24, 40"):
        s.validate(good.replace(3, LayerChoice("k3", 36)))
    with pytest.raises(ValueError, match=r"layer 3 .*op 'k9' not a candidate"):
        s.validate(good.replace(3, LayerChoice("k9", 24)))
    with pytest.raises(ValueError, match="expected an Arch"):
        s.validate(good.to_dict())


def test_stage_ops_override():
    s = small_space()
    assert s.layers[2].ops == ("k3", "k5")
    a = Arch("small", [("k7", 16), ("skip",), ("k7", 16)])
    with pytest.raises(ValueError, match=r"layer 2 .*op 'k7' not a candidate; candidates: \['k3', 'k5'\]"):
        s.validate(a)


def test_uniform_and_largest():
    s = load_space("tiny")
    assert s.validate(s.largest()) == Arch("tiny", [("k7", l.max_width) for l in s.layers])
    assert [c.width for c in s.uniform("k3", "min")] == [l.widths[0] for l in s.layers]
    with pytest.raises(ValueError, match=r"layer 2 .*op 'skip' not a candidate"):
        s.uniform("skip")


# --------------------------------------------------------------------------- sampling


def test_sample_deterministic_and_valid():
    s = load_space("proxyless")
    assert s.sample(7) == s.sample(7) == s.sample(random.Random(7))
    assert s.sample(7) != s.sample(8)
    rng = random.Random(1)
    for _ in range(50):
        s.validate(s.sample(rng))
    with pytest.raises(ValueError, match="rng must be"):
        s.sample("seed")


def test_sample_uniform_over_ops_and_widths():
    s = load_space("tiny")
    rng = random.Random(0)
    n = 3000
    ops = collections.Counter()
    widths = collections.Counter()
    for _ in range(n):
        a = s.sample(rng)
        ops[a[0].op] += 1
        if a[0].width is not None:
            widths[a[0].width] += 1
    assert set(ops) == set(s.layers[0].ops)
    for count in ops.values():  # 4 ops: 750 each; 5 sigma ~ 120
        assert abs(count - n / 4) < 130, ops
    k = sum(widths.values()) / len(s.layers[0].widths)
    for count in widths.values():
        assert abs(count - k) < 5 * k ** 0.5, widths


def test_sample_only_enabled():
    s = load_space("tiny")
    e = EnabledSpace(s)
    e.disable_op(0, "k7")
    e.disable_op(0, "skip")
    e.disable_width(0, 16)
    e.disable_width(3, 144)
    e.disable_op(5, "k3")
    rng = random.Random(3)
    seen = set()
    for _ in range(600):
        a = s.sample(rng, enabled=e)
        e.validate(a)
        assert a[0].op in ("k3", "k5") and a[0].width != 16
        assert a[3].width != 144 and a[5].op != "k3"
        seen.add(a[0])
    assert seen == {LayerChoice(op, w) for op in ("k3", "k5") for w in s.layers[0].widths if w != 16}
    with pytest.raises(ValueError, match="enabled set is for space 'mobilenetv2'"):
        s.sample(0, enabled=EnabledSpace(load_space("mobilenetv2")))


# --------------------------------------------------------------------------- EnabledSpace


def test_enabled_starts_full():
    s = load_space("proxyless")
    e = EnabledSpace(s)
    assert e.size() == s.size()
    assert all(e.ops(i) == l.ops and e.widths(i) == l.widths for i, l in enumerate(s.layers))


def test_enabled_disable_and_size():
    s = small_space()
    e = EnabledSpace(s)
    e.disable_op(1, "skip")
    e.disable_op(1, "k7")
    e.disable_width(2, 32)
    assert e.ops(1) == ("k3", "k5") and e.widths(2) == (16,)
    assert not e.is_enabled(1, "k7") and e.is_enabled(1, "k3", 32) and not e.is_enabled(2, "k3", 32)
    brute = [a for a in itertools.product(*[l.choices() for l in s.layers]) if e.contains(Arch("small", a))]
    assert e.size() == len(brute) == 7 * 4 * 2
    with pytest.raises(ValueError, match=r"layer 1 .*op 'k7' is disabled; enabled: \['k3', 'k5'\]"):
        e.validate(Arch("small", [("k3", 16), ("k7", 16), ("k3", 16)]))
    with pytest.raises(ValueError, match=r"layer 2 .*width 32 is disabled; enabled: \[16\]"):
        e.validate(Arch("small", [("k3", 16), ("k3", 16), ("k3", 32)]))


def test_enabled_disable_errors():
    e = EnabledSpace(load_space("tiny"))
    with pytest.raises(ValueError, match=r"layer 2 .*op 'skip' is not enabled"):
        e.disable_op(2, "skip")
    with pytest.raises(ValueError, match=r"width 17 is not enabled"):
        e.disable_width(0, 17)
    for op in ("k3", "k5", "k7"):
        e.disable_op(0, op)
    with pytest.raises(ValueError, match=r"cannot disable 'skip', the layer's last enabled op"):
        e.disable_op(0, "skip")
    for w in e.widths(1)[:-1]:
        e.disable_width(1, w)
    with pytest.raises(ValueError, match=r"cannot disable width 96, the layer's last enabled width"):
        e.disable_width(1, 96)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 6\)"):
        e.disable_op(6, "k3")


def test_enabled_state_dict_roundtrip():
    s = load_space("tiny")
    e = EnabledSpace(s)
    e.disable_op(1, "k5")
    e.disable_width(4, 48)
    state = json.loads(json.dumps(e.state_dict()))
    f = EnabledSpace(s)
    assert f != e
    f.load_state_dict(state)
    assert f == e and f.size() == e.size()
    g = e.copy()
    g.disable_op(0, "k3")
    assert g != e and e.is_enabled(0, "k3")


@pytest.mark.parametrize("mutate,message", [
    (lambda st: st.update(space="proxyless"), "enabled state is for space 'proxyless', not 'tiny'"),
    (lambda st: st["layers"].pop(), "expected 6 layers, got 5"),
    (lambda st: st["layers"][2].update(ops=["skip"]), r"layer 2 .*ops \['skip'\] are not candidates"),
    (lambda st: st["layers"][0].update(widths=[16, 20]),
     r"layer 0 .*widths \[20\] are not in the layer's grid"),
    (lambda st: st["layers"][0].update(ops=[]), r"layer 0 .*'ops' must be a non-empty list"),
    (lambda st: st.update(extra=1), "expected a dict with keys 'space' and 'layers'"),
])
def test_enabled_load_errors(mutate, message):
    e = EnabledSpace(load_space("tiny"))
    state = copy.deepcopy(e.state_dict())
    mutate(state)
    with pytest.raises(ValueError, match=message):
        e.load_state_dict(state)
    assert e == EnabledSpace(load_space("tiny"))  # unchanged after a failed load


def test_public_names():
    for name in ("Arch", "EnabledSpace", "SearchSpace", "Supernet", "export", "cost", "load_space"):
        assert hasattr(bsnas, name)
