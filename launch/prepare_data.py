r"""Prepares a TFDS dataset offline from local copies of its original files.

Usage:
  python launch/prepare_data.py --dataset=mnist \
      --source_dir=/work/shared/data/mnist --data_dir=/path/to/tensorflow_datasets
  python launch/prepare_data.py --dataset=cifar10_partial \
      --source_dir=/work/shared/data/cifar10-partial/cifar-10-batches-py \
      --data_dir=/path/to/tensorflow_datasets

Afterwards `cwreg.training.data.load_dataset(name, data_dir=...)` loads it. What `--source_dir` must hold
for each dataset: see `cwreg.training.prepare.SOURCE_DESCRIPTIONS`.
"""

from collections.abc import Sequence

from absl import app, flags, logging

from cwreg.training import prepare

_DATASET = flags.DEFINE_enum('dataset', None, list(prepare.PREPARABLE), 'TFDS dataset name.')
_SOURCE_DIR = flags.DEFINE_string(
    'source_dir', None, 'Folder with the original files (e.g. the four MNIST IDX .gz files).'
)
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'TFDS data dir to prepare into (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).'
)
flags.mark_flags_as_required(['dataset', 'source_dir'])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    path = prepare.prepare_dataset(_DATASET.value, source_dir=_SOURCE_DIR.value, data_dir=_DATA_DIR.value)
    logging.info('Ready: %s', path)
    print(f'{_DATASET.value} is prepared in {path}')


if __name__ == '__main__':
    app.run(main)
