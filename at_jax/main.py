"""Command line: ``python -m at_jax.main --config configs/FILE.py[:ARG] --workdir DIR``.

``--config.key=value`` overrides any field (unknown keys are rejected). Rerunning the same command
resumes from the newest checkpoint in DIR. Several processes (hosts) make one run with
``--distributed`` and ``--coordinator_address``/``--num_processes``/``--process_id`` (or JAX's
cluster auto-detection: leave them unset on TPU pods, SLURM, ...).
"""

import re

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from at_jax import compilation_cache, devices, runs, train
from at_jax.errors import fail, one_line_errors

__all__ = ["main", "parse_flags"]

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool(
    "distributed", False, "Make several processes one run (jax.distributed.initialize)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a one-line error for a misspelt key or a missing config file."""
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            _ = FLAGS.config.batch_size  # the config file is loaded (and overridden) lazily: now
    except flags.Error as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        if len(lines) > 1:  # an exception inside the config file: its last line says what
            fail(f"{lines[0].split(': ')[0]}: {lines[-1]}")
        fail(f"{e}. Run with --helpfull for the flags.")
    except (AttributeError, KeyError) as e:  # --config.unknown_key=...
        text = str(e).replace("\\'", "'")
        quoted = re.search(r"'(\w+)'", text)
        name = quoted.group(1) if quoted else text
        key = next(
            (
                a.split("=")[0][len("--config.") :]
                for a in argv[1:]
                if a.startswith("--config.") and name in a.split("=")[0].split(".")
            ),
            name,
        )
        hint = re.search(r'Did you mean "(\w+)"', text)
        fail(
            f"unknown config key {key!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + ": check its spelling against the config file (at_jax/recipes.py lists every key)"
        )
    except (OSError, ValueError, SyntaxError) as e:  # missing or broken config file
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if "No such file" in line), lines[0])
        fail(f"cannot load the config file: {detail}")
    return rest


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        fail("--config is required (e.g. --config configs/cifar10.py:student)")
    if not FLAGS.workdir:
        fail("--workdir is required")
    if FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    else:
        devices.use_cpu_cores(FLAGS.config.batch_size)  # before any JAX computation
    logging.set_verbosity(logging.WARNING)
    with one_line_errors(train.TrainingDiverged, runs.CheckpointError):
        compilation_cache.use_compilation_cache(FLAGS.config.compilation_cache_dir)
        with train.exit_when_stopped():  # SIGTERM/SIGINT: exit as the signal would
            results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(
            f"final test error {results['final_test_error']:.2f}% "
            f"(top-5 {results['final_test_top5_error']:.2f}%, best "
            f"{results['best_test_error']:.2f}%), results in {FLAGS.workdir}/results.json"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
