"""Offline preparation of the TFDS datasets from local copies of the original files.

TFDS normally downloads the original archives and converts them ("prepares" them) into its own
record files under `data_dir`. Our machines are offline, so `prepare_dataset` does the
conversion from files that are already on disk; afterwards `cwreg.training.data.load_dataset` reads the
prepared dataset exactly as if TFDS had downloaded it.

| dataset | `source_dir` holds | how |
|---|---|---|
| `mnist` | the 4 original IDX `.gz` files | staged as TFDS downloads (sha256-checked), TFDS's own builder |
| `fashion_mnist` | the 4 IDX files (`.gz` or not) | as `mnist` if byte-identical to the originals, else a local builder reading them (e.g. Debian's re-gzipped copies) |
| `cifar10` | `cifar-10-binary.tar.gz`, or the python batches (`cifar-10-batches-py/`) | TFDS's builder on the tarball, else a local builder on the batches |
| `cifar100` | `cifar-100-binary.tar.gz`, or `cifar-100-python/` (`train`, `test`, `meta`) | same |
| `cifar10_partial` | any of `data_batch_1..5` plus `test_batch` | `cwreg.training.cifar10_partial` builder |

Every route writes the same dataset name, version, features and example order as TFDS's own
preparation, so a dataset prepared here and one TFDS downloaded are interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import gzip
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import resource as tfds_resource
from tensorflow_datasets.image_classification import cifar as tfds_cifar
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from cwreg.training import cifar10_partial

PREPARABLE: tuple[str, ...] = ('mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'cifar10_partial')

MNIST_FILES: dict[str, str] = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}

# What `source_dir` must hold, per dataset (used in error messages here and in cwreg.training.data).
SOURCE_DESCRIPTIONS: dict[str, str] = {
    'mnist': 'the four original MNIST IDX files ' + ', '.join(MNIST_FILES.values()),
    'fashion_mnist': (
        'the four Fashion-MNIST IDX files '
        + ', '.join(MNIST_FILES.values())
        + ' (gzipped or not; e.g. from the Debian package dataset-fashion-mnist)'
    ),
    'cifar10': (
        'either cifar-10-binary.tar.gz (the archive TFDS downloads) or the extracted python '
        'batches cifar-10-batches-py/ (data_batch_1..5, test_batch); extract '
        'cifar-10-python.tar.gz with `tar xzf` first'
    ),
    'cifar100': (
        'either cifar-100-binary.tar.gz (the archive TFDS downloads) or the extracted python '
        'files cifar-100-python/ (train, test, meta); extract cifar-100-python.tar.gz first'
    ),
    'cifar10_partial': (
        'any of the original CIFAR-10 python batches data_batch_1..5 plus test_batch '
        '(a cifar-10-batches-py/ folder, possibly incomplete)'
    ),
}

_IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension


def _download_config(source_dir: str | None = None) -> tfds.download.DownloadConfig:
    # Never look for a pre-built copy on GCS: we are offline and want a local, checked build.
    return tfds.download.DownloadConfig(manual_dir=source_dir, try_download_gcs=False)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, the checksum TFDS records for its downloads."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format), gzipped or not.

    Args:
      path: the file.
      expected_magic: `0x803` for an image file (N, rows, cols), `0x801` for a label file (N,).

    Returns:
      The uint8 array; images get a trailing channel axis, (N, 28, 28, 1).
    """
    with open(path, 'rb') as f:
        raw = f.read()
    if raw[:2] == b'\x1f\x8b':
        raw = gzip.decompress(raw)
    magic = int.from_bytes(raw[:4], 'big')
    if magic != expected_magic:
        raise ValueError(f'{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}.')
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f'{path}: header says {shape} but holds {data.size} bytes.')
    data = data.reshape(shape)
    return data[..., None] if ndim == 3 else data


# --------------------------------------------------------------------------------------------
# Route 1: the original archives, staged where TFDS would have downloaded them.
# --------------------------------------------------------------------------------------------


def _find_source_file(source_dir: str, filename: str) -> str | None:
    path = os.path.join(source_dir, filename)
    return path if os.path.isfile(path) else None


def has_original_downloads(builder: tfds.core.DatasetBuilder, source_dir: str) -> bool:
    """Whether `source_dir` holds every file TFDS would download for `builder`, unmodified."""
    for url_info in builder.url_infos.values():
        path = _find_source_file(source_dir, url_info.filename)
        if path is None or os.path.getsize(path) != int(url_info.size):
            return False
        if sha256_of(path) != url_info.checksum:
            return False
    return True


def stage_original_downloads(
    builder: tfds.core.DatasetBuilder, source_dir: str, download_dir: str
) -> list[str]:
    """Copies the original archives into `download_dir` as if TFDS had downloaded them.

    For each `(url, url_info)` of `builder.url_infos` the file `source_dir/url_info.filename`
    is checked against the size and sha256 TFDS expects, then copied to
    `download_dir/<dataset name>/<get_dl_fname(url, sha256)>`, next to the `.INFO` json TFDS
    writes for each download (`tensorflow_datasets/core/download/resource.py`,
    `write_info_file`). `download_and_prepare` then finds every file cached and never goes online.

    Returns:
      The staged paths.
    """
    if not builder.url_infos:
        raise ValueError(f'TFDS has no registered download checksums for {builder.name}.')
    target_dir = os.path.join(download_dir, builder.name)
    os.makedirs(target_dir, exist_ok=True)
    staged = []
    for url, url_info in sorted(builder.url_infos.items()):
        src = _find_source_file(source_dir, url_info.filename)
        if src is None:
            raise FileNotFoundError(
                f'{os.path.join(source_dir, url_info.filename)} not found; {builder.name} needs '
                + ', '.join(sorted(u.filename for u in builder.url_infos.values()))
            )
        size, checksum = os.path.getsize(src), sha256_of(src)
        if size != int(url_info.size) or checksum != url_info.checksum:
            raise ValueError(
                f'{src} is not the original file TFDS expects for {url}: got {size} bytes, sha256 '
                f'{checksum}; expected {int(url_info.size)} bytes, sha256 {url_info.checksum}.'
            )
        dst = os.path.join(target_dir, tfds_resource.get_dl_fname(url, url_info.checksum))
        shutil.copyfile(src, dst)
        info = {
            'dataset_names': [builder.name],
            'original_fname': url_info.filename,  # TFDS guesses the extraction method from it
            'url_info': {
                'checksum': url_info.checksum,
                'filename': url_info.filename,
                'size': int(url_info.size),
            },
            'urls': [url],
        }
        with open(dst + '.INFO', 'w') as f:
            json.dump(info, f, sort_keys=True)
        staged.append(dst)
    return staged


def _prepare_from_original_downloads(builder: tfds.core.DatasetBuilder, source_dir: str) -> None:
    download_dir = os.path.join(os.fspath(builder.data_dir_root), 'downloads')
    stage_original_downloads(builder, source_dir, download_dir)
    builder.download_and_prepare(download_dir=download_dir, download_config=_download_config())


# --------------------------------------------------------------------------------------------
# Route 2: local builders that read the original files directly from the manual dir. Each
# keeps the name, version, features and (key -> stored order) of TFDS's builder, and is not
# registered, so `tfds.builder(name)` keeps resolving to TFDS's class when loading.
# --------------------------------------------------------------------------------------------


class FashionMnistFromFiles(tfds_mnist.FashionMNIST, skip_registration=True):
    """TFDS `fashion_mnist` read from local IDX files whose bytes differ from the originals."""

    name = 'fashion_mnist'
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE_DESCRIPTIONS['fashion_mnist']

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source_dir = os.fspath(dl_manager.manual_dir)
        arrays = {}
        for key, filename in MNIST_FILES.items():
            path = _find_source_file(source_dir, filename) or _find_source_file(
                source_dir, filename.removesuffix('.gz')
            )
            if path is None:
                raise FileNotFoundError(f'Neither {filename} nor its ungzipped form in {source_dir}.')
            magic = _IDX_IMAGES_MAGIC if key.endswith('images') else _IDX_LABELS_MAGIC
            arrays[key] = read_idx(path, magic)
        return {
            split: self._generate_from_arrays(arrays[f'{split}_images'], arrays[f'{split}_labels'])
            for split in ('train', 'test')
        }

    def _generate_from_arrays(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels.')
        # Same keys as TFDS's MNIST builder (the file index), hence the same stored order.
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {'image': image, 'label': int(label)}


def _cifar_examples(
    images: np.ndarray, labels: dict[str, np.ndarray], prefix: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    # Same keys and ids as TFDS's CIFAR builders (`'train_%05d'`), hence the same stored order.
    for index, image in enumerate(images):
        record = {key: int(value[index]) for key, value in labels.items()}
        yield index, {'id': f'{prefix}_{index:05d}', 'image': image, **record}


class Cifar10FromPythonBatches(tfds_cifar.Cifar10, skip_registration=True):
    """TFDS `cifar10` read from the original python batches (`cifar-10-batches-py/`)."""

    name = 'cifar10'
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE_DESCRIPTIONS['cifar10']

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        batch_dir = cifar10_partial.find_batch_dir(
            dl_manager.manual_dir, cifar10_partial.CIFAR10_TEST_BATCH, cifar10_partial.CIFAR10_PYTHON_DIRNAME
        )
        present = cifar10_partial.present_train_batches(batch_dir)
        if tuple(present) != cifar10_partial.CIFAR10_TRAIN_BATCHES:
            raise FileNotFoundError(
                f'Full CIFAR-10 needs all of {cifar10_partial.CIFAR10_TRAIN_BATCHES} in {batch_dir}; '
                f'found {present}. Prepare --dataset=cifar10_partial for a subset.'
            )
        meta_path = os.path.join(batch_dir, 'batches.meta')
        if os.path.isfile(meta_path):
            self.info.features['label'].names = cifar10_partial.load_cifar_pickle(meta_path)['label_names']
        else:
            self.info.features['label'].names = list(cifar10_partial.CIFAR10_LABEL_NAMES)

        def read(names: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            parts = [cifar10_partial.read_cifar_batch(os.path.join(batch_dir, n)) for n in names]
            return (
                np.concatenate([p[0] for p in parts]),
                {'label': np.concatenate([p[1]['labels'] for p in parts])},
            )

        return {
            'train': _cifar_examples(*read(cifar10_partial.CIFAR10_TRAIN_BATCHES), 'train'),
            'test': _cifar_examples(*read([cifar10_partial.CIFAR10_TEST_BATCH]), 'test'),
        }


class Cifar100FromPythonBatches(tfds_cifar.Cifar100, skip_registration=True):
    """TFDS `cifar100` read from the original python files (`cifar-100-python/`)."""

    name = 'cifar100'
    MANUAL_DOWNLOAD_INSTRUCTIONS = SOURCE_DESCRIPTIONS['cifar100']

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        batch_dir = cifar10_partial.find_batch_dir(dl_manager.manual_dir, 'train', 'cifar-100-python')
        meta_path = os.path.join(batch_dir, 'meta')
        if os.path.isfile(meta_path):
            meta = cifar10_partial.load_cifar_pickle(meta_path)
            self.info.features['label'].names = meta['fine_label_names']
            self.info.features['coarse_label'].names = meta['coarse_label_names']

        def read(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            images, labels = cifar10_partial.read_cifar_batch(
                os.path.join(batch_dir, name), ('fine_labels', 'coarse_labels')
            )
            return images, {'label': labels['fine_labels'], 'coarse_label': labels['coarse_labels']}

        return {
            'train': _cifar_examples(*read('train'), 'train'),
            'test': _cifar_examples(*read('test'), 'test'),
        }


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def _check_partial_matches(builder: tfds.core.DatasetBuilder, batch_dir: str) -> None:
    stored = list(builder.info.metadata.get('train_batches', []))
    present = cifar10_partial.present_train_batches(batch_dir)
    if stored != present:
        raise ValueError(
            f'cifar10_partial in {builder.data_dir} was prepared from {stored}, but {batch_dir} '
            f'holds {present}. Delete {builder.data_dir} (or use another --data_dir) to re-prepare.'
        )


# Over 60 lines only by its docstring (sources, layout, errors): the code itself is under 50.
def prepare_dataset(name: str, *, source_dir: str, data_dir: str | None = None) -> str:
    """Prepares TFDS dataset `name` under `data_dir` from the original files in `source_dir`.

    Works offline. Does nothing if the dataset is already prepared there (for
    `cifar10_partial`: checks that the same batches were used).

    Args:
      name: one of `PREPARABLE`.
      source_dir: folder with the original files, see `SOURCE_DESCRIPTIONS[name]`.
      data_dir: TFDS data dir (`None`: TFDS's default, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).

    Returns:
      The prepared dataset's directory (`<data_dir>/<name>/<version>`).
    """
    if name not in PREPARABLE:
        raise ValueError(f'Cannot prepare {name!r}; known datasets: {", ".join(PREPARABLE)}.')
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(
            f'--source_dir {source_dir} is not a directory; it must hold {SOURCE_DESCRIPTIONS[name]}.'
        )
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    tfds.disable_progress_bar()

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        if name == 'cifar10_partial':
            _check_partial_matches(
                builder,
                cifar10_partial.find_batch_dir(
                    source_dir, cifar10_partial.CIFAR10_TEST_BATCH, cifar10_partial.CIFAR10_PYTHON_DIRNAME
                ),
            )
        logging.info('%s is already prepared in %s; nothing to do.', name, builder.data_dir)
        return os.fspath(builder.data_dir)

    if name == 'mnist':
        _prepare_from_original_downloads(builder, source_dir)
    elif name in ('fashion_mnist', 'cifar10', 'cifar100'):
        if has_original_downloads(builder, source_dir):
            _prepare_from_original_downloads(builder, source_dir)
        else:
            local_cls = {
                'fashion_mnist': FashionMnistFromFiles,
                'cifar10': Cifar10FromPythonBatches,
                'cifar100': Cifar100FromPythonBatches,
            }[name]
            logging.info(
                '%s: no byte-identical TFDS downloads in %s; reading the files with %s.',
                name,
                source_dir,
                local_cls.__name__,
            )
            builder = local_cls(data_dir=data_dir)
            builder.download_and_prepare(download_config=_download_config(source_dir))
    else:  # cifar10_partial
        builder.download_and_prepare(download_config=_download_config(source_dir))

    splits = {s: info.num_examples for s, info in builder.info.splits.items()}
    logging.info('Prepared %s in %s: %s.', name, builder.data_dir, splits)
    return os.fspath(builder.data_dir)
