"""Configuration: defaults, YAML files, overrides and errors that name the key."""
import pytest

from bsnas.config import DEFAULTS, load_config, parse_override


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\ndata:\n  loader: torch\n")
    cfg = load_config(str(path), ["train.lr=0.05", "data.scale=[0.5, 1.0]"])
    assert cfg.train.epochs == 7 and cfg.data.loader == "torch"
    assert cfg.train.lr == 0.05 and cfg.data.scale == [0.5, 1.0]
    assert cfg.train.momentum == DEFAULTS["train"]["momentum"]
    assert isinstance(cfg.to_dict()["train"], dict)


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nope=1", "unknown config key 'nope'"),
    ("data.loader=fast", "'data.loader' must be one of"),
    ("train.epochs=0", "'train.epochs' must be > 0"),
    ("data.batch_size=big", "'data.batch_size' must be an integer"),
    ("train.amp=yes please", "'train.amp' must be true or false"),
    ("data.scale=[0.5]", "'data.scale' must be a list of 2"),
    ("data.scale=[0.9, 0.5]", "'data.scale' must satisfy"),
    ("shrink.drop_fraction=1.5", "'shrink.drop_fraction'"),
    ("search.max_macs=lots", "'search.max_macs' must be a number"),
    ("data.dataset=folder", "'data.root' is required"),
    ("train=3", "config section 'train' must be a mapping"),
    ("search.top_k=100", "'search.top_k' must not exceed"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_missing_file_and_bad_override():
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/nonexistent/c.yaml")
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("train.lr")


def test_shipped_configs_load():
    import glob
    files = glob.glob("configs/*.yaml")
    assert files
    for f in files:
        load_config(f)


def test_data_keys_of_in_memory_datasets():
    cfg = load_config(None, ["data.dataset=fashion_mnist"])
    assert cfg.data.root is None  # build_data reads /usr/share/datasets/fashion-mnist then
    assert cfg.data.calib_images == 2000 and cfg.data.calib_batches is None
    assert cfg.data.train_limit is None and cfg.data.padding == 2
    assert load_config(None, ["data.calib_batches=3", "data.train_limit=500"]).data.calib_batches == 3
    for override, message in (("data.calib_images=0", "'data.calib_images' must be > 0"),
                              ("data.train_limit=0", "'data.train_limit' must be > 0"),
                              ("data.train_limit=1.5", "'data.train_limit' must be of type int"),
                              ("data.calib_batches=0", "'data.calib_batches' must be > 0"),
                              ("data.padding=-1", "'data.padding' must be >= 0"),
                              ("data.dataset=mnist", "'data.dataset' must be one of")):
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])


def test_shrink_keys():
    cfg = load_config(None, [])
    s = cfg.shrink
    assert (s.mode, s.threshold, s.max_op_drops, s.max_width_drops) == ("evidence", 2.0, 2, 2)
    assert s.random_drops is None and s.cost_aware == "none" and s.macs_cap is None
    cfg = load_config(None, ["shrink.mode=random", "shrink.random_drops=[[1, 2], [0, 3]]"])
    assert cfg.shrink.random_drops == [[1, 2], [0, 3]]
    for override, message in (
            ("shrink.drop_fraction=0.2", "'shrink.drop_fraction' was removed; use shrink.threshold"),
            ("shrink.threshold=-1", "'shrink.threshold' must be >= 0"),
            ("shrink.max_width_drops=-1", "'shrink.max_width_drops' must be >= 0"),
            ("shrink.mode=greedy", "'shrink.mode' must be one of"),
            ("shrink.cost_aware=cheap", "'shrink.cost_aware' must be one of"),
            ("shrink.macs_cap=0", "'shrink.macs_cap' must be > 0"),
            ("shrink.random_drops=[[1, 2]]", "only used with shrink.mode: random")):
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])
    with pytest.raises(ValueError, match="pairs of integers >= 0"):
        load_config(None, ["shrink.mode=random", "shrink.random_drops=[[1, -2]]"])
    with pytest.raises(ValueError, match="per_macs needs shrink.score: accuracy"):
        load_config(None, ["shrink.cost_aware=per_macs", "shrink.score=loss"])
