"""Tests of cwreg.training.data (protocol, loading, augmentation) and cwreg.training.prepare (offline preparation)."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cwreg.training import cifar10_partial, data, prepare

tf.config.experimental.set_visible_devices([], 'GPU')

from conftest import CIFAR10_PARTIAL_SOURCE_DIR as CIFAR_DIR  # pylint: disable=g-bad-import-order
from conftest import MNIST_SOURCE_DIR as MNIST_DIR

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Fake TFDS data: each example's ORIGINAL index is written into its pixels, and the examples are
# handed to the loader in the order TFDS would have stored them (hash order), so the tests check
# that the loader restores the original order before applying the protocol.
# --------------------------------------------------------------------------------------------


def _fake_label(index: np.ndarray, num_classes: int) -> np.ndarray:
    return (index * 7 + 3) % num_classes


def _decode_index(images: np.ndarray) -> np.ndarray:
    """Inverse of the pixel encoding of `_fake_as_dataset_fn` (images in [0, 1])."""
    raw = np.rint(images * 255).astype(np.int64)
    return raw[:, 0, 0, 0] + 256 * raw[:, 0, 1, 0]


def _fake_as_dataset_fn(num_train: int, num_test: int):
    """A `tfds.testing.mock_data(as_dataset_fn=...)` with known contents and stored order."""

    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        del decoders, read_config, kwargs
        n = {'train': num_train, 'test': num_test}[str(split)]
        features = builder.info.features
        if 'id' in features:  # CIFAR-like: stored in an arbitrary order, the id gives the index.
            stored = np.random.default_rng(0).permutation(n)
        else:  # MNIST-like: TFDS's md5-of-index order.
            stored = data._tfds_stored_keys(str(split), n)  # pylint: disable=protected-access
        h, w, c = features['image'].shape
        images = np.zeros((n, h, w, c), np.uint8)
        images[:, 0, 0, 0] = stored % 256
        images[:, 0, 1, 0] = stored // 256
        images[:, 2:, 2:, :] = 255  # some bright pixels, to see the [0, 1] scaling
        k = features['label'].num_classes
        example = {'image': images, 'label': _fake_label(stored, k).astype(np.int64)}
        if 'id' in features:
            example['id'] = np.array([f'{split}_{i:05d}' for i in stored])
        if 'coarse_label' in features:
            example['coarse_label'] = example['label'] // 5
        return tf.data.Dataset.from_tensor_slices(example)

    return as_dataset


def _mock(num_train: int = 12_000, num_test: int = 2_000):
    return tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset_fn(num_train, num_test))


_SHAPES = {
    'mnist': (28, 28, 1),
    'fashion_mnist': (28, 28, 1),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
    'cifar10_partial': (32, 32, 3),
}
_NUM_CLASSES = {'mnist': 10, 'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100, 'cifar10_partial': 10}


def _check_split(split: data.Split, n: int, shape: tuple[int, ...], k: int) -> None:
    assert split.images.shape == (n, *shape)
    assert split.images.dtype == np.float32
    assert split.labels.shape == (n,)
    assert split.labels.dtype == np.int32
    assert split.images.min() >= 0.0 and split.images.max() == 1.0
    assert split.labels.min() >= 0 and split.labels.max() < k


# --------------------------------------------------------------------------------------------
# Protocol on mocked TFDS.
# --------------------------------------------------------------------------------------------


def test_datasets_constant():
    assert set(data.DATASETS) == set(_SHAPES)


@pytest.mark.parametrize('name', sorted(_SHAPES))
def test_load_test_protocol_on_mock(name):
    with _mock():
        ds = data.load_dataset(name, data_dir='/nonexistent')
    k = _NUM_CLASSES[name]
    assert ds.name == name and ds.num_classes == k
    _check_split(ds.train, 12_000, _SHAPES[name], k)
    _check_split(ds.eval, 2_000, _SHAPES[name], k)
    # Original order restored, labels carried along.
    np.testing.assert_array_equal(_decode_index(ds.train.images), np.arange(12_000))
    np.testing.assert_array_equal(_decode_index(ds.eval.images), np.arange(2_000))
    np.testing.assert_array_equal(ds.train.labels, _fake_label(np.arange(12_000), k))
    np.testing.assert_array_equal(ds.eval.labels, _fake_label(np.arange(2_000), k))


@pytest.mark.parametrize('name', ['mnist', 'cifar10'])
def test_validation_split_is_last_10k_of_train(name):
    with _mock():
        full = data.load_dataset(name, data_dir='/nonexistent')
        val = data.load_dataset(name, data_dir='/nonexistent', validation=True)
    assert val.train.num_examples == 2_000 and val.eval.num_examples == 10_000
    np.testing.assert_array_equal(val.train.images, full.train.images[:2_000])
    np.testing.assert_array_equal(val.train.labels, full.train.labels[:2_000])
    np.testing.assert_array_equal(val.eval.images, full.train.images[2_000:])
    np.testing.assert_array_equal(val.eval.labels, full.train.labels[2_000:])
    np.testing.assert_array_equal(_decode_index(val.eval.images), np.arange(2_000, 12_000))


def test_train_size_keeps_first_examples():
    with _mock():
        ds = data.load_dataset('cifar10', data_dir='/nonexistent', train_size=1_000)
        val = data.load_dataset('cifar10', data_dir='/nonexistent', validation=True, train_size=500)
    np.testing.assert_array_equal(_decode_index(ds.train.images), np.arange(1_000))
    assert ds.eval.num_examples == 2_000  # eval untouched
    np.testing.assert_array_equal(_decode_index(val.train.images), np.arange(500))
    np.testing.assert_array_equal(_decode_index(val.eval.images), np.arange(2_000, 12_000))


@pytest.mark.parametrize('k', [16, 64])
def test_num_classes_restricts_cifar100_to_first_classes(k):
    with _mock():
        ds = data.load_dataset('cifar100', data_dir='/nonexistent', num_classes=k, train_size=100)
        val = data.load_dataset('cifar100', data_dir='/nonexistent', num_classes=k, validation=True)
    assert ds.num_classes == k == val.num_classes
    all_train = np.arange(12_000)
    kept_train = all_train[_fake_label(all_train, 100) < k]
    all_test = np.arange(2_000)
    kept_test = all_test[_fake_label(all_test, 100) < k]
    # train_size applies after the class restriction: the first 100 kept examples.
    np.testing.assert_array_equal(_decode_index(ds.train.images), kept_train[:100])
    np.testing.assert_array_equal(ds.train.labels, _fake_label(kept_train[:100], 100))
    np.testing.assert_array_equal(_decode_index(ds.eval.images), kept_test)
    assert ds.eval.labels.max() < k and ds.train.labels.max() < k
    # Validation hold-out is taken BEFORE the restriction (last 10k of all 12k).
    np.testing.assert_array_equal(_decode_index(val.eval.images), kept_train[kept_train >= 2_000])
    np.testing.assert_array_equal(_decode_index(val.train.images), kept_train[kept_train < 2_000])


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'cifar100'])
def test_default_random_mock_data(name):
    # TFDS's own random mock generator (no custom as_dataset_fn).
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load_dataset(name, data_dir='/nonexistent', train_size=30)
    assert ds.train.images.shape == (30, *_SHAPES[name])
    assert ds.eval.images.shape == (40, *_SHAPES[name])
    for split in (ds.train, ds.eval):
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert 0 <= split.labels.min() and split.labels.max() < _NUM_CLASSES[name]


def test_select_classes_general_reindexing():
    images = np.arange(10)[:, None]
    labels = np.array([5, 1, 3, 7, 1, 0, 3, 5, 9, 7])
    kept_images, kept_labels = data.select_classes(images, labels, [7, 1, 5])
    np.testing.assert_array_equal(kept_images[:, 0], [0, 1, 3, 4, 7, 9])
    np.testing.assert_array_equal(kept_labels, [2, 1, 0, 1, 2, 0])
    with pytest.raises(ValueError, match='distinct'):
        data.select_classes(images, labels, [1, 1])


def test_apply_protocol_on_arrays():
    x = np.arange(25_000)
    y = x % 10
    (tx, ty), (ex, ey) = data.apply_protocol(x, y, None, None, validation=True, num_classes=4, train_size=7)
    np.testing.assert_array_equal(tx, [0, 1, 2, 3, 10, 11, 12])
    np.testing.assert_array_equal(ty, [0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(ex, x[15_000:][y[15_000:] < 4])


def test_validation_size_sets_the_hold_out():
    x = np.arange(100)
    (tx, _), (ex, _) = data.apply_protocol(x, x % 10, None, None, validation=True, validation_size=30)
    np.testing.assert_array_equal(tx, x[:70])
    np.testing.assert_array_equal(ex, x[70:])
    (tx, _), (ex, _) = data.apply_protocol(x, x % 10, x[:5], x[:5] % 10, validation_size=30)
    assert len(tx) == 100 and len(ex) == 5  # only validation=True holds out
    for bad in (0, 100, 2.5, True):
        with pytest.raises(ValueError, match='validation_size'):
            data.apply_protocol(x, x % 10, None, None, validation=True, validation_size=bad)


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        data.load_dataset('imagenet')
    for name in data.DATASETS:
        assert name in str(info.value)


def test_argument_errors():
    with _mock():
        with pytest.raises(ValueError, match=r'train_size=12001 but only 12000'):
            data.load_dataset('mnist', data_dir='/nonexistent', train_size=12_001)
        with pytest.raises(ValueError, match=r'train_size=3000 but only 2000'):
            data.load_dataset('mnist', data_dir='/nonexistent', validation=True, train_size=3_000)
        with pytest.raises(ValueError, match='num_classes'):
            data.load_dataset('cifar10', data_dir='/nonexistent', num_classes=11)
        with pytest.raises(ValueError, match='train_size'):
            data.load_dataset('mnist', data_dir='/nonexistent', train_size=0)
    with _mock(num_train=10_000):  # like cifar10_partial: exactly 10k training examples
        with pytest.raises(ValueError, match='only 10000'):
            data.load_dataset('cifar10_partial', data_dir='/nonexistent', validation=True)


@pytest.mark.parametrize('name', ['mnist', 'cifar10_partial', 'cifar100'])
def test_missing_dataset_says_how_to_prepare(tmp_path, name):
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.load_dataset(name, data_dir=str(tmp_path))
    message = str(info.value)
    assert f'python launch/prepare_data.py --dataset={name} --source_dir=' in message
    assert f'--data_dir={tmp_path}' in message
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / 'downloads').exists()  # no download attempted


# --------------------------------------------------------------------------------------------
# Augmentation.
# --------------------------------------------------------------------------------------------


def _coordinate_images(batch: int) -> np.ndarray:
    """Pixels encode (row + 1, col + 1, random), so a crop's offset and flip can be read off."""
    rows, cols = np.meshgrid(np.arange(32) + 1.0, np.arange(32) + 1.0, indexing='ij')
    images = np.zeros((batch, 32, 32, 3), np.float32)
    images[..., 0] = rows
    images[..., 1] = cols
    images[..., 2] = np.random.default_rng(1).uniform(0.1, 1.0, (batch, 32, 32))
    return images


def _reference_augment(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crop = padded[dy : dy + 32, dx : dx + 32]
    return crop[:, ::-1] if flip else crop


def test_augment_cifar_is_pad_crop_flip_per_image():
    images = _coordinate_images(2_000)
    out = np.asarray(jax.jit(data.augment_cifar)(jax.random.key(0), jnp.asarray(images)))
    assert out.shape == images.shape and out.dtype == np.float32
    # The centre pixels are inside the image for any offset: read off offset and flip.
    flips = out[:, 16, 17, 1] < out[:, 16, 16, 1]
    dys = (out[:, 16, 16, 0] - 1 - 16 + 4).astype(int)
    dxs = np.where(flips, out[:, 16, 16, 1] - 1 - 15, out[:, 16, 16, 1] - 1 - 16).astype(int) + 4
    for b in range(len(images)):
        np.testing.assert_array_equal(out[b], _reference_augment(images[b], dys[b], dxs[b], flips[b]))
    # Independent per image, and covering the whole range.
    assert 0.45 < flips.mean() < 0.55
    assert set(dys) == set(range(9)) and set(dxs) == set(range(9))
    assert (out == 0).all(axis=-1).any()  # some zero padding shows


def test_augment_cifar_determinism_and_jit():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 32, 32, 3)), jnp.float32)
    a = data.augment_cifar(jax.random.key(3), images)
    b = jax.jit(data.augment_cifar)(jax.random.key(3), images)
    c = data.augment_cifar(jax.random.key(4), images)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(images))
    # vmap over several keys (e.g. per-device), still one op per image.
    keys = jax.random.split(jax.random.key(5), 2)
    stacked = jax.jit(jax.vmap(data.augment_cifar, in_axes=(0, None)))(keys, images)
    assert stacked.shape == (2, *images.shape)


# --------------------------------------------------------------------------------------------
# Real data (prepared once per session by the `real_data_dir` fixture).
# --------------------------------------------------------------------------------------------


def _read_raw_idx(path: str, header: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def test_real_mnist(real_data_dir):
    ds = data.load_dataset('mnist', data_dir=real_data_dir)
    _check_split(ds.train, 60_000, (28, 28, 1), 10)
    _check_split(ds.eval, 10_000, (28, 28, 1), 10)
    np.testing.assert_array_equal(
        np.bincount(ds.train.labels), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )
    assert abs(ds.train.images.mean() - 0.1307) < 1e-4
    # Exactly the original files, in their original order.
    raw_train = _read_raw_idx(f'{MNIST_DIR}/train-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28, 1)
    raw_labels = _read_raw_idx(f'{MNIST_DIR}/train-labels-idx1-ubyte.gz', 8)
    raw_test = _read_raw_idx(f'{MNIST_DIR}/t10k-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.images, raw_train.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.train.labels, raw_labels)
    np.testing.assert_array_equal(ds.eval.images, raw_test.astype(np.float32) / 255)

    val = data.load_dataset('mnist', data_dir=real_data_dir, validation=True, train_size=1_000)
    np.testing.assert_array_equal(val.train.images, ds.train.images[:1_000])
    np.testing.assert_array_equal(val.eval.labels, raw_labels[50_000:])


def test_decoded_arrays_are_cached_and_invalidated_with_the_files(real_data_dir, tmp_path, monkeypatch):
    data_dir = str(tmp_path / 'tfds')
    shutil.copytree(
        os.path.join(real_data_dir, 'mnist'),
        os.path.join(data_dir, 'mnist'),
        ignore=shutil.ignore_patterns(data._ARRAY_CACHE),
    )
    reads = []
    read_split = data._read_split
    monkeypatch.setattr(data, '_read_split', lambda b, split: reads.append(split) or read_split(b, split))

    first = data.load_dataset('mnist', data_dir=data_dir)
    assert reads == ['train', 'test']
    cached = data.load_dataset('mnist', data_dir=data_dir)
    assert reads == ['train', 'test']  # served from the cache
    np.testing.assert_array_equal(cached.train.images, first.train.images)
    np.testing.assert_array_equal(cached.train.labels, first.train.labels)
    np.testing.assert_array_equal(cached.eval.images, first.eval.images)
    np.testing.assert_array_equal(cached.eval.labels, first.eval.labels)

    # Re-prepared (here: touched) files make the cache stale: it is not read again.
    builder = tfds.builder('mnist', data_dir=data_dir)
    shard = os.fspath(builder.info.splits['train'].filepaths[0])
    os.utime(shard, ns=(0, os.stat(shard).st_mtime_ns + 10**9))
    again = data.load_dataset('mnist', data_dir=data_dir, validation=True)
    assert reads == ['train', 'test', 'train']
    np.testing.assert_array_equal(again.eval.labels, first.train.labels[50_000:])


@pytest.mark.parametrize(
    'damage',
    [
        'truncate',
        pytest.param('overwrite', marks=pytest.mark.slow),
        pytest.param('empty', marks=pytest.mark.slow),
    ],
)
def test_a_corrupt_cache_is_rebuilt_with_a_warning(damage, real_data_dir, tmp_path, monkeypatch, caplog):
    """A truncated, overwritten or empty cache file: a warning naming it, the arrays read from the tfds files
    again, and a good cache written in its place (mutation caught: np.load without the guard raises)."""
    data_dir = str(tmp_path / 'tfds')
    shutil.copytree(
        os.path.join(real_data_dir, 'mnist'),
        os.path.join(data_dir, 'mnist'),
        ignore=shutil.ignore_patterns(data._ARRAY_CACHE),
    )
    first = data.load_dataset('mnist', data_dir=data_dir, validation=True)
    cache_dir = os.path.join(os.fspath(tfds.builder('mnist', data_dir=data_dir).data_path), data._ARRAY_CACHE)
    (name,) = os.listdir(cache_dir)
    path = os.path.join(cache_dir, name)
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        if damage == 'overwrite':
            f.seek(size // 2)
            f.write(b'\xff' * 4096)
        else:
            f.truncate(0 if damage == 'empty' else size // 2)
    reads = []
    read_split = data._read_split
    monkeypatch.setattr(data, '_read_split', lambda b, split: reads.append(split) or read_split(b, split))
    with caplog.at_level('WARNING'):
        again = data.load_dataset('mnist', data_dir=data_dir, validation=True)
    assert reads == ['train']
    assert any(path in r.getMessage() and 'corrupt' in r.getMessage() for r in caplog.records), caplog.text
    np.testing.assert_array_equal(again.train.images, first.train.images)
    np.testing.assert_array_equal(again.eval.labels, first.eval.labels)
    assert os.path.getsize(path) == size  # rebuilt
    data.load_dataset('mnist', data_dir=data_dir, validation=True)
    assert reads == ['train']  # and served from it again


def test_mock_data_is_never_cached():
    with _mock():
        builder = tfds.builder('mnist', data_dir='/nonexistent')
        assert data._split_fingerprint(builder, 'train') is None
        data.load_dataset('mnist', data_dir='/nonexistent')
        assert not os.path.exists(os.path.join(os.fspath(builder.data_path), data._ARRAY_CACHE))


def test_real_cifar10_partial(real_data_dir):
    ds = data.load_dataset('cifar10_partial', data_dir=real_data_dir)
    _check_split(ds.train, 10_000, (32, 32, 3), 10)
    _check_split(ds.eval, 10_000, (32, 32, 3), 10)
    with open(f'{CIFAR_DIR}/data_batch_1', 'rb') as f:
        train = pickle.load(f, encoding='latin1')
    with open(f'{CIFAR_DIR}/test_batch', 'rb') as f:
        test = pickle.load(f, encoding='latin1')
    np.testing.assert_array_equal(np.bincount(ds.train.labels), np.bincount(train['labels']))
    assert np.bincount(ds.train.labels)[:2].tolist() == [1005, 974]
    np.testing.assert_array_equal(np.bincount(ds.eval.labels), [1000] * 10)
    first = train['data'][0].reshape(3, 32, 32).transpose(1, 2, 0).astype(np.float32) / 255
    np.testing.assert_array_equal(ds.train.images[0], first)
    np.testing.assert_array_equal(ds.train.labels, train['labels'])
    np.testing.assert_array_equal(
        ds.eval.images, test['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
    )
    builder = tfds.builder('cifar10_partial', data_dir=real_data_dir)
    assert builder.info.metadata['train_batches'] == ['data_batch_1']
    assert 'PARTIAL' in builder.info.description

    small = data.load_dataset('cifar10_partial', data_dir=real_data_dir, train_size=1_000)
    np.testing.assert_array_equal(small.train.images, ds.train.images[:1_000])


def test_prepare_is_idempotent_and_checks_partial_batches(real_data_dir, tmp_path):
    assert prepare.prepare_dataset('mnist', source_dir=MNIST_DIR, data_dir=real_data_dir).endswith(
        os.path.join('mnist', '3.0.1')
    )
    # Same dir, but now "two" training batches are present: refuse to silently mix.
    for name, target in [
        ('data_batch_1', 'data_batch_1'),
        ('data_batch_2', 'data_batch_1'),
        ('test_batch', 'test_batch'),
    ]:
        os.symlink(f'{CIFAR_DIR}/{target}', tmp_path / name)
    with pytest.raises(ValueError, match='prepared from'):
        prepare.prepare_dataset('cifar10_partial', source_dir=str(tmp_path), data_dir=real_data_dir)


def test_prepare_mnist_rejects_wrong_or_missing_files(tmp_path):
    source = tmp_path / 'src'
    source.mkdir()
    for name in prepare.MNIST_FILES.values():
        shutil.copy(f'{MNIST_DIR}/{name}', source / name)
    with open(source / 't10k-labels-idx1-ubyte.gz', 'ab') as f:
        f.write(b'x')
    with pytest.raises(ValueError, match='sha256'):
        prepare.prepare_dataset('mnist', source_dir=str(source), data_dir=str(tmp_path / 'data'))
    os.remove(source / 't10k-labels-idx1-ubyte.gz')
    with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte.gz'):
        prepare.prepare_dataset('mnist', source_dir=str(source), data_dir=str(tmp_path / 'data'))
    with pytest.raises(ValueError, match='known datasets'):
        prepare.prepare_dataset('svhn', source_dir=str(source))


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    return magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape) + array.tobytes()


def test_prepare_fashion_mnist_from_regzipped_files(tmp_path):
    # Stand-in for Debian's dataset-fashion-mnist: the same four-file layout, gzipped differently
    # so the bytes (and checksums) differ from what TFDS expects. Content: the first MNIST images
    # (a subset keeps the test fast); one file left un-gzipped, which is accepted too.
    raw = {
        'train-images-idx3-ubyte.gz': _read_raw_idx(f'{MNIST_DIR}/train-images-idx3-ubyte.gz', 16).reshape(
            -1, 28, 28
        )[:1_200],
        'train-labels-idx1-ubyte.gz': _read_raw_idx(f'{MNIST_DIR}/train-labels-idx1-ubyte.gz', 8)[:1_200],
        't10k-images-idx3-ubyte.gz': _read_raw_idx(f'{MNIST_DIR}/t10k-images-idx3-ubyte.gz', 16).reshape(
            -1, 28, 28
        )[:300],
        't10k-labels-idx1-ubyte.gz': _read_raw_idx(f'{MNIST_DIR}/t10k-labels-idx1-ubyte.gz', 8)[:300],
    }
    source = tmp_path / 'src'
    source.mkdir()
    for name, array in raw.items():
        if name.startswith('t10k-labels'):
            (source / name.removesuffix('.gz')).write_bytes(_idx_bytes(array))
        else:
            (source / name).write_bytes(gzip.compress(_idx_bytes(array), compresslevel=1, mtime=0))
    data_dir = str(tmp_path / 'data')
    prepare.prepare_dataset('fashion_mnist', source_dir=str(source), data_dir=data_dir)
    ds = data.load_dataset('fashion_mnist', data_dir=data_dir)
    train_images = raw['train-images-idx3-ubyte.gz'][..., None].astype(np.float32) / 255
    np.testing.assert_array_equal(ds.train.images, train_images)
    np.testing.assert_array_equal(ds.train.labels, raw['train-labels-idx1-ubyte.gz'])
    np.testing.assert_array_equal(ds.eval.labels, raw['t10k-labels-idx1-ubyte.gz'])
    assert ds.eval.images.shape == (300, 28, 28, 1)


# --------------------------------------------------------------------------------------------
# Full CIFAR from python batches (tiny synthetic stand-ins for the real files).
# --------------------------------------------------------------------------------------------


def _write_pickle(path, obj) -> None:
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def _fake_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _fake_cifar10_python(root) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    batch_dir = root / 'cifar-10-batches-py'
    batch_dir.mkdir()
    rows, labels = [], []
    for name in [*cifar10_partial.CIFAR10_TRAIN_BATCHES, 'test_batch']:
        r, y = _fake_rows(rng, 4), rng.integers(0, 10, 4).tolist()
        _write_pickle(batch_dir / name, {'data': r, 'labels': y, 'batch_label': name})
        rows.append(r)
        labels.append(y)
    _write_pickle(batch_dir / 'batches.meta', {'label_names': list(cifar10_partial.CIFAR10_LABEL_NAMES)})
    return np.concatenate(rows), np.concatenate(labels)


def _nhwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255


def test_prepare_cifar10_from_python_batches_via_cli(tmp_path):
    rows, labels = _fake_cifar10_python(tmp_path)
    data_dir = tmp_path / 'data'
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, 'launch', 'prepare_data.py'),
            '--dataset=cifar10',
            f'--source_dir={tmp_path}',
            f'--data_dir={data_dir}',
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'cifar10 is prepared in' in result.stdout
    ds = data.load_dataset('cifar10', data_dir=str(data_dir))
    np.testing.assert_array_equal(ds.train.images, _nhwc(rows[:20]))
    np.testing.assert_array_equal(ds.train.labels, labels[:20])
    np.testing.assert_array_equal(ds.eval.images, _nhwc(rows[20:]))
    np.testing.assert_array_equal(ds.eval.labels, labels[20:])


def test_prepare_cifar100_from_python_files(tmp_path):
    rng = np.random.default_rng(1)
    batch_dir = tmp_path / 'cifar-100-python'
    batch_dir.mkdir()
    content = {}
    for name, n in [('train', 30), ('test', 6)]:
        fine = rng.integers(0, 100, n)
        content[name] = (_fake_rows(rng, n), fine)
        _write_pickle(
            batch_dir / name,
            {'data': content[name][0], 'fine_labels': fine.tolist(), 'coarse_labels': (fine // 5).tolist()},
        )
    _write_pickle(
        batch_dir / 'meta',
        {
            'fine_label_names': [f'f{i}' for i in range(100)],
            'coarse_label_names': [f'c{i}' for i in range(20)],
        },
    )
    data_dir = str(tmp_path / 'data')
    prepare.prepare_dataset('cifar100', source_dir=str(batch_dir), data_dir=data_dir)
    ds = data.load_dataset('cifar100', data_dir=data_dir)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.train.images, _nhwc(content['train'][0]))
    np.testing.assert_array_equal(ds.train.labels, content['train'][1])
    np.testing.assert_array_equal(ds.eval.labels, content['test'][1])
    k16 = data.load_dataset('cifar100', data_dir=data_dir, num_classes=16)
    keep = content['train'][1] < 16
    np.testing.assert_array_equal(k16.train.labels, content['train'][1][keep])
    np.testing.assert_array_equal(k16.train.images, _nhwc(content['train'][0][keep]))


def test_standardized_uses_the_training_statistics_for_both_splits():
    rng = np.random.default_rng(0)
    train = rng.uniform(0.2, 0.9, (50, 4, 4, 1)).astype(np.float32)
    test = rng.uniform(0.0, 1.0, (20, 4, 4, 1)).astype(np.float32)
    labels = lambda n: np.zeros(n, np.int32)
    dataset = data.Dataset(
        train=data.Split(train, labels(50)), eval=data.Split(test, labels(20)), num_classes=10, name='mnist'
    )
    out = data.standardized(dataset)
    m, s = train.astype(np.float64).mean(), train.astype(np.float64).std()
    np.testing.assert_allclose(out.train.images, (train - m) / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.eval.images, (test - m) / s, rtol=1e-5, atol=1e-6)
    assert out.train.images.dtype == np.float32
    constant = data.Dataset(
        train=data.Split(np.ones_like(train), labels(50)), eval=dataset.eval, num_classes=10, name='mnist'
    )
    with pytest.raises(ValueError, match='constant'):
        data.standardized(constant)
