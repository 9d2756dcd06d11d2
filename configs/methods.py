"""The paper's methods as config edits, shared by the per-dataset configs.

Table 1 columns: ``teacher`` (WRN-16-2 by default), ``student`` (alone), ``at``, ``factt``, ``kd``,
``at_kd`` and ``at_kd_decay`` (β follows the learning-rate schedule, the paper's decaying β).
Table 2 mapping functions: ``at_fsum`` (F_sum), ``at_fsum2`` (F_sum^2), ``at_fsum4`` (F_sum^4),
``at_fmax1`` (F_max^1); ``student`` is the "none" row. AT uses β = 1e3 with the reference code's
per-element mean ("code" mode) and one loss per group.
"""

import ml_collections

BETA = 1e3

METHODS = {
    "teacher": {"model": "wrn-16-2"},
    "student": {},
    "at": {"loss.at.weight": BETA},
    "factt": {"loss.factt.weight": BETA},
    "kd": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0},
    "at_kd": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0, "loss.at.weight": BETA},
    "at_kd_decay": {"loss.ce.weight": 0.0, "loss.kd.weight": 1.0, "loss.at.weight": BETA,
                    "loss.at.weight_schedule": "lr"},
    "at_fsum": {"loss.at.weight": BETA, "loss.at.p": 1.0, "loss.at.reduce": "sum"},
    "at_fsum2": {"loss.at.weight": BETA, "loss.at.p": 2.0, "loss.at.reduce": "sum"},
    "at_fsum4": {"loss.at.weight": BETA, "loss.at.p": 4.0, "loss.at.reduce": "sum"},
    "at_fmax1": {"loss.at.weight": BETA, "loss.at.p": 1.0, "loss.at.reduce": "max"},
}


def set_path(config: ml_collections.ConfigDict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def apply_method(config: ml_collections.ConfigDict, method: str,
                 teacher_workdir: str) -> ml_collections.ConfigDict:
    """Apply a method's edits; students get ``teacher_workdir`` unless they need no teacher."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    for path, value in METHODS[method].items():
        set_path(config, path, value)
    if method not in ("teacher", "student"):
        config.teacher.workdir = teacher_workdir
    return config
