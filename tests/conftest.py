"""Shared pytest fixtures, and one persistent JAX compilation cache for the whole run."""

import fcntl
import os
import shutil
import sys
import tempfile

import pytest

# Many tests compile the same programs (the trainer's small configs, the launch scripts' subprocesses):
# a cache shared by this run's processes (pytest-xdist workers and their subprocesses inherit the
# variable) compiles each once; tests/test_faults.py and tests/test_dropout_bn.py took 295 s without it,
# 195 s with it. Entries are keyed by program, options and versions; an unreadable entry is recompiled
# with a warning (JAX's behaviour), and only process 0 of a multi-process run writes. A directory given
# in JAX_COMPILATION_CACHE_DIR is used and kept; otherwise a fresh one is removed at the end of the run.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='cwreg-jax-cache-')
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
if _OWN_CACHE and 'jax' in sys.modules:  # imported before this file (by a plugin): it read the environment
    _jax = sys.modules['jax']
    _jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    _jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    _jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, 'workerinput'):  # the controller (or the only process)
        shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


# The original files sit in shared/data beside the checkout (as in CI); CWREG_SHARED_DATA overrides.
SHARED_DATA = os.environ.get(
    'CWREG_SHARED_DATA',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, 'shared', 'data'),
)
MNIST_SOURCE_DIR = os.path.join(SHARED_DATA, 'mnist')
CIFAR10_PARTIAL_SOURCE_DIR = os.path.join(SHARED_DATA, 'cifar10-partial', 'cifar-10-batches-py')


@pytest.fixture(scope='session')
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data_dir with the REAL `mnist` and `cifar10_partial` prepared, once per run.

    Load from it with `cwreg.training.data.load_dataset(name, data_dir=real_data_dir)`; copy it before
    changing anything in it. pytest-xdist workers share it: the first prepares it (~30 s on 2 cores) and
    fills its decoded-array caches while the others wait, so that later loads only read. Skipped where the
    original files are absent.
    """
    for source in (MNIST_SOURCE_DIR, CIFAR10_PARTIAL_SOURCE_DIR):
        if not os.path.isdir(source):
            if os.environ.get('CI'):  # CI has shared/ beside the checkout: a missing copy is a failure there.
                pytest.fail(f'real data not found: {source}')
            pytest.skip(f'real data not available: {source}')
    from cwreg.training import data, prepare  # pylint: disable=g-import-not-at-top

    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the run's directory, above each worker's own
    data_dir, done = root / 'real_tfds_data', root / 'real_tfds_data.done'
    with open(root / 'real_tfds_data.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            prepare.prepare_dataset('mnist', source_dir=MNIST_SOURCE_DIR, data_dir=str(data_dir))
            prepare.prepare_dataset(
                'cifar10_partial', source_dir=CIFAR10_PARTIAL_SOURCE_DIR, data_dir=str(data_dir)
            )
            for name in ('mnist', 'cifar10_partial'):
                data.load_dataset(name, data_dir=str(data_dir))
            done.touch()
    return str(data_dir)


# Too slow for the fast subset (`python -m pytest -m "not slow"`, the README's quick check): CI's full
# suite runs them. Prefixes of node ids, with what makes each slow.
_SLOW_PREFIXES = (
    'tests/test_multidevice.py',  # a 4-device subprocess compiling every check
    'tests/test_analytic.py::test_check_grads_f64_if_supported',  # third-order finite differences
    'tests/test_analytic.py::test_check_grads_f32',
    'tests/test_penalties.py::test_values_match_reference_random_cases',  # hypothesis shapes
    'tests/test_penalties.py::test_accelerator_branch_equals_cpu_branch_and_reference',
    'tests/test_penalty_inputs.py::test_padding_ids_zero_rows_and_where_give_the_unpadded_penalty[cw_cr-shape1',
    'tests/test_penalty_inputs.py::test_padding_ids_zero_rows_and_where_give_the_unpadded_penalty[cw_vr-shape1',
    'tests/test_data.py::test_real_mnist',  # real data: preparing MNIST and CIFAR
    'tests/test_data.py::test_real_cifar10_partial',
    'tests/test_data.py::test_decoded_arrays_are_cached_and_invalidated_with_the_files',
    'tests/test_data.py::test_a_corrupt_cache_is_rebuilt_with_a_warning',
    'tests/test_data.py::test_prepare_cifar10_from_python_batches_via_cli',
    'tests/test_train.py::test_one_step_of_every_config[resnet',  # convnets on CPU
    'tests/test_train.py::test_one_step_of_every_config[cifar',
    'tests/test_train.py::test_group_equals_separate_runs',  # multi-epoch training
    'tests/test_train.py::test_nonfinite_loss_raises_or_is_recorded_while_the_group_trains_on',
    'tests/test_train.py::test_resume_after_first_epoch_equals_uninterrupted_run',
    'tests/test_train.py::test_execution_fields_may_change_and_a_run_may_grow_but_not_shrink',
    'tests/test_faults.py::test_a_corrupt_latest_checkpoint_resumes_from_the_newest_intact_one',
    'tests/test_faults.py::test_no_intact_checkpoint_starts_over',
    'tests/test_bench.py::test_train_step_rows_report_overheads_and_the_product_floor',
    # Multi-epoch trainer and sweep runs on mock data (5-25 s each).
    'tests/test_sweep.py::test_layout_and_phases',
    'tests/test_sweep.py::test_a_changed_base_config_retrains_and_chosen_weight_reads_only_its_runs',
    'tests/test_sweep.py::test_final_runs_follow_a_changed_choice_of_lambda',
    'tests/test_sweep.py::test_rerun_trains_only_missing_runs',
    'tests/test_sweep.py::test_representation_figures',
    'tests/test_sweep.py::test_a_truncated_results_json_is_named_and_its_run_retrained',
    'tests/test_train.py::test_eval_penalty_is_over_training_size_batches',
    'tests/test_train.py::test_rerun_with_another_config_stops_before_training_listing_the_fields',
    'tests/test_train.py::test_validation_run_reports_the_selection_phase',
    'tests/test_train.py::test_a_workdir_of_before_config_json_is_checked_by_its_results',
    'tests/test_train.py::test_resnet110_builds_and_steps_abstractly',
    'tests/test_train.py::test_one_step_of_every_config[mnist_mlp-size',
    'tests/test_train.py::test_one_step_of_every_config[mnist_mlp-width',
    'tests/test_faults.py::test_a_failed_save_is',
    'tests/test_faults.py::test_results_record_provenance',
    'tests/test_faults.py::test_ctrl_c_says_where_the_run_stopped_and_closes_everything',
    'tests/test_penalty_inputs.py::test_padding_ids_zero_rows_and_where_give_the_unpadded_penalty[cw_cr-shape0-default',
    'tests/test_penalty_inputs.py::test_padding_ids_zero_rows_and_where_give_the_unpadded_penalty[cw_vr-shape0-default',
    # Dropout and batch norm in the trainer: 1k-MLP runs (20-60 s each), one on 4 devices in a subprocess.
    'tests/test_dropout_bn.py::test_rate_zero_trains_bitwise_as_without_dropout',
    'tests/test_dropout_bn.py::test_resumed_run_with_dropout_and_batchnorm_equals_the_uninterrupted_one',
    'tests/test_dropout_bn.py::test_group_of_dropout_rates_equals_the_runs_trained_one_by_one',
    'tests/test_dropout_bn.py::test_four_devices_train_as_one_with_dropout_and_batchnorm',
)


# Slow tests that CI's dependency-bounds stages (.ci/lower_bounds, `-m "not slow or bounds"`) run anyway:
# shard_map, pmap and sharding APIs change between JAX releases more than anything else the library uses.
_BOUNDS_PREFIXES = ('tests/test_multidevice.py',)


def _uses_module_fixture(item) -> bool:
    fixture_defs = getattr(getattr(item, '_fixtureinfo', None), 'name2fixturedefs', {})
    return any(defs and defs[-1].scope in ('module', 'package') for defs in fixture_defs.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        if item.nodeid.startswith(_SLOW_PREFIXES):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.startswith(_BOUNDS_PREFIXES):
            item.add_marker(pytest.mark.bounds)
        # Under `--dist loadgroup` (the README's command) tests are spread one by one, except that a file's
        # tests sharing a module-scoped fixture (a 90 s multi-device subprocess, a trained run) stay on one
        # worker, which computes the fixture once.
        if _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split('::')[0]))
