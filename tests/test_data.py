"""Data: the digits tree, folder checks, the held-out split and both loaders."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from bsnas.data import (Augment, DaliLoader, TorchLoader, dali_available, make_loader,
                        prepare_digits, scan_image_folder, split_holdout)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_digits(str(tmp_path_factory.mktemp("cache")))


def test_digits_tree(digits):
    train = scan_image_folder(os.path.join(digits, "train"))
    val = scan_image_folder(os.path.join(digits, "val"), classes=train.classes)
    assert train.classes == tuple(str(i) for i in range(10))
    assert len(train) + len(val) == 1797 and abs(len(val) - 359) <= 5
    with Image.open(train.files[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    # Written once: a second call returns the same tree without rewriting it.
    stamp = os.path.getmtime(train.files[0])
    assert prepare_digits(os.path.dirname(digits)) == digits
    assert os.path.getmtime(train.files[0]) == stamp


def test_digits_prepared_by_several_processes_at_once(tmp_path):
    """The ranks of a torchrun job prepare the tree at once: each returns the same
    complete tree, and one finishing later never removes the tree another already put
    in place (a rank may be reading it)."""
    # Each prints the tree it got and that tree's inode: one tree for all.
    code = ("import os, sys; from bsnas.data import prepare_digits; "
            "r = prepare_digits(sys.argv[1]); print(r, os.stat(r).st_ino)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    roots = {o.strip().splitlines()[-1] for o in outs}
    assert len(roots) == 1, roots
    root = roots.pop().rsplit(" ", 1)[0]
    train = scan_image_folder(os.path.join(root, "train"))
    val = scan_image_folder(os.path.join(root, "val"), classes=train.classes)
    assert len(train) + len(val) == 1797
    assert [n for n in os.listdir(tmp_path) if n.startswith(".digits-")] == []


def test_holdout_split_is_fixed_by_seed(digits):
    train = scan_image_folder(os.path.join(digits, "train"), verify=False)
    a_train, a_hold = split_holdout(train, 300, seed=3)
    b_train, b_hold = split_holdout(train, 300, seed=3)
    c_train, c_hold = split_holdout(train, 300, seed=4)
    assert a_hold.files == b_hold.files and a_hold.files != c_hold.files
    assert len(a_hold) == 300 and len(a_train) == len(train) - 300
    assert not set(a_hold.files) & set(a_train.files)
    with pytest.raises(ValueError, match="data.holdout must be in"):
        split_holdout(train, len(train), 0)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(str(tmp_path / "empty"))
    (tmp_path / "a" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        scan_image_folder(str(tmp_path / "a"))
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "cat" / "ok.jpg")
    (tmp_path / "a" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="1 unreadable image"):
        scan_image_folder(str(tmp_path / "a"))
    (tmp_path / "a" / "cat" / "broken.jpg").unlink()
    (tmp_path / "v" / "dog").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "v" / "dog" / "x.png")
    with pytest.raises(ValueError, match=r"classes \['dog'\] .* missing from the training set"):
        scan_image_folder(str(tmp_path / "v"), classes=("cat",))


def _images(digits, n=96):
    return scan_image_folder(os.path.join(digits, "train"), verify=False).subset(range(n))


def test_torch_loader_deterministic_and_resumable(digits):
    images = _images(digits)
    aug = Augment(32, scale=(0.5, 1.0), flip=True)
    a = TorchLoader(images, 16, aug, True, seed=1)
    b = TorchLoader(images, 16, aug, True, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    full = list(a)
    assert len(full) == len(a) == 6
    tail = list(b.iterate(start_batch=4))
    for (x1, y1), (x2, y2) in zip(full[4:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a.set_epoch(3)
    assert not torch.equal(next(iter(a))[0], full[0][0])  # a new epoch reshuffles
    x, y = full[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_torch_loader_shards_by_rank(digits):
    images = _images(digits, 50)
    aug = Augment(32)
    seen = []
    for rank in range(2):
        loader = TorchLoader(images, 5, aug, False, rank=rank, world_size=2)
        seen.append(torch.cat([y for _, y in loader]))
    assert len(seen[0]) == len(seen[1]) == 25


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_matches_torch_loader_contract(digits):
    images = _images(digits)
    aug = Augment(32, crop_fraction=1.0)
    dali = make_loader(images, 16, aug, False, backend="dali", workers=1)
    ref = make_loader(images, 16, aug, False, backend="torch")
    assert isinstance(dali, DaliLoader)
    got = list(dali)
    want = list(ref)
    assert len(got) == len(want) == len(dali)
    for (xd, yd), (xt, yt) in zip(got, want):
        assert xd.shape == xt.shape and xd.dtype == xt.dtype
        assert torch.equal(yd, yt)  # unshuffled: same order, same labels
        # Different JPEG decoders and resize filters: close, not identical.
        assert (xd - xt).abs().mean() < 0.1
    train = make_loader(images, 16, Augment(32, scale=(0.5, 1.0)), True, backend="dali", workers=1)
    assert sum(y.numel() for _, y in train) == 96


def test_loader_choice_errors(digits):
    with pytest.raises(ValueError, match="data.loader must be"):
        make_loader(_images(digits), 4, Augment(32), False, backend="pil")
