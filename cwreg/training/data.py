"""Datasets of the paper (MNIST, CIFAR-10, CIFAR-100), its evaluation protocol, augmentation.

Choi & Rhee (AAAI 2019), suppl. A.1: the penalty weight is selected on a validation split made of
the LAST 10,000 examples of the training set; the final runs train on the whole training set
(validation examples merged back) and report test performance. The "number of classes" scenario
restricts CIFAR-100 to its first k classes (k = 16, 64) and the "data size" scenario keeps the
first n training examples (n = 1k, 5k).

MNIST note: A.1 states the merge-back for CIFAR only, and Table 7 gives MNIST's default data size
as 50k, i.e. the 60k training images minus the 10k validation hold-out. Final MNIST runs matching
that use `load_dataset('mnist', train_size=50_000)`: the same first 50k images, test evaluation.

`load_dataset` returns numpy arrays in host memory:

* images: (N, H, W, C) float32, the uint8 pixels divided by 255, so in [0, 1]. No mean/std
  normalization or whitening is applied (the paper describes none); models that want it
  must do it themselves.
* labels: (N,) int32 in [0, num_classes).

"First" and "last" refer to the datasets' ORIGINAL order (the order of the distributed
files). TFDS stores MNIST / Fashion-MNIST / CIFAR examples permuted by a hash of their index;
`load_dataset` undoes that permutation (CIFAR: from the `id` feature, MNIST: by recomputing TFDS's
deterministic md5-of-index order), so the splits are the paper's, the same however the dataset was
prepared, and `cifar10_partial`'s first 1k / 5k images are exactly CIFAR-10's.

Datasets are read with TFDS from a prepared `data_dir`; machines here are offline, so prepare
them first with `launch/prepare_data.py` (see `cwreg.training.prepare`); a missing dataset raises
`DatasetNotPreparedError` with the exact command.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import logging
import os
import socket
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

# TensorFlow only reads data here; its C++ start-up INFO lines are noise for our users.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
import tensorflow_datasets as tfds

from cwreg import names
from cwreg.training import cifar10_partial as _cifar10_partial  # noqa: F401  (registers the builder)

DATASETS: tuple[str, ...] = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'cifar10_partial')

# Classes of each dataset, known without reading it (so configs can be checked before loading).
NUM_CLASSES: dict[str, int] = {
    'mnist': 10,
    'fashion_mnist': 10,
    'cifar10': 10,
    'cifar100': 100,
    'cifar10_partial': 10,
}

VALIDATION_SIZE = names.VALIDATION_SIZE  # the default hold-out of validation=True

# Examples per tf.data batch when reading a split into memory. Not `batch_size=-1`: that aborts
# the process under `tfds.testing.mock_data` (TFDS 4.9.10).
_READ_BATCH = 10_000

# Decoded splits are kept next to TFDS's files (`<data_dir>/<name>/<version>/cwreg_arrays/`): decoding
# MNIST's 70,000 PNGs through tf.data takes ~7 s, reading the arrays back ~0.1 s.
_ARRAY_CACHE = 'cwreg_arrays'

# Where the project machines keep the original files; only used to fill in error messages.
_KNOWN_SOURCE_DIRS: dict[str, str] = {
    'mnist': '/work/shared/data/mnist',
    'cifar10_partial': '/work/shared/data/cifar10-partial/cifar-10-batches-py',
}

# Datasets whose TFDS builder keys examples by their index in the original files but stores no
# index feature: the original order is recovered from TFDS's hash order (see `_tfds_stored_keys`).
_INDEX_KEYED_WITHOUT_ID = ('mnist', 'fashion_mnist')


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset is not prepared in the data_dir (and we do not download)."""


# eq=False: field-wise == on numpy arrays is ambiguous; compare the arrays explicitly instead.
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split in host memory.

    Attributes:
      images: (N, H, W, C) float32 in [0, 1].
      labels: (N,) int32 in [0, num_classes).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(
                f'images must be (N, H, W, C) float32, got {self.images.shape} {self.images.dtype}.'
            )
        if self.labels.ndim != 1 or self.labels.dtype != np.int32:
            raise ValueError(f'labels must be (N,) int32, got {self.labels.shape} {self.labels.dtype}.')
        if len(self.images) != len(self.labels):
            raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels.')

    @property
    def num_examples(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset under the paper's protocol.

    Attributes:
      train: the training split.
      eval: the test split, or the validation split (the last `validation_size` training examples)
        when loaded with `validation=True`.
      num_classes: number of classes (after `num_classes` restriction).
      name: the TFDS name.
    """

    train: Split
    eval: Split
    num_classes: int
    name: str


# --------------------------------------------------------------------------------------------
# The protocol, on plain arrays.
# --------------------------------------------------------------------------------------------


def select_classes(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the examples of `classes` and re-indexes their labels to 0..len(classes)-1.

    Args:
      images: (N, ...) any dtype.
      labels: (N,) integer labels.
      classes: distinct original labels to keep; `classes[i]` becomes label `i`.

    Returns:
      `(images[keep], new_labels)` with the original example order preserved.
    """
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 1 or len(np.unique(classes)) != len(classes):
        raise ValueError(f'classes must be distinct labels, got {classes.tolist()}.')
    labels = np.asarray(labels)
    keep = np.isin(labels, classes)
    kept = labels[keep]
    table = np.zeros(max(int(classes.max(initial=0)), int(kept.max(initial=0))) + 1, labels.dtype)
    table[classes] = np.arange(len(classes))
    return images[keep], table[kept]


def apply_protocol(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray | None,
    test_labels: np.ndarray | None,
    *,
    validation: bool = False,
    validation_size: int = VALIDATION_SIZE,
    train_size: int | None = None,
    num_classes: int | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The paper's split protocol (suppl. A.1), on arrays in original example order.

    1. `validation=True`: eval = the last `validation_size` training examples, train = the rest.
       `validation=False`: eval = the test split, train = the whole training split.
    2. `num_classes=k`: both splits keep only labels < k (re-indexed in order, a no-op for
       0..k-1).
    3. `train_size=n`: train keeps its first n remaining examples.

    Args:
      train_images, train_labels: the full training split, (N, ...) and (N,).
      test_images, test_labels: the test split; unused (may be None) when `validation=True`.
      validation: evaluate on the validation hold-out instead of the test split.
      validation_size: how many of the last training examples the hold-out takes (the paper: 10,000).
      train_size: number of training examples to keep, or None for all.
      num_classes: number of leading classes to keep, or None for all.

    Returns:
      `((train_images, train_labels), (eval_images, eval_labels))`.
    """
    n_full = len(train_labels)
    if validation:
        if isinstance(validation_size, bool) or not isinstance(validation_size, (int, np.integer)):
            raise ValueError(f'validation_size must be an int >= 1, got {validation_size!r}.')
        if not 1 <= validation_size < n_full:
            raise ValueError(
                f'validation=True holds out the last {validation_size} training examples, but the '
                f'training split has only {n_full}: validation_size must be in [1, {n_full - 1}] (or use '
                'validation=False to evaluate on the test split).'
            )
        cut = n_full - validation_size
        train = (train_images[:cut], train_labels[:cut])
        evaluation = (train_images[cut:], train_labels[cut:])
    else:
        if test_images is None or test_labels is None:
            raise ValueError('validation=False needs the test split.')
        train = (train_images, train_labels)
        evaluation = (test_images, test_labels)

    if num_classes is not None:
        train = select_classes(*train, range(num_classes))
        evaluation = select_classes(*evaluation, range(num_classes))

    if train_size is not None:
        available = len(train[1])
        if train_size > available:
            raise ValueError(
                f'train_size={train_size} but only {available} training examples are available '
                f'(validation={validation}, num_classes={num_classes}).'
            )
        train = (train[0][:train_size], train[1][:train_size])
    return train, evaluation


# --------------------------------------------------------------------------------------------
# Reading TFDS.
# --------------------------------------------------------------------------------------------


@functools.cache
def _tf_without_gpus() -> None:
    # TF only feeds numpy here; keep it off the accelerators JAX uses.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        tf.config.experimental.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF already initialized its devices; nothing to do then.
        pass


def preparation_instructions(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    """The message of `DatasetNotPreparedError`: how to prepare `name` offline."""
    from cwreg.training import prepare  # pylint: disable=g-import-not-at-top

    shown_data_dir = os.fspath(data_dir) if data_dir is not None else 'DATA_DIR'
    known = _KNOWN_SOURCE_DIRS.get(name)
    source_dir = known if known and os.path.isdir(known) else 'SOURCE_DIR'
    lines = [
        f'Dataset {name!r} is not prepared in TFDS data_dir {shown_data_dir!r}. The machines are '
        'offline, so prepare it once from local copies of the original files:',
        '',
        f'  python launch/prepare_data.py --dataset={name} --source_dir={source_dir} '
        f'--data_dir={shown_data_dir}',
        '',
        f'where --source_dir holds {prepare.SOURCE_DESCRIPTIONS[name]}.',
    ]
    if name in ('cifar10', 'cifar100'):
        lines.append(
            'Full CIFAR is not on the project machines; cifar10_partial (first 10k CIFAR-10 '
            'training images + full test set) is.'
        )
    if name != 'cifar10_partial':
        lines.append(
            'With internet access, load_dataset(..., download=True) lets TFDS download '
            'and prepare it instead.'
        )
    return '\n'.join(lines)


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """Reads a whole split, in stored order, as numpy arrays (uint8 images, int64 labels)."""
    keys = [k for k in ('id', 'image', 'label') if k in builder.info.features]
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        # One file at a time, in order: the stored order is what `_original_order` inverts.
        read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
    )
    ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(_READ_BATCH)
    chunks = list(tfds.as_numpy(ds))
    if not chunks:
        raise ValueError(f'{builder.name} split {split!r} is empty.')
    return {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def _split_fingerprint(builder: tfds.core.DatasetBuilder, split: str) -> str | None:
    """Names, sizes and mtimes of a prepared split's local files; None unless all of them are on disk.

    None under `tfds.testing.mock_data` too (its data_dir holds metadata only), so mock examples never
    reach the cache.
    """
    try:
        paths = [os.fspath(p) for p in builder.info.splits[split].filepaths]
    except (KeyError, ValueError):
        return None
    if not paths or not all(os.path.isfile(p) for p in paths):
        return None
    stats = [(os.path.basename(p), os.stat(p)) for p in paths]
    text = '|'.join(f'{name}:{st.st_size}:{st.st_mtime_ns}' for name, st in stats)
    return hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]


def _read_original_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """A whole split's images and labels in original order, through the decoded-array cache if local."""

    def read() -> dict[str, np.ndarray]:
        arrays = _original_order(builder, split, _read_split(builder, split))
        return {'image': arrays['image'], 'label': arrays['label']}

    fingerprint = _split_fingerprint(builder, split)
    if fingerprint is None:
        return read()
    path = os.path.join(os.fspath(builder.data_path), _ARRAY_CACHE, f'{split}-{fingerprint}.npz')
    if os.path.isfile(path):
        cached = _read_cache(path)
        if cached is not None:
            return cached
    arrays = read()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f'{path}.{os.getpid()}.tmp.npz'
        np.savez(partial, **arrays)
        os.replace(partial, path)  # atomic: concurrent readers see the whole file or none
    except OSError as e:  # a read-only data_dir still works, just without the cache
        logging.warning('Not caching decoded %s/%s arrays at %s: %s', builder.name, split, path, e)
    return arrays


def _read_cache(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of a decoded-split cache file; None (with a warning, the file removed) if it is corrupt."""
    try:
        with np.load(path) as cached:
            arrays = {k: cached[k] for k in cached.files}
        if set(arrays) != {'image', 'label'} or len(arrays['image']) != len(arrays['label']):
            raise ValueError(
                f'holds {sorted(arrays)} with lengths {[len(v) for v in arrays.values()]}, not '
                'images and labels of one split'
            )
        return arrays
    # What np.load raises for truncated or overwritten files (zipfile.BadZipFile is no OSError/ValueError).
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        logging.warning(
            'Decoded-array cache %s is corrupt (%s: %s); rebuilding it from the tfds files.',
            path,
            type(e).__name__,
            e,
        )
        try:
            os.remove(path)
        except OSError:
            pass
        return None


def _tfds_stored_keys(split: str, num_examples: int) -> np.ndarray:
    """The generation keys (here: original indices) in the order TFDS stored them.

    TFDS's writer sorts examples by `int(md5(split_name + str(key)).hexdigest(), 16)`
    (`tensorflow_datasets/core/hashing.py`, `shuffle.py`): a stable hash, so that the same
    dataset version is stored in the same order everywhere. Checked against the raw MNIST files
    in tests/test_data.py; a TFDS release that changed this hash would break that test.
    """
    salted = hashlib.md5(split.encode('utf-8'))

    def digest(key: int) -> bytes:
        h = salted.copy()
        h.update(str(key).encode('utf-8'))
        return h.digest()  # big-endian bytes: same order as the integer TFDS compares

    return np.array(sorted(range(num_examples), key=digest), dtype=np.int64)


def _original_order(
    builder: tfds.core.DatasetBuilder, split: str, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Permutes a split read in stored order back into the original file order."""
    n = len(arrays['label'])
    if 'id' in arrays:
        # CIFAR ids are 'train_%05d' / 'test_%05d' indices: lexicographic = original order.
        perm = np.argsort(arrays['id'], kind='stable')
    elif builder.name in _INDEX_KEYED_WITHOUT_ID and not builder.info.disable_shuffling:
        stored_keys = _tfds_stored_keys(split, n)
        perm = np.empty(n, dtype=np.int64)
        perm[stored_keys] = np.arange(n)  # original index -> stored position
    else:
        return arrays
    return {k: v[perm] for k, v in arrays.items()}


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    floats = images.astype(np.float32)
    floats /= 255.0
    return Split(images=floats, labels=labels.astype(np.int32))


def _online(host: str = 'storage.googleapis.com') -> bool:
    """Whether the download host resolves: offline, TFDS would spend minutes retrying before failing."""
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


# Over 60 lines only by its docstring (each argument and the protocol): the code itself is under 60.
def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    validation: bool = False,
    validation_size: int = VALIDATION_SIZE,
    train_size: int | None = None,
    num_classes: int | None = None,
    download: bool = False,
) -> Dataset:
    """Loads a prepared TFDS dataset under the paper's protocol (see `apply_protocol`).

    Args:
      name: one of `DATASETS`.
      data_dir: TFDS data dir; None for TFDS's default (`$TFDS_DATA_DIR`, `~/tensorflow_datasets`).
      validation: if True, `eval` is the last `validation_size` training examples and `train` the rest
        (for hyper-parameter selection); else `eval` is the test split and `train` all training data.
      validation_size: the hold-out of `validation=True` (the paper's 10,000; ignored otherwise).
      train_size: keep the first `train_size` training examples (after the class restriction).
      num_classes: keep only the classes 0..num_classes-1, in both splits.
      download: if the dataset is not prepared and the download host resolves, let TFDS download and
        prepare it. Otherwise a missing dataset raises `DatasetNotPreparedError` saying how to prepare it
        from local files with `launch/prepare_data.py`.

    Returns:
      The `Dataset`: float32 NHWC images in [0, 1], int32 labels, in original example order.
    """
    if name not in DATASETS:
        raise ValueError(f'Unknown dataset {name!r}; valid names: {", ".join(DATASETS)}.')
    if train_size is not None and (isinstance(train_size, bool) or train_size < 1):
        raise ValueError(f'train_size must be a positive int or None, got {train_size!r}.')
    _tf_without_gpus()

    builder = tfds.builder(name, data_dir=data_dir)
    if download and not builder.is_prepared() and _online():
        try:
            builder.download_and_prepare()
        except Exception as e:  # pylint: disable=broad-except  (offline: DNS, connection, checksum errors)
            raise DatasetNotPreparedError(
                f'Downloading {name} failed ({type(e).__name__}: {e}). '
                + preparation_instructions(name, data_dir if data_dir is not None else builder.data_dir_root)
            ) from e
    total_classes = builder.info.features['label'].num_classes
    if num_classes is not None and not 2 <= num_classes <= total_classes:
        raise ValueError(f'num_classes must be in [2, {total_classes}] for {name}, got {num_classes}.')

    try:
        train = _read_original_split(builder, 'train')
    except AssertionError as e:  # TFDS's "could not find data in <data_dir>"
        if builder.data_path.exists():
            raise
        raise DatasetNotPreparedError(
            preparation_instructions(name, data_dir if data_dir is not None else builder.data_dir_root)
        ) from e
    if validation:
        test_images = test_labels = None
    else:
        test = _read_original_split(builder, 'test')
        test_images, test_labels = test['image'], test['label']

    (train_x, train_y), (eval_x, eval_y) = apply_protocol(
        train['image'],
        train['label'],
        test_images,
        test_labels,
        validation=validation,
        validation_size=validation_size,
        train_size=train_size,
        num_classes=num_classes,
    )
    return Dataset(
        train=_to_split(train_x, train_y),
        eval=_to_split(eval_x, eval_y),
        num_classes=num_classes if num_classes is not None else total_classes,
        name=name,
    )


def standardized(dataset: Dataset) -> Dataset:
    """`dataset` with both splits mapped to (x − m) / s, m and s the training split's pixel mean and std.

    One scalar pair over all pixels and channels, as in the common "normalize MNIST by 0.1307/0.3081"
    recipe; the evaluation split reuses the training statistics, so nothing of it leaks into training.
    """
    mean = float(np.mean(dataset.train.images, dtype=np.float64))
    std = float(np.std(dataset.train.images, dtype=np.float64))
    if not std > 0:
        raise ValueError(f'Cannot standardize {dataset.name}: its training images are constant.')
    scale = lambda split: Split(
        images=((split.images - np.float32(mean)) / np.float32(std)).astype(np.float32), labels=split.labels
    )
    return dataclasses.replace(dataset, train=scale(dataset.train), eval=scale(dataset.eval))


# --------------------------------------------------------------------------------------------
# Augmentation.
# --------------------------------------------------------------------------------------------


def augment_cifar(rng: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Standard CIFAR augmentation (He et al., 2016, sec. 4.2): pad, random crop, random flip.

    Each image independently: zero-pad `padding` pixels on every side, take a random crop of the
    original size (offsets uniform in {0, ..., 2 * padding} on each axis), and flip it horizontally
    with probability 1/2. Our images are in [0, 1] without mean subtraction, so the padding is
    black. Vectorized (no per-image Python loop); jit- and vmap-friendly.

    Args:
      rng: a PRNG key.
      images: (B, H, W, C) batch.
      padding: pixels of zero padding per side (4 in He et al.).

    Returns:
      (B, H, W, C) augmented batch, same dtype.
    """
    if images.ndim != 4:
        raise ValueError(f'images must be (B, H, W, C), got shape {images.shape}.')
    batch, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * padding + 1)

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_rng, 0.5, (batch,))
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)
