"""Fraction of width-2 MNIST MLPs (5 hidden ReLU layers, zero biases) with a hidden layer that is dead at
initialization: every unit 0 on all of the first 2,000 test images, so no gradient reaches the layers below.

  python docs/results/dead_units.py --data_dir=data/tfds
"""

import argparse

import jax
import jax.numpy as jnp

from cwreg.training import data


def dead_fraction(images: jax.Array, init, seeds: int, width: int, depth: int = 5) -> float:
    dead = 0
    for seed in range(seeds):
        key, h = jax.random.key(seed), images
        for _ in range(depth):
            key, sub = jax.random.split(key)
            h = jnp.maximum(h @ init(sub, (h.shape[1], width)), 0.0)
            if float(jnp.max(h)) == 0.0:
                dead += 1
                break
    return dead / seeds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--data_dir', default=None)
    parser.add_argument('--seeds', type=int, default=400)
    args = parser.parse_args()
    test = data.load_dataset('mnist', data_dir=args.data_dir).eval
    images = jnp.asarray(test.images[:2000].reshape(2000, -1))
    for name in ('lecun_normal', 'glorot_uniform'):
        for width in (2, 8):
            fraction = dead_fraction(images, getattr(jax.nn.initializers, name)(), args.seeds, width)
            print(
                f'{name:15s} width {width}: {100 * fraction:.1f} % of {args.seeds} networks have a dead layer'
            )


if __name__ == '__main__':
    main()
