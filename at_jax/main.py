"""Command line: ``python -m at_jax.main --config configs/FILE.py[:ARG] --workdir DIR``.

``--config.key=value`` overrides any field (unknown keys are rejected). Rerunning the same command
resumes from the latest checkpoint in DIR.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from at_jax import devices, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    devices.use_cpu_cores(FLAGS.config.batch_size)  # before any JAX computation
    if FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    logging.set_verbosity(logging.WARNING)
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, train.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"final test error {results['final_test_error']:.2f}% "
          f"(best {results['best_test_error']:.2f}%), results in {FLAGS.workdir}/results.json")


if __name__ == "__main__":
    app.run(main)
