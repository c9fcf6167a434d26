"""Fashion-MNIST: idx parsing (raw and gzipped), every bad-file error, the in-memory
loaders' order, augmentation and exact resume, and the DALI external-source path. The
idx files are small ones written here; the real dataset is never needed."""
import gzip
import os

import numpy as np
import pytest
import torch

from bsnas.data import (DaliTensorLoader, TensorAugment, TensorImages, TensorLoader,
                        dali_available, load_fashion_mnist, make_loader, read_idx,
                        split_holdout)
from bsnas.data.fashion_mnist import CLASSES, FILES, MEAN, STD
from bsnas.data.loaders import augment_params, pad_crop_flip
from idx_files import idx_bytes

N_TRAIN, N_TEST = 40, 12


def write(path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def arrays(n, seed):
    """`n` random 28x28 images and labels in [0, 10), as uint8 arrays."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def make_split(root, split, n, gz, seed=0):
    images, labels = arrays(n, seed)
    image_name, label_name = FILES[split]
    write(os.path.join(root, image_name), idx_bytes(images), gz)
    write(os.path.join(root, label_name), idx_bytes(labels), gz)
    return images, labels


@pytest.fixture(params=["raw", "gz"])
def root(request, tmp_path):
    gz = request.param == "gz"
    make_split(tmp_path, "train", N_TRAIN, gz, seed=1)
    make_split(tmp_path, "test", N_TEST, gz, seed=2)
    return tmp_path


@pytest.fixture(scope="module")
def data():
    """80 random training images, built in memory (the loaders need no files)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (80,), generator=g)
    return TensorImages(images, labels, CLASSES, MEAN, STD)


# --------------------------------------------------------------------------- parsing


def test_parse_raw_and_gz(root):
    want_x, want_y = arrays(N_TRAIN, seed=1)
    train = load_fashion_mnist(str(root))
    test = load_fashion_mnist(str(root), "test")
    assert train.images.shape == (N_TRAIN, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (N_TRAIN,) and train.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], torch.from_numpy(want_x))
    assert torch.equal(train.labels, torch.from_numpy(want_y).long())
    assert len(test) == N_TEST and test.size == (28, 28) and test.channels == 1
    assert train.classes == CLASSES and len(CLASSES) == 10
    assert train.mean == MEAN and train.std == STD


def test_read_idx_shape_from_header(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    (tmp_path / "x").write_bytes(idx_bytes(a))
    t = read_idx(str(tmp_path / "x"), 3)
    assert t.shape == (2, 3, 5) and torch.equal(t, torch.from_numpy(a))


def test_raw_file_preferred_over_gz(tmp_path):
    make_split(tmp_path, "train", 5, gz=True, seed=3)
    x, _ = make_split(tmp_path, "train", 7, gz=False, seed=4)
    got = load_fashion_mnist(str(tmp_path))
    assert len(got) == 7 and torch.equal(got.images[:, 0], torch.from_numpy(x))


# --------------------------------------------------------------------------- errors


def corrupt(root, name, data: bytes, gz: bool):
    for p in (root / name, root / f"{name}.gz"):
        if p.exists():
            p.unlink()
    write(os.path.join(root, name), data, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_missing_file(tmp_path, gz):
    make_split(tmp_path, "train", N_TRAIN, gz)
    (tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))).unlink()
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\[\.gz\] does not exist"):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist(str(tmp_path), "val")


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic(root, gz):
    images = np.zeros((N_TRAIN, 28, 28), np.uint8)
    corrupt(root, "train-images-idx3-ubyte", idx_bytes(images, magic=0x00000903), gz)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*wrong magic number "
                                         r"0x00000903, expected 0x00000803"):
        load_fashion_mnist(str(root))
    corrupt(root, "train-images-idx3-ubyte", b"\x89PNG\r\n\x1a\n" + bytes(100), gz)
    with pytest.raises(ValueError, match="wrong magic number 0x89504e47"):
        load_fashion_mnist(str(root))


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_dims(root, gz):
    # A label file where the image file belongs: one dimension, not three.
    corrupt(root, "train-images-idx3-ubyte", idx_bytes(np.zeros(N_TRAIN, np.uint8)), gz)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*wrong dims: 1 dimensions"):
        load_fashion_mnist(str(root))
    corrupt(root, "train-images-idx3-ubyte", idx_bytes(np.zeros((N_TRAIN, 32, 32), np.uint8)), gz)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*wrong dims: images are "
                                         r"32x32, expected 28x28"):
        load_fashion_mnist(str(root))


@pytest.mark.parametrize("gz", [False, True])
def test_counts_disagree(root, gz):
    corrupt(root, "train-labels-idx1-ubyte", idx_bytes(np.zeros(N_TRAIN - 1, np.uint8)), gz)
    with pytest.raises(ValueError, match=rf"holds {N_TRAIN} images but .*train-labels-idx1-ubyte"
                                         rf".* holds {N_TRAIN - 1} labels"):
        load_fashion_mnist(str(root))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated(root, gz):
    full = idx_bytes(np.zeros((N_TRAIN, 28, 28), np.uint8))
    corrupt(root, "train-images-idx3-ubyte", full[:-100], gz)
    with pytest.raises(ValueError, match=rf"train-images-idx3-ubyte.*truncated: the header's "
                                         rf"shape {N_TRAIN} x 28 x 28 needs {N_TRAIN * 784} "
                                         rf"bytes of data, the file has {N_TRAIN * 784 - 100}"):
        load_fashion_mnist(str(root))
    corrupt(root, "train-images-idx3-ubyte", full[:10], gz)  # inside the header
    with pytest.raises(ValueError, match="truncated: 10 bytes, shorter than the 16-byte idx header"):
        load_fashion_mnist(str(root))
    corrupt(root, "train-images-idx3-ubyte", full + b"\0", gz)
    with pytest.raises(ValueError, match="too long"):
        load_fashion_mnist(str(root))


def test_truncated_or_bad_gzip_stream(tmp_path):
    make_split(tmp_path, "train", N_TRAIN, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated gzip stream"):
        load_fashion_mnist(str(tmp_path))
    path.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: cannot be read"):
        load_fashion_mnist(str(tmp_path))


def test_label_out_of_range(root):
    labels = np.full(N_TRAIN, 10, np.uint8)
    corrupt(root, "train-labels-idx1-ubyte", idx_bytes(labels), False)
    with pytest.raises(ValueError, match=r"label 10 is out of range \[0, 10\)"):
        load_fashion_mnist(str(root))


def test_tensor_images_checks(data):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] uint8"):
        TensorImages(data.images.float(), data.labels, CLASSES, MEAN, STD)
    with pytest.raises(ValueError, match="labels must be an int64 tensor of shape"):
        TensorImages(data.images, data.labels[:-1], CLASSES, MEAN, STD)
    with pytest.raises(ValueError, match="mean and std need 1 values"):
        TensorImages(data.images, data.labels, CLASSES, (0.5, 0.5), STD)
    with pytest.raises(ValueError, match="data.padding must be an integer >= 0"):
        TensorAugment(padding=-1)
    with pytest.raises(ValueError, match="TensorImages needs a TensorAugment"):
        from bsnas.data import Augment
        make_loader(data, 8, Augment(28), True, backend="torch")


# --------------------------------------------------------------------------- loaders


def test_holdout_split_of_tensor_images(data):
    train, held = split_holdout(data, 20, seed=3)
    again, _ = split_holdout(data, 20, seed=3)
    assert len(train) == 60 and len(held) == 20
    assert torch.equal(train.images, again.images)
    # Disjoint and complete: every image lands in exactly one part.
    rows = {bytes(x.numpy()) for x in data.images}
    parts = [bytes(x.numpy()) for x in torch.cat([train.images, held.images])]
    assert len(parts) == len(set(parts)) == len(rows) and set(parts) == rows


def test_pad_crop_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (6, 3, 9, 7), dtype=torch.uint8, generator=g)
    dy = torch.tensor([0, 4, 2, 1, 3, 4])
    dx = torch.tensor([4, 0, 2, 3, 1, 0])
    flip = torch.tensor([0, 1, 0, 1, 1, 0])
    got = pad_crop_flip(x, dy, dx, flip, 2)
    assert got.shape == x.shape and got.dtype == torch.uint8 and got.is_contiguous()
    for b in range(6):
        padded = torch.nn.functional.pad(x[b], (2, 2, 2, 2))
        want = padded[:, dy[b]:dy[b] + 9, dx[b]:dx[b] + 7]
        if flip[b]:
            want = want.flip(-1)
        assert torch.equal(got[b], want)
    # Centre offsets without flips give the images back.
    same = pad_crop_flip(x, torch.full((6,), 2), torch.full((6,), 2), torch.zeros(6), 2)
    assert torch.equal(same, x)


def test_augment_params_depend_on_seed_epoch_index_only():
    aug = TensorAugment(padding=3)
    dy, dx, flip = augment_params(5, 2, [7, 3, 11, 3], aug)
    assert dy.dtype == dx.dtype == flip.dtype == np.int32 and dy.shape == (4,)
    assert dy[1] == dy[3] and dx[1] == dx[3] and flip[1] == flip[3]  # same index
    one = augment_params(5, 2, [11], aug)
    assert (one[0][0], one[1][0], one[2][0]) == (dy[2], dx[2], flip[2])  # batch-independent
    many = augment_params(5, 2, range(4000), aug)
    assert set(many[0]) == set(many[1]) == set(range(7)) and set(many[2]) == {0, 1}
    assert 1800 < many[2].sum() < 2200  # flips are fair
    other_epoch = augment_params(5, 3, range(4000), aug)
    other_seed = augment_params(6, 2, range(4000), aug)
    assert (many[0] != other_epoch[0]).mean() > 0.7 and (many[0] != other_seed[0]).mean() > 0.7
    no_flip = augment_params(5, 2, range(100), TensorAugment(padding=0, flip=False))
    assert not no_flip[0].any() and not no_flip[1].any() and not no_flip[2].any()


def test_torch_loader_deterministic_and_resumable(data):
    aug = TensorAugment(padding=2)
    a = make_loader(data, 16, aug, True, backend="torch", seed=1)
    b = make_loader(data, 16, aug, True, backend="auto", seed=1)
    assert isinstance(a, TensorLoader) and isinstance(b, TensorLoader)
    a.set_epoch(2), b.set_epoch(2)
    full = list(a)
    assert len(full) == len(a) == 5
    for k in (1, 3, 4):
        tail = list(b.iterate(start_batch=k))
        assert len(tail) == 5 - k
        for (x1, y1), (x2, y2) in zip(full[k:], tail):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a.set_epoch(3)
    assert not torch.equal(next(iter(a))[0], full[0][0])  # a new epoch reshuffles
    x, y = full[0]
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Every image once per epoch, augmented from its own pixels.
    labels = torch.cat([y for _, y in full])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())


def test_torch_loader_batches_are_augmented_images(data):
    aug = TensorAugment(padding=2)
    loader = TensorLoader(data, 16, aug, True, seed=4)
    loader.set_epoch(1)
    order = loader._indices()
    x, y = next(iter(loader))
    idx = order[:16]
    assert torch.equal(y, data.labels[idx])
    dy, dx, flip = (torch.from_numpy(a) for a in augment_params(4, 1, idx, aug))
    raw = pad_crop_flip(data.images[idx], dy, dx, flip, 2).float()
    want = (raw / 255 - MEAN[0]) / STD[0]
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
    assert flip.any() and (dy != 2).any()  # some images really moved or flipped
    # Evaluation: the images as they are, in order, normalised; a short last batch.
    ev = list(TensorLoader(data, 32, aug, False))
    assert [len(y) for _, y in ev] == [32, 32, 16]
    torch.testing.assert_close(torch.cat([x for x, _ in ev]),
                               (data.images.float() / 255 - MEAN[0]) / STD[0], rtol=0, atol=1e-5)


def test_torch_loader_shards_by_rank(data):
    aug = TensorAugment()
    shards = [TensorLoader(data, 8, aug, True, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    first, second = (s._indices() for s in shards)
    assert len(first) == len(second) == 40 and not set(first) & set(second)
    # The same (seed, epoch, index) gives the same augmentation on whichever rank.
    single = TensorLoader(data, 8, aug, True, seed=2)
    single.set_epoch(1)
    idx = first[:8]
    x_rank, _ = next(iter(shards[0]))
    dy, dx, flip = (torch.from_numpy(a) for a in augment_params(2, 1, idx, aug))
    want = (pad_crop_flip(data.images[idx], dy, dx, flip, 2).float() / 255 - MEAN[0]) / STD[0]
    torch.testing.assert_close(x_rank, want, rtol=0, atol=1e-5)


def test_calibration_loader_is_fixed(data):
    """build_data's calibration loader: training augmentation, no shuffle, all images."""
    aug = TensorAugment()
    a = list(make_loader(data, 32, aug, True, backend="torch", shuffle=False, drop_last=False))
    b = list(make_loader(data, 32, aug, True, backend="torch", shuffle=False, drop_last=False))
    assert [len(y) for _, y in a] == [32, 32, 16]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


def test_real_dataset_when_installed():
    """Only where the dataset package is installed: the counts of the real files."""
    if not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"):
        pytest.skip("dataset-fashion-mnist is not installed")
    test = load_fashion_mnist(split="test")
    assert test.images.shape == (10_000, 1, 28, 28)
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))


# --------------------------------------------------------------------------- DALI


def test_dali_external_source_matches_torch_loader(data):
    pytest.importorskip("nvidia.dali")
    if not dali_available():
        pytest.skip("DALI's PyTorch plugin cannot be imported")
    aug = TensorAugment(padding=3)
    for train in (True, False):
        dali = make_loader(data, 16, aug, train, backend="dali", seed=7, workers=1)
        ref = make_loader(data, 16, aug, train, backend="torch", seed=7)
        assert isinstance(dali, DaliTensorLoader) and len(dali) == len(ref)
        for epoch in (0, 1):
            dali.set_epoch(epoch), ref.set_epoch(epoch)
            got, want = list(dali), list(ref)
            assert len(got) == len(want) == len(dali)
            for (xd, yd), (xt, yt) in zip(got, want):
                assert xd.shape == xt.shape and xd.dtype == xt.dtype == torch.float32
                assert torch.equal(yd, yt)
                torch.testing.assert_close(xd, xt, rtol=0, atol=1e-5)
    # Exact resume, and a short last batch when not dropping.
    dali = make_loader(data, 16, aug, True, backend="dali", seed=7, workers=1)
    dali.set_epoch(4)
    full = list(dali)
    tail = list(dali.iterate(start_batch=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail)) and len(tail) == 3
    calib = make_loader(data, 32, aug, True, backend="dali", shuffle=False, drop_last=False,
                        workers=1)
    assert [len(y) for _, y in calib] == [32, 32, 16]
