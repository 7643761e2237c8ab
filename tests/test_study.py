"""Studies: the study file, expansion, running, the index against the run directories."""

from __future__ import annotations

import copy
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import lossgeom as lg
from lossgeom.study import StudyError, load_study
from lossgeom.train._build import build_state

BASE = {
    "model": {"name": "mlp", "options": {"width": 16}},
    "data": {"name": "digits", "subset": 256},
    "optim": {"name": "sgd", "lr": 0.1},
    "steps": 40,
    "batch_size": 32,
    "metrics": {
        "every": 10,
        "sharpness": True,
        "sharpness_max_matvecs": 20,
        "eval_samples": 256,
        "probe_samples": 128,
    },
    "checkpoint": {"every": 10},
}

STUDY = {
    "name": "tiny",
    "base": BASE,
    "grid": {"batch_size": [16, 64]},
    "seeds": [0, 1],
    "probes": [
        {"name": "eigenvalues", "options": {"k": 2, "tol": 1e-3}},
        {"name": "trace", "options": {"max_matvecs": 20}, "at": {"every": 20}},
    ],
    "pairs": {"probes": [{"name": "interpolate", "options": {"n_points": 5}}]},
}


def study(**changes):
    out = copy.deepcopy(STUDY)
    out.update(changes)
    return out


# ----------------------------------------------------------------- the file


def test_grid_zip_and_seeds_expand_to_their_product():
    st = load_study(
        study(
            grid={"batch_size": [16, 64], "optim.lr": [0.05, 0.1, 0.2]},
            zip=[{"optim.momentum": [0.0, 0.9], "optim.weight_decay": [0.0, 1e-4]}],
            seeds=[0, 1, 2],
        )
    )
    assert len(st.runs) == 2 * 3 * 2 * 3
    assert len(st.settings()) == 12
    assert len({r.run_id for r in st.runs}) == len(st.runs)
    zipped = {
        (r.config["optim"]["momentum"], r.config["optim"]["weight_decay"])
        for r in st.runs
    }
    assert zipped == {(0.0, 0.0), (0.9, 1e-4)}
    for runs in st.settings().values():
        assert [r.seed for r in runs] == [0, 1, 2]
        assert len({json.dumps(r.overrides, sort_keys=True) for r in runs}) == 1
    # content-hashed: the same file gives the same ids; the executor is not content
    again = load_study(
        study(
            grid={"batch_size": [16, 64], "optim.lr": [0.05, 0.1, 0.2]},
            zip=[{"optim.momentum": [0.0, 0.9], "optim.weight_decay": [0.0, 1e-4]}],
            seeds=[0, 1, 2],
            executor={"kind": "local", "jobs": 1},
        )
    )
    assert [r.run_id for r in again.runs] == [r.run_id for r in st.runs]
    assert again.fingerprint == st.fingerprint


def test_a_run_id_is_the_hash_of_its_resolved_config():
    a = load_study(study(grid={}, seeds=[0])).runs[0]
    # the same run written out in full (defaults given explicitly) is the same run
    full = copy.deepcopy(BASE)
    full["optim"]["momentum"] = 0.0
    b = load_study(study(base=full, grid={}, seeds=[0])).runs[0]
    assert a.run_id == b.run_id
    c = load_study(study(grid={}, seeds=[1])).runs[0]
    assert c.run_id != a.run_id and c.setting_id == a.setting_id


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"grid": {"optim.lrr": [0.1]}}, "unknown config path 'optim.lrr'"),
        ({"grid": {"batch_size": []}}, "grid.batch_size has no values"),
        ({"grid": {"batch_size": ["big"]}}, "batch_size='big' and seed 0 is invalid"),
        ({"grid": {"steps.x": [1]}}, "steps is a value, not a section"),
        ({"seeds": [0, 1, 0]}, "seeds [0] appear more than once"),
        ({"seeds": []}, "seeds is empty"),
        ({"probes": [{"name": "eigenvalue"}]}, "unknown probe 'eigenvalue'"),
        (
            {"probes": [{"name": "trace", "options": {"probes": 3}}]},
            "probe 'trace' has no options ['probes']",
        ),
        ({"probes": [{"name": "trace", "at": "sometimes"}]}, "probes.0.at"),
        ({"pairs": {"probes": [{"name": "barrier"}]}}, "unknown probe 'barrier'"),
        (
            {"grid": {}, "zip": [{"optim.lr": [0.1, 0.2], "batch_size": [16]}]},
            "need equal lengths",
        ),
        ({"zip": [{"batch_size": [16, 32]}]}, "also swept in grid"),
        ({"grid": {"seed": [1, 2]}}, "set seeds with 'seeds:'"),
        (
            {"probes": [{"name": "trace", "key": "sharpness"}]},
            "also columns of the training metrics",
        ),
        ({"gird": {}}, "gird: Extra inputs are not permitted"),
        ({"base": {"model": {"name": "mlp"}}}, "data: Field required"),
    ],
)
def test_bad_study_files_fail_before_anything_runs(tmp_path, changes, expected):
    with pytest.raises(StudyError) as err:
        lg.study.run(study(**changes), tmp_path / "out", progress=False)
    assert expected in str(err.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_yaml_study_files_refuse_duplicate_keys_and_code(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: a\nname: b\nbase: {}\n")
    with pytest.raises(StudyError, match="key 'name' appears twice"):
        load_study(path)
    path.write_text("base: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(path)


# ------------------------------------------------------------- a whole study


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    status = lg.study.run(study(), out, jobs=2, progress=False)
    return out, status


def test_every_run_finishes_and_pairs_are_probed(done):
    out, status = done
    assert status.counts == {"finished": 4}
    assert status.pair_counts == {"finished": 2}  # one pair of seeds per setting
    runs = lg.study.runs(out)
    assert list(runs["status"]) == ["finished"] * 4
    assert (runs["attempts"] == 1).all() and (runs["seconds"] > 0).all()
    assert runs["host"].notna().all()


def _index_rows(out, run_id, source):
    con = sqlite3.connect(out / "index.sqlite")
    rows = con.execute(
        "SELECT step, key, value, stderr, text FROM metrics WHERE run_id=? AND source=?",
        (run_id, source),
    ).fetchall()
    con.close()
    return {(s, k): (v, e, t) for s, k, v, e, t in rows}


def _same(a, b):
    if isinstance(b, str) and b in ("NaN", "Infinity", "-Infinity"):
        b = float(b.replace("Infinity", "inf"))
    if isinstance(b, bool):
        b = float(b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_the_index_holds_exactly_what_the_run_directories_hold(done):
    out, _ = done
    for run in lg.study.runs(out).itertuples():
        d = Path(run.run_dir)
        for source, name in (("metrics", "metrics.jsonl"), ("probe", "probes.jsonl")):
            rows = [json.loads(line) for line in (d / name).read_text().splitlines()]
            indexed = _index_rows(out, run.run_id, source)
            expected = {}
            for row in rows:
                body = {
                    k: v
                    for k, v in row.items()
                    if k not in ("key", "name", "path", "trigger")
                }
                for key, v in body.items():
                    if key == "step" or (key.endswith("_stderr") and key[:-7] in body):
                        continue
                    expected[(row["step"], key)] = (v, body.get(f"{key}_stderr"))
            assert set(indexed) == set(expected)
            for k, (v, se) in expected.items():
                value, stderr, text = indexed[k]
                assert _same(value, v) or text == v, (k, value, text, v)
                if se is not None:
                    assert _same(stderr, se)


def test_load_is_one_row_per_run_and_step_with_config_columns(done):
    out, _ = done
    frame = lg.study.load(out)
    steps = {0, 10, 20, 30, 40}
    assert len(frame) == 4 * len(steps)
    assert set(frame["batch_size"]) == {16, 64}
    assert {"optim.lr", "model.options.width", "seed", "setting_id"} <= set(
        frame.columns
    )
    for run in lg.study.runs(out).itertuples():
        rows = [
            json.loads(x)
            for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        mine = frame[frame["run_id"] == run.run_id].set_index("step")
        assert set(mine.index) == steps
        for row in rows:
            assert mine.loc[row["step"], "train_loss"] == row["train_loss"]
            assert mine.loc[row["step"], "test_error"] == pytest.approx(
                1 - row["test_accuracy"]
            )
        probes = [
            json.loads(x)
            for x in (Path(run.run_dir) / "probes.jsonl").read_text().splitlines()
        ]
        for p in probes:
            assert mine.loc[p["step"], p["key"]] == p[p["key"]]
        # trace at steps 0, 20, 40 ("every: 20"), eigenvalues at the end only
        assert sorted(p["step"] for p in probes if p["key"] == "trace") == [0, 20, 40]
        assert [p["step"] for p in probes if p["key"] == "eigenvalues"] == [40]


def test_stored_results_reload_exactly(done):
    out, _ = done
    res = lg.study.results(out)
    assert set(res["key"]) == {"eigenvalues", "trace", "interpolate"}
    frame = lg.study.load(out).set_index(["run_id", "step"])
    for row in res.itertuples():
        result = lg.load_result(row.path)
        if row.key == "interpolate":
            pairs = lg.study.pairs(out).set_index("pair_id")
            assert result.barrier == pairs.loc[row.owner, "interpolate"]
        else:
            assert (
                result.scalars()["value"] == frame.loc[(row.owner, row.step), row.key]
            )


def test_table_is_mean_se_and_count_over_seeds_of_final_values(done):
    out, _ = done
    table = lg.study.table(
        out, by=["batch_size"], metrics=["sharpness", "test_error", "interpolate"]
    )
    runs = lg.study.runs(out)
    for bs in (16, 64):
        finals = []
        for run in runs[runs["batch_size"] == bs].itertuples():
            rows = [
                json.loads(x)
                for x in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()
            ]
            finals.append(rows[-1]["sharpness"])
        finals = np.array(finals)
        assert table.loc[bs, ("sharpness", "mean")] == pytest.approx(
            finals.mean(), rel=1e-12
        )
        assert table.loc[bs, ("sharpness", "se")] == pytest.approx(
            finals.std(ddof=1) / np.sqrt(len(finals)), rel=1e-12
        )
        assert table.loc[bs, ("sharpness", "n")] == 2
        assert table.loc[bs, ("interpolate", "n")] == 1
    with pytest.raises(ValueError, match="unknown columns \\['sharpnes'\\]"):
        lg.study.table(out, by=["batch_size"], metrics=["sharpnes"])


def test_running_again_skips_finished_runs(done):
    out, _ = done
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    status = lg.study.run(study(), out, progress=False)
    assert status.counts == {"finished": 4}
    assert (lg.study.runs(out)["attempts"] == 1).all()
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == stamps


def test_a_second_coordinator_is_refused(done):
    from lossgeom.study._coordinator import _StudyLock

    out, _ = done
    with _StudyLock(out):
        with pytest.raises(lg.study.StudyLockedError, match="another coordinator"):
            lg.study.run(study(), out, progress=False)


def test_another_study_file_is_refused_and_force_sets_the_old_index_aside(
    done, tmp_path
):
    out, _ = done
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy_dir)
    bigger = study(seeds=[0, 1, 2])
    with pytest.raises(StudyError, match="holds another study"):
        lg.study.run(bigger, copy_dir, progress=False)
    status = lg.study.run(bigger, copy_dir, force=True, progress=False)
    assert status.counts == {"finished": 6}
    runs = lg.study.runs(copy_dir)
    # the four runs of the old study were reused, not trained again
    old = set(lg.study.runs(out)["run_id"])
    assert set(runs[runs["run_id"].isin(old)]["attempts"]) == {0}
    assert len(list(copy_dir.glob("index.sqlite.replaced-*"))) == 1
    assert lg.study.status(copy_dir).pair_counts == {"finished": 6}


def test_a_directory_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(StudyError, match="holds no study"):
        lg.study.run(study(), tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_every_kind_of_probe_runs_and_reloads(tmp_path):
    spec = study(
        grid={},
        seeds=[0, 1],
        probes=[
            {"name": "noise_scale", "options": {"n_repeats": 4}},
            {"name": "effective_rank", "options": {"n_probes": 2, "lanczos_steps": 10}},
            {"name": "slice_1d", "options": {"n_directions": 2}},
            {
                "name": "sharpness",
                "options": {"radius": 0.05, "kind": "average", "samples": 4},
            },
            {"name": "density", "options": {"n_probes": 2, "lanczos_steps": 10}},
            {"name": "outliers", "options": {"max_k": 4, "tol": 1e-2}},
            {
                "name": "intrinsic_dimension",
                "options": {"dims": [10, 40], "steps": 20, "lr": 0.05},
            },
        ],
        pairs={
            "between": "consecutive",
            "probes": [
                {"name": "interpolate", "options": {"n_points": 3}},
                {"name": "align", "options": {"n_points": 3}},
            ],
        },
    )
    status = lg.study.run(spec, tmp_path / "out", progress=False)
    assert status.counts == {"finished": 2}, status.summary()
    assert status.pair_counts == {"finished": 1}
    res = lg.study.results(tmp_path / "out")
    keys = set(res["key"])
    assert keys == {
        "noise_scale",
        "effective_rank",
        "slice_1d",
        "sharpness_average",
        "density",
        "outliers",
        "intrinsic_dimension",
        "interpolate",
        "align",
    }
    for row in res.itertuples():
        result = lg.load_result(row.path)
        assert isinstance(result, lg.Result)
    final = lg.study.load(tmp_path / "out").dropna(subset=["noise_scale"])
    assert len(final) == 2 and (final["step"] == 40).all()
    # a result's headline numbers are columns <key>_<name>, standard errors folded
    assert final["slice_1d_slice_variance"].notna().all()
    assert (final["slice_1d_total_variation_stderr"] > 0).all()
    pair = lg.study.pairs(tmp_path / "out")
    assert pair["align"].notna().all() and pair["interpolate"].notna().all()


def test_pair_probes_at_a_checkpoint_step(tmp_path):
    base = {**BASE, "checkpoint": {"steps": [20]}}
    pair_probes = [
        {"name": "interpolate", "step": 20, "options": {"n_points": 5}},
        {"name": "interpolate", "options": {"n_points": 5}},
    ]
    spec = study(base=base, grid={}, probes=[], pairs={"probes": pair_probes})
    status = lg.study.run(spec, tmp_path / "s", progress=False)
    assert status.pair_counts == {"finished": 1}, status.summary()
    pair = lg.study.pairs(tmp_path / "s").iloc[0]
    run_dirs = lg.study.runs(tmp_path / "s").set_index("run_id")["run_dir"]
    # the barrier between both runs' step-20 checkpoints, recomputed here
    models = []
    for run_id, seed in (
        (pair["run_a"], pair["seed_a"]),
        (pair["run_b"], pair["seed_b"]),
    ):
        cfg = lg.load_config({**base, "seed": int(seed), "name": "tiny"})
        state = build_state(cfg, tmp_path / "unused", torch.device("cpu"))
        sidecar = Path(run_dirs[run_id]) / "checkpoints" / "step_0000020.json"
        lg.train.load_checkpoint(sidecar, state.model, restore_rng=False)
        models.append(state)
    obj = models[0].objective
    theta_b = obj.flatten(dict(models[1].model.named_parameters())).detach()
    direct = lg.interpolate(obj, obj.theta, theta_b, n_points=5)
    assert pair["interpolate_step20"] == pytest.approx(direct.barrier, rel=1e-12)
    assert pair["interpolate_step20"] != pair["interpolate"]  # final weights differ


def test_a_pair_probe_step_needs_checkpoints_there():
    spec = study(pairs={"probes": [{"name": "interpolate", "step": 15}]})
    with pytest.raises(StudyError, match=r"checkpoint: \{steps: \[15\]\}"):
        load_study(spec)
