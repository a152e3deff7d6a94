"""Shared pytest fixtures."""

import os

import pytest

# The original files sit in shared/data beside the checkout (as in CI); CWREG_SHARED_DATA overrides.
SHARED_DATA = os.environ.get(
    'CWREG_SHARED_DATA',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, 'shared', 'data'))
MNIST_SOURCE_DIR = os.path.join(SHARED_DATA, 'mnist')
CIFAR10_PARTIAL_SOURCE_DIR = os.path.join(SHARED_DATA, 'cifar10-partial', 'cifar-10-batches-py')


@pytest.fixture(scope='session')
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A TFDS data_dir with the REAL `mnist` and `cifar10_partial` prepared, once per session.

  Load from it with `cwreg.data.load_dataset(name, data_dir=real_data_dir)`. Preparing takes
  ~20-30 s on 2 cores; skipped where the original files are absent.
  """
  for source in (MNIST_SOURCE_DIR, CIFAR10_PARTIAL_SOURCE_DIR):
    if not os.path.isdir(source):
      if os.environ.get('CI'):  # CI has shared/ beside the checkout: a missing copy is a failure there.
        pytest.fail(f'real data not found: {source}')
      pytest.skip(f'real data not available: {source}')
  from cwreg import prepare  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  prepare.prepare_dataset('mnist', source_dir=MNIST_SOURCE_DIR, data_dir=data_dir)
  prepare.prepare_dataset('cifar10_partial', source_dir=CIFAR10_PARTIAL_SOURCE_DIR,
                          data_dir=data_dir)
  return data_dir
