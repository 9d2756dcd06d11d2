import json
import os

import numpy as np
import pytest

from experiments import paper_tables


@pytest.mark.heavy
def test_table1_runner_writes_every_column_the_papers_numbers_and_curves(idx_dir, tmp_path):
    options = {
        "seeds": 2,
        # the teacher's program is then the student's (one compilation for both)
        "teacher_epochs": 1,
        "student_epochs": 1,
        "train_size": 128,
        "test_size": 64,
        "data_dir": str(idx_dir),
        "student_model": "wrn-tiny",
        "teacher_model": "wrn-tiny",
        "seed_strategy": "vmap",  # one seed's compilation for both
    }
    runs = paper_tables.plan(1, "fashion_mnist", str(tmp_path), options, ["wrn-16-1,wrn-16-2"])
    assert [r["column"] for r in runs] == ["teacher", "student", "AT", "F-ActT", "KD", "AT+KD"]
    assert runs[4]["config"].teacher.workdir == runs[0]["workdir"]
    assert runs[5]["config"].loss.at.weight_schedule == "lr"  # AT+KD decays β
    cells = paper_tables.make_table(
        1, "fashion_mnist", str(tmp_path), options, ["wrn-16-1,wrn-16-2"], progress=False
    )
    row = cells["wrn-16-1,wrn-16-2"]
    assert list(row) == ["teacher", "student", "AT", "F-ActT", "KD", "AT+KD"]
    for cell in row.values():
        assert len(cell["seeds"]) == 2 and cell["min"] <= cell["median"] <= cell["max"]
        assert cell["median"] == pytest.approx(float(np.median(cell["seeds"])))
        assert cell["paper"] is None  # the paper reports CIFAR-10 only
    assert row["AT"]["attention_distance"] > 0
    text = (tmp_path / "table1_fashion_mnist.md").read_text()
    for column in row:
        assert column in text
    # the paper's CIFAR-10 numbers are a labelled reference row, not brackets or dashes
    assert (
        "[–]" not in text
        and "| the paper, CIFAR-10 (reference) | 6.31 | 8.77 | 7.93 |" in text
        and "a reference from another dataset" in text
    )
    saved = json.loads((tmp_path / "table1_fashion_mnist.json").read_text())
    assert saved["cells"]["wrn-16-1,wrn-16-2"]["KD"]["seeds"] == row["KD"]["seeds"]
    png = (tmp_path / "table1_fashion_mnist_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the paper's numbers stand beside CIFAR-10 cells
    cifar = paper_tables.summarise(
        1,
        "cifar10",
        [
            {
                "row": "wrn-16-1,wrn-16-2",
                "column": "AT",
                "workdir": "x",
                "results": {"final_test_error": 8.0, "epochs": 200},
            }
        ],
    )
    assert cifar["wrn-16-1,wrn-16-2"]["AT"]["paper"] == 7.93
    assert "8.00 [7.93]" in paper_tables.markdown(1, "cifar10", cifar, "cmd")


def test_table2_and_table3_plans():
    options = {"seeds": 1, "teacher_epochs": 0, "student_epochs": 0}
    t2 = paper_tables.plan(2, "cifar10", "R", options)
    assert [r["column"] for r in t2] == [
        "teacher",
        "none",
        "F_sum",
        "F_sum^2",
        "F_sum^4",
        "F_max^1",
    ]
    assert t2[2]["config"].loss.at.p == 1.0 and t2[2]["config"].loss.at.reduce == "sum"
    t3 = paper_tables.plan(3, "fashion_mnist", "R", options)
    assert [r["column"] for r in t3] == [
        "teacher",
        "teacher_at",
        "baseline",
        "min-l2",
        "grad-AT",
        "KD",
        "symmetry",
        "AT",
    ]
    by_column = {r["column"]: r for r in t3}
    assert by_column["AT"]["config"].teacher.workdir == by_column["teacher_at"]["workdir"]
    assert by_column["grad-AT"]["config"].teacher.workdir == by_column["teacher"]["workdir"]
    assert by_column["baseline"]["config"].num_epochs == 200
    with pytest.raises(ValueError, match="Table 3 runs on"):
        paper_tables.plan(3, "cifar100", "R", options)


@pytest.mark.heavy
def test_repdistiller_runner_writes_every_cell_beside_the_reference_and_resumes_a_stopped_grid(
    idx_dir, tmp_path
):
    """A tiny grid of RepDistiller's same-architecture table (one pair, KD; tiny models on the
    IDX data): every cell trained with the reference's recipe, the table with the reference
    row and the paired verdict, JSON and figure; stopped in a cell, the same call goes on with
    it and reuses the finished ones; the cross table plans its pairs without FSP, at the small
    students' lr, beside its reference numbers."""
    import os
    import signal
    import threading
    import time

    from at_jax import train
    from at_jax.files import read_jsonl
    from experiments import repdistiller_tables as rt

    options = {
        "seeds": 2,
        "teacher_epochs": 1,
        "student_epochs": 1,
        "train_size": 0,
        "test_size": 64,
        "data_dir": str(idx_dir),
        "teacher_model": "wrn-tiny",
        "student_model": "wrn-tiny",
        "overrides": {"log_every_steps": 1},  # rows per step: the stop below lands inside kd
    }
    pair = [("wrn_40_2", "wrn_16_2")]
    runs = rt.plan("same", "fashion_mnist", str(tmp_path), options, ("kd", "fsp"), pair)
    assert [r["column"] for r in runs] == ["teacher", "student", "kd", "fsp"]
    other = rt.plan(
        "same", "fashion_mnist", str(tmp_path), options, ("fsp",), [("wrn_40_2", "wrn_40_1")]
    )
    assert [r["column"] for r in other] == ["teacher", "student"]  # FSP: the widths differ
    kd = runs[2]["config"]
    assert (kd.batch_size, kd.optimizer.lr, kd.loss.kd.alpha, kd.data.augment.crop_pad_mode) == (
        64, 0.05, 0.9, "zeros"
    )  # fmt: skip
    assert kd.teacher.workdir == runs[0]["workdir"]

    kd_rows = tmp_path / "fashion_mnist" / "wrn_40_2-wrn_16_2" / "kd" / "metrics.jsonl"

    def stop_in_kd():
        while not read_jsonl(str(kd_rows)):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop_in_kd, daemon=True).start()
    with pytest.raises(train.Stopped):
        rt.make_table(
            "same", "fashion_mnist", str(tmp_path), options, ("kd",), pair, progress=False
        )
    teacher_results = tmp_path / "fashion_mnist" / "teachers" / "wrn_40_2" / "results.json"
    done = teacher_results.stat().st_mtime
    cells = rt.make_table(
        "same", "fashion_mnist", str(tmp_path), options, ("kd",), pair, progress=False
    )
    assert teacher_results.stat().st_mtime == done  # reused, not trained again
    kd_steps = [r["step"] for r in read_jsonl(str(kd_rows)) if "epoch" not in r]
    assert kd_steps == sorted(set(kd_steps))  # resumed where it stopped: no step twice
    row = cells["wrn_40_2:wrn_16_2"]
    assert list(row) == ["teacher", "student", "kd"]
    assert row["kd"]["reference"] == 74.92 and row["student"]["reference"] == 73.26
    assert len(row["kd"]["accuracy_per_seed"]) == 2 and "p" in row["kd"]["vs_student"]
    text = (tmp_path / "repdistiller_same_fashion_mnist.md").read_text()
    assert "| wrn_40_2:wrn_16_2 | RepDistiller (reference) | 75.61 | 73.26 | 74.92 |" in text
    assert "a reference from another dataset" in text
    saved = json.loads((tmp_path / "repdistiller_same_fashion_mnist.json").read_text())
    assert saved["cells"]["wrn_40_2:wrn_16_2"]["kd"]["median"] == row["kd"]["median"]
    assert (tmp_path / "repdistiller_same_fashion_mnist.png").read_bytes()[:4] == b"\x89PNG"
    cross = rt.plan("cross", "cifar100", str(tmp_path), {"seeds": 1}, rt.TABLE_METHODS["cross"])
    assert len(rt.pairs_of("cross")) == 6 and "fsp" not in {r["column"] for r in cross}
    shuffle = [r for r in cross if r["row"] == "resnet32x4:ShuffleV1" and r["column"] == "crd"]
    assert shuffle[0]["config"].optimizer.lr == 0.01 and shuffle[0]["config"].model == "ShuffleV1"
    assert rt.REFERENCE["cross"][("resnet32x4", "ShuffleV1")]["crd"] == 75.11
    with pytest.raises(ValueError, match="not in the 'same' table"):
        rt.pairs_of("same", "vgg13:resnet8")


def test_a_diverged_cell_is_recorded_and_the_grid_goes_on_but_a_diverged_teacher_stops_it(
    monkeypatch, tmp_path, capsys
):
    """No training: train_and_evaluate replaced by one that diverges in the chosen runs."""
    from at_jax import train
    from experiments import grid, repdistiller_tables as rt

    options = {"seeds": 2, "student_epochs": 1, "teacher_epochs": 1}
    runs = rt.plan("same", "fashion_mnist", str(tmp_path), options, ("kd", "at"), None)
    runs = [r for r in runs if r["row"] in ("wrn_40_2:wrn_16_2", "resnet56:resnet20")]
    failing = {os.path.join("wrn_40_2-wrn_16_2", "at")}
    trained = []

    def fake(config, workdir, progress=True):
        trained.append(workdir)
        if any(workdir.endswith(f) for f in failing):
            raise train.TrainingDiverged("loss is NaN/Inf at epoch 1 (...)")
        return {"final_test_error_per_seed": [20.0, 22.0], "final_test_error": 21.0}

    monkeypatch.setattr(train, "train_and_evaluate", fake)
    done = grid.run_all(runs, progress=False)
    assert len(trained) == len(runs) == 8  # every cell after the diverged one ran too
    out = capsys.readouterr().out
    assert "1 cell(s) diverged" in out and "wrn_40_2:wrn_16_2 at" in out
    cells = rt.summarise("same", done)
    at = cells["wrn_40_2:wrn_16_2"]["at"]
    assert at["median"] is None and at["diverged"].startswith("loss is NaN")
    assert "vs_student" not in at and "vs_student" in cells["wrn_40_2:wrn_16_2"]["kd"]
    text = rt.markdown("same", "fashion_mnist", cells, ("kd", "at"), "cmd")
    assert "| wrn_40_2:wrn_16_2 | at_jax | 79.00 (78.00–80.00) | 79.00 (78.00–80.00) | " in text
    assert text.count("diverged") == 1
    figure = rt.figure(str(tmp_path / "f.png"), cells, ("kd", "at"))  # a gap where it diverged
    assert open(figure, "rb").read(4) == b"\x89PNG"
    # Table 1's runner shares the grid: a diverged column reads "diverged" there too
    table1 = paper_tables.summarise(1, "fashion_mnist", [
        {"row": "r", "column": "AT", "workdir": "x", "results": {"diverged": "NaN"}},
        {"row": "r", "column": "KD", "workdir": "y",
         "results": {"final_test_error": 8.0, "epochs": 1}},
    ])  # fmt: skip
    assert "| at_jax, fashion_mnist | diverged | 8.00 |" in paper_tables.markdown(
        1, "fashion_mnist", table1, "cmd"
    )
    # a teacher that diverges stops the grid: every cell after it needs it
    failing = {os.path.join("teachers", "wrn_40_2")}
    trained.clear()
    with pytest.raises(train.TrainingDiverged):
        grid.run_all(runs, progress=False)
    assert len(trained) == 1
