"""Data loaders on small synthetic files: CIFAR-10 pickle folder / npz parts, image folders, image and toy streams."""
import pickle

import numpy as np
import pytest
import torch

import configs
from data.cifar10 import load_cifar10
from data.images import load_image_folder, random_hflip, to_unit_interval
from data.loaders import ImageStream, ToyStream, get_data_stream, load_image_dataset
from errors import UserError


def fake_cifar_hwc(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_pickle_folder(root, per_batch: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x, y = fake_cifar_hwc(per_batch, k)
        rows = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # official layout: R, G, B planes per row
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rows, b"labels": [int(v) for v in y], b"batch_label": name.encode()}, handle)
        written[name] = (x, y)
    return written


def test_cifar_pickle_folder(tmp_path):
    written = write_pickle_folder(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        images, labels = load_cifar10(str(path), "train")
        assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
        x1, y1 = written["data_batch_1"]
        np.testing.assert_array_equal(images[:3], x1.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(labels[:3], y1)
    test_images, _ = load_cifar10(str(tmp_path), "test")
    np.testing.assert_array_equal(test_images, written["test_batch"][0].transpose(0, 3, 1, 2))


def test_cifar_npz_parts_list_glob_and_folder(tmp_path):
    parts = [fake_cifar_hwc(n, seed) for seed, n in enumerate((4, 5, 3))]
    for k, (x, y) in enumerate(parts):
        np.savez(tmp_path / f"train_{k}.npz", x=x, y=y, names=np.array(["a"] * len(y)))
    np.savez(tmp_path / "test.npz", x=parts[0][0], y=parts[0][1])
    expected = np.concatenate([p[0] for p in parts]).transpose(0, 3, 1, 2)
    labels = np.concatenate([p[1] for p in parts])
    for path in (str(tmp_path), str(tmp_path / "train_*.npz"),
                 ",".join(str(tmp_path / f"train_{k}.npz") for k in range(3))):
        images, y = load_cifar10(path, "train")
        np.testing.assert_array_equal(images, expected)
        np.testing.assert_array_equal(y, labels)
        assert y.dtype == np.int64
    one, _ = load_cifar10(str(tmp_path / "train_1.npz"))
    assert one.shape == (5, 3, 32, 32)
    assert load_cifar10(str(tmp_path), "test")[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("case", ["missing", "empty", "no_parts", "bad_keys", "bad_shape", "not_npz", "bad_pickle"])
def test_cifar_bad_paths_are_user_errors(tmp_path, case):
    path = str(tmp_path / "nowhere")
    if case == "empty":
        path = ""
    elif case == "no_parts":
        path = str(tmp_path)
    elif case == "bad_keys":
        np.savez(tmp_path / "a.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
        path = str(tmp_path / "a.npz")
    elif case == "bad_shape":
        np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2))
        path = str(tmp_path / "a.npz")
    elif case == "not_npz":
        (tmp_path / "a.txt").write_text("hello")
        path = str(tmp_path / "a.txt")
    elif case == "bad_pickle":
        write_pickle_folder(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
        path = str(tmp_path)
    with pytest.raises(UserError, match="expected|npz|pickle"):
        load_cifar10(path, "train")


def test_cifar_missing_path_from_config_names_the_fix(tmp_path):
    config = configs.get_config("ncsn_cifar")
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        get_data_stream(config, 4)
    config.data.path = ""
    with pytest.raises(UserError, match="--config.data.path"):
        load_image_dataset(config)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "sub" / "b.png")
    exact = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("ignored")
    images = load_image_folder(str(tmp_path), 16)
    assert images.shape == (3, 3, 16, 16) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[2], exact.transpose(2, 0, 1))  # right size: stored as is
    assert load_image_folder(str(tmp_path), 8, num_channels=1).shape == (3, 1, 8, 8)
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        load_image_folder(str(tmp_path / "empty"), 16)


def test_dequantization_and_flip():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(4, 3, 1, 1)
    x = to_unit_interval(pixels, dequantize=True, generator=torch.Generator().manual_seed(0))
    assert float(x.min()) >= 0 and float(x.max()) < 1
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), pixels)  # (k + u) / 256 stays in bin k
    assert torch.equal(to_unit_interval(pixels, dequantize=False), pixels.float() / 255)
    flipped = random_hflip(x, torch.Generator().manual_seed(1))
    for a, b in zip(x, flipped):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    many = random_hflip(torch.arange(2.0).reshape(1, 1, 1, 2).repeat(2000, 1, 1, 1), torch.Generator().manual_seed(2))
    assert 0.45 < float((many[:, 0, 0, 0] == 1).float().mean()) < 0.55


def test_image_stream_epochs_ranks_determinism_and_range():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).repeat(1, 3, 4, 4) * 20
    streams = [ImageStream(images, 2, seed=3, rank=r, world_size=2, dequantize=True, flip=True,
                           scaler=lambda x: 2 * x - 1) for r in range(2)]
    # one epoch = 10 rows = 2.5 global batches of 4; steps 0-1 plus the first half of step 2 cover every row once
    seen = torch.cat([torch.cat([s.indices(step) for s in streams]) for step in range(3)])[:10]
    assert sorted(seen.tolist()) == list(range(10))
    assert set(streams[0].indices(5).tolist()).isdisjoint(streams[1].indices(5).tolist())
    batch = streams[0].batch(4)
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == torch.float32
    assert float(batch.min()) >= -1 and float(batch.max()) <= 1
    again = ImageStream(images, 2, seed=3, rank=0, world_size=2, dequantize=True, flip=True,
                        scaler=lambda x: 2 * x - 1)
    assert torch.equal(again.batch(4), batch)  # a function of (seed, step, rank) only
    assert not torch.equal(streams[0].batch(5), batch)
    # pixel value k maps back to row k (no dequantization here: k / 255 exactly)
    plain = ImageStream(images, 4, seed=0)
    idx, x = plain.indices(1), plain.batch(1)
    assert torch.allclose(x[:, 0, 0, 0] * 255, (idx * 20).float())


def test_toy_and_digits_streams():
    stream = ToyStream("ring2d", 64, seed=1)
    assert stream.batch(3).shape == (64, 2)
    assert torch.equal(stream.batch(3), ToyStream("ring2d", 64, seed=1).batch(3))
    assert not torch.equal(stream.batch(3), stream.batch(4))
    assert not torch.equal(stream.batch(3), ToyStream("ring2d", 64, seed=1, rank=1).batch(3))
    with pytest.raises(UserError, match="unknown toy"):
        ToyStream("nope", 4, seed=0)
    config = configs.get_config("vp_digits")
    digits = get_data_stream(config, 16)
    x = digits.batch(0)
    assert x.shape == (16, 1, 8, 8)
    low, high = (-1, 1) if config.data.centered else (0, 1)
    assert float(x.min()) >= low and float(x.max()) <= high
    config.data.image_size = 16
    with pytest.raises(UserError, match="8x8|16x16"):
        get_data_stream(config, 16)


@pytest.mark.parametrize("case,labels", [("text", np.array(["cat", "dog"])), ("above_nine", np.array([3, 99])),
                                         ("negative", np.array([-5, 1])), ("float", np.array([0.5, 1.0])),
                                         ("nan", np.array([np.nan, 1.0]))])
def test_cifar_npz_labels_must_be_integers_0_to_9(tmp_path, case, labels):
    """Labels index the class embedding of conditional training: text, floats or 99 are refused in one line
    (before: a ValueError trace, garbage integers, or an IndexError deep inside torch.embedding)."""
    np.savez(tmp_path / "train_0.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=labels)
    with pytest.raises(UserError, match=r"labels y must (be integers|lie in) 0\.\.9") as error:
        load_cifar10(str(tmp_path / "train_0.npz"), "train")
    assert "\n" not in str(error.value)


def test_cifar_pickle_labels_must_lie_in_0_to_9(tmp_path):
    write_pickle_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, handle)
    with pytest.raises(UserError, match=r"data_batch_2.*labels b'labels' must lie in 0\.\.9, found 1\.\.10"):
        load_cifar10(str(tmp_path), "train")


def test_image_folder_follows_links_once_and_skips_hidden_files(tmp_path):
    """A link to a folder is read like a folder; a link back to a parent is not read again (before: each image
    41 times); hidden files are left out. The FID statistics' fingerprint lists exactly these files."""
    from PIL import Image

    from data.images import list_image_files

    root, other = tmp_path / "images", tmp_path / "elsewhere"
    root.mkdir()
    other.mkdir()
    rng = np.random.default_rng(0)
    for folder, name in ((root, "a.png"), (other, "b.png"), (other, "c.png"), (root, ".hidden.png")):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    files = list_image_files(str(root))
    assert [f[len(str(root)) + 1:] for f in files] == ["a.png", "linked/b.png", "linked/c.png"]
    assert load_image_folder(str(root), 8).shape == (3, 3, 8, 8)


def test_image_larger_than_pils_limit_is_one_line(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (an image past its pixel limit, possibly a hostile file) is a UserError."""
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,024 pixels > 2 x 100: refused as a bomb
    with pytest.raises(UserError, match="big.png' is too large to read safely"):
        load_image_folder(str(tmp_path), 8)


@pytest.mark.parametrize("name", ["digits", "image_folder"])
def test_single_split_sets_have_no_test_split(tmp_path, name):
    """digits and image folders are one set of images that training uses: their "test" split used to be the
    training images under another name (bits/dim "of test images" measured on training data)."""
    config = configs.get_config("vp_digits")
    if name == "image_folder":
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
        config.data.update(dataset="image_folder", path=str(tmp_path))
    assert load_image_dataset(config, "train")[0].shape[1:] == (1, 8, 8)
    with pytest.raises(UserError, match=f"data set '{name}' has one split, 'train' .*use --split train"):
        load_image_dataset(config, "test")
    assert configs.get_config("vp_digits").likelihood.split == "train"


def test_uint8_conversion_inverts_the_training_map():
    """Samples go back to pixels by the inverse of how training saw the data: floor(256 x) for dequantized
    data ((k + u) / 256), round(255 x) otherwise (k / 255). Rounding dequantized values put 39% of the digits'
    pixels one level off (half of the background)."""
    from data.images import from_unit_interval

    k = torch.arange(256, dtype=torch.uint8).repeat(50)
    dequantized = to_unit_interval(k, dequantize=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_unit_interval(dequantized, dequantized=True), k)
    assert (from_unit_interval(dequantized, dequantized=False) != k).float().mean() > 0.2  # the old rule: 25% off
    plain = to_unit_interval(k, dequantize=False)
    assert torch.equal(from_unit_interval(plain, dequantized=False), k)
    assert torch.equal(from_unit_interval(plain, dequantized=True), k)  # k / 255 lies in bin k too
    edges = torch.tensor([-0.5, 0.0, 1.0, 1.5, float("nan")])
    assert from_unit_interval(edges, dequantized=True).tolist() == [0, 0, 255, 255, 0]


def test_samples_of_a_dequantized_config_map_to_the_data_pixels():
    from data.transforms import get_data_scaler
    from evaluation.sample_runner import to_data_space

    config = configs.get_config("vp_digits")
    assert config.data.uniform_dequantization
    images, _ = load_image_dataset(config, "train")
    x = get_data_scaler(config)(to_unit_interval(torch.from_numpy(images[:200]), dequantize=True,
                                                 generator=torch.Generator().manual_seed(1)))
    assert np.array_equal(to_data_space(config, x), images[:200])
