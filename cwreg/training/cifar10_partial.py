"""`cifar10_partial`: a TFDS dataset built from whichever original CIFAR-10 batches are at hand.

The full CIFAR-10 (Krizhevsky, 2009) ships as five 10,000-image training batches plus a test
batch in the original python-pickle format (`cifar-10-batches-py/`). Offline machines sometimes
hold only some of them (here: `data_batch_1` and `test_batch`). This builder turns the batches
present in the manual directory into a normal TFDS dataset, so the ordinary loading code
(`cwreg.training.data.load_dataset('cifar10_partial')`) runs on them. It is deliberately *not* called
`cifar10`: results on it are not CIFAR-10 results.

Layout of the prepared dataset:

* `train`: the present `data_batch_k` files concatenated in increasing `k`, each in its original
  order. `data_batch_1` alone is the first 10,000 images of the full training set, so its first
  1k / 5k images are exactly the paper's 1k / 5k data-size subsets of CIFAR-10.
* `test`: the original `test_batch` (required).
* features: `id` (`'train_%05d'` / `'test_%05d'`, the index in the *full* CIFAR-10 split, the same
  ids as TFDS's own `cifar10`), `image` (32, 32, 3) uint8, `label` (10 classes).
* `info.metadata`: `train_batches` (the file names used, in order), `num_train_examples`.
* Examples are stored in that order (`disable_shuffling=True`).

Prepare it with
`python launch/prepare_data.py --dataset=cifar10_partial --source_dir=DIR --data_dir=DATA_DIR`
where `DIR` holds the `data_batch_*` / `test_batch` files (or their `cifar-10-batches-py/` parent).

Importing this module registers the builder with TFDS (`cwreg.training.data` does that).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import os
import pickle
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

CIFAR_IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
CIFAR10_LABEL_NAMES: tuple[str, ...] = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)
CIFAR10_TRAIN_BATCHES: tuple[str, ...] = tuple(f'data_batch_{k}' for k in range(1, 6))
CIFAR10_TEST_BATCH = 'test_batch'
CIFAR10_BATCH_SIZE = 10_000
CIFAR10_PYTHON_DIRNAME = 'cifar-10-batches-py'

_NUM_PIXELS = 32 * 32 * 3


def load_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads one original CIFAR python batch (`pickle.load(f, encoding='latin1')`).

    The files are trusted local data (pickle executes code from untrusted files).

    Args:
      path: a CIFAR-10 `data_batch_k` / `test_batch` or CIFAR-100 `train` / `test` file.

    Returns:
      The raw dict; for a data batch `'data'` (N, 3072) uint8 in CHW order plus the label lists,
      for `batches.meta` / `meta` the label names.
    """
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    if not isinstance(batch, dict):
        raise ValueError(f'{path} is not an original CIFAR python file (not a dict).')
    return batch


def cifar_images_nhwc(data: np.ndarray) -> np.ndarray:
    """Converts the original row layout to images.

    Args:
      data: (N, 3072) uint8; each row is the 1024 red, then 1024 green, then 1024 blue pixels,
        each plane row-major.

    Returns:
      (N, 32, 32, 3) uint8, i.e. `data.reshape(N, 3, 32, 32).transpose(0, 2, 3, 1)`.
    """
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _NUM_PIXELS:
        raise ValueError(f'Expected (N, {_NUM_PIXELS}) uint8 CIFAR rows, got {data.shape} {data.dtype}.')
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_cifar_batch(
    path: str | os.PathLike[str], label_keys: Sequence[str] = ('labels',)
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reads a CIFAR python batch into NHWC images and int64 label arrays.

    Args:
      path: the batch file.
      label_keys: pickle keys of the label lists (`('labels',)` for CIFAR-10,
        `('fine_labels', 'coarse_labels')` for CIFAR-100).

    Returns:
      `(images, labels)`: (N, 32, 32, 3) uint8 and `{key: (N,) int64}`.
    """
    batch = load_cifar_pickle(path)
    if 'data' not in batch:
        raise ValueError(f'{path} is not a CIFAR python data batch (no "data" key).')
    images = cifar_images_nhwc(batch['data'])
    labels = {}
    for key in label_keys:
        if key not in batch:
            raise ValueError(f'{path} has no "{key}" key (keys: {sorted(batch)}).')
        labels[key] = np.asarray(batch[key], dtype=np.int64)
        if labels[key].shape != (len(images),):
            raise ValueError(f'{path}: {len(images)} images but {labels[key].shape} "{key}".')
    return images, labels


def find_batch_dir(source_dir: str | os.PathLike[str], marker: str, subdir: str) -> str:
    """Returns `source_dir` or its `subdir` child, whichever contains the file `marker`."""
    source_dir = os.path.expanduser(os.fspath(source_dir))
    for candidate in (source_dir, os.path.join(source_dir, subdir)):
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    raise FileNotFoundError(
        f'No "{marker}" in {source_dir} or {os.path.join(source_dir, subdir)}: expected the '
        f'original CIFAR python-pickle batches (the extracted "{subdir}/" folder).'
    )


def present_train_batches(batch_dir: str | os.PathLike[str]) -> list[str]:
    """The CIFAR-10 `data_batch_k` files present in `batch_dir`, in increasing `k`."""
    return [b for b in CIFAR10_TRAIN_BATCHES if os.path.isfile(os.path.join(batch_dir, b))]


class Cifar10Partial(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 restricted to the original python batches present at preparation time."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES: Mapping[str, str] = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Place the original CIFAR-10 python batches (any of data_batch_1 .. data_batch_5, plus '
        'test_batch) in the manual dir, or run `python launch/prepare_data.py '
        '--dataset=cifar10_partial --source_dir=DIR --data_dir=DATA_DIR`.'
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                'PARTIAL CIFAR-10: the train split is the concatenation, in order, of whichever '
                'original CIFAR-10 training batches (data_batch_1..5, 10,000 images each) were present '
                'at preparation time; info.metadata["train_batches"] lists them. The test split is '
                'the full original test_batch. Not the full CIFAR-10: do not report results on it as '
                'CIFAR-10 results. Ids are the indices in the full CIFAR-10 splits.'
            ),
            features=tfds.features.FeaturesDict(
                {
                    'id': tfds.features.Text(),
                    'image': tfds.features.Image(shape=CIFAR_IMAGE_SHAPE),
                    'label': tfds.features.ClassLabel(names=list(CIFAR10_LABEL_NAMES)),
                }
            ),
            supervised_keys=('image', 'label'),
            homepage='https://www.cs.toronto.edu/~kriz/cifar.html',
            citation=(
                '@techreport{krizhevsky2009learning, title={Learning Multiple Layers of Features '
                'from Tiny Images}, author={Krizhevsky, Alex}, year={2009}}'
            ),
            # The point of this dataset is "the first n images of CIFAR-10": keep file order.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        batch_dir = find_batch_dir(dl_manager.manual_dir, CIFAR10_TEST_BATCH, CIFAR10_PYTHON_DIRNAME)
        train_batches = present_train_batches(batch_dir)
        if not train_batches:
            raise FileNotFoundError(
                f'No CIFAR-10 training batch ({", ".join(CIFAR10_TRAIN_BATCHES)}) in {batch_dir}.'
            )
        self.info.metadata['train_batches'] = list(train_batches)
        self.info.metadata['num_train_examples'] = CIFAR10_BATCH_SIZE * len(train_batches)
        return {
            'train': self._generate_examples(batch_dir, train_batches, 'train'),
            'test': self._generate_examples(batch_dir, [CIFAR10_TEST_BATCH], 'test'),
        }

    def _generate_examples(
        self, batch_dir: str, batch_names: Sequence[str], split: str
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        key = 0
        for name in batch_names:
            images, labels = read_cifar_batch(os.path.join(batch_dir, name))
            if len(images) != CIFAR10_BATCH_SIZE:
                raise ValueError(f'{name}: {len(images)} images, expected {CIFAR10_BATCH_SIZE}.')
            # Index in the full CIFAR-10 split: data_batch_k holds images (k-1)*10000 .. k*10000-1.
            offset = (int(name.rsplit('_', 1)[1]) - 1) * CIFAR10_BATCH_SIZE if split == 'train' else 0
            for i, (image, label) in enumerate(zip(images, labels['labels'])):
                # With disable_shuffling the key fixes the stored order: keep it increasing.
                yield key, {'id': f'{split}_{offset + i:05d}', 'image': image, 'label': int(label)}
                key += 1
