"""bench section search: trial-epochs to a target score from sweep histories (hand-made ones)."""

from __future__ import annotations

import pytest

from jobs.bench import search


def trial(trial_id: str, scores: list[float], times: list[float], config: dict | None = None) -> dict:
    return {
        "trial_id": trial_id,
        "config": config or {"train": {"lr": 1e-3}},
        "history": [
            {"epoch": e, "ndcg10": s, "time": t}
            for e, (s, t) in enumerate(zip(scores, times, strict=True), 1)
        ],
    }


# two trials side by side: a slow learner (a) and a fast one (b) that starts a little later
A = trial("x_00000", [0.30, 0.40, 0.50, 0.55], [110, 120, 130, 140])
B = trial("x_00001", [0.45, 0.60, 0.70, 0.72], [115, 125, 135, 145])


@pytest.mark.timeout(30)
def test_validations_are_counted_in_the_order_they_completed_across_trials():
    order = [(v["trial"][-1], v["epoch"]) for v in search.validations([A, B], "ndcg10")]
    assert order == [("0", 1), ("1", 1), ("0", 2), ("1", 2), ("0", 3), ("1", 3), ("0", 4), ("1", 4)]


@pytest.mark.timeout(30)
def test_cost_to_target_counts_every_trial_epoch_until_the_best_so_far_reaches_it():
    # 0.60 is first reached by b's second epoch, the 4th validation to complete, 25 s after the start
    got = search.cost_to_target([A, B], "ndcg10", 0.60, "max", started=100.0)
    assert got == {"trial_epochs": 4, "wall_s": 25.0, "trial": "x_00001", "epoch": 2}
    # reached by the very first validation
    assert search.cost_to_target([A, B], "ndcg10", 0.2, "max")["trial_epochs"] == 1
    # never reached: no cost, no wall time
    assert search.cost_to_target([A, B], "ndcg10", 0.9, "max", started=100.0) == {
        "trial_epochs": None,
        "wall_s": None,
        "trial": None,
        "epoch": None,
    }


@pytest.mark.timeout(30)
def test_a_lower_is_better_metric_reaches_its_target_from_above_and_nan_scores_are_skipped():
    a = trial("x_00000", [float("nan"), 0.9, 0.5], [1, 2, 3])
    b = trial("x_00001", [0.8, 0.3], [1.5, 2.5])
    assert search.best_score([a, b], "ndcg10", "min") == 0.3
    assert search.cost_to_target([a, b], "ndcg10", 0.4, "min")["trial_epochs"] == 4  # b's second
    assert search.cost_to_target([a], "ndcg10", 0.95, "min")["trial_epochs"] == 2  # nan is no score


@pytest.mark.timeout(30)
def test_target_score_and_the_trivial_predictor_of_each_baseline_shape():
    assert search.target_score(0.2, 0.7) == pytest.approx(0.65)  # 90% of the way
    assert search.target_score(0.5, 0.1, 0.5) == pytest.approx(0.3)  # lower is better
    assert search.trivial_score({"predictor": "constant grade 0", "kappa": 0.0}, "kappa") == 0.0
    nested = {"popularity": {"predictor": "popularity", "ndcg10": 0.41}, "mf": {"ndcg10": 0.5}}
    assert search.trivial_score(nested, "ndcg10") == 0.41
    assert search.trivial_score(nested, "auc") is None


@pytest.mark.timeout(30)
def test_same_configs_matches_trials_by_their_index_not_their_experiment_id():
    a = [
        trial("aaa_00000", [0.1], [1], {"train": {"lr": 1e-3}}),
        trial("aaa_00001", [0.1], [1], {"train": {"lr": 2e-3}}),
    ]
    b = [
        trial("bbb_00001", [0.1], [1], {"train": {"lr": 2e-3}}),
        trial("bbb_00000", [0.1], [1], {"train": {"lr": 1e-3}}),
    ]
    assert search.same_configs(a, b)
    b[0]["config"] = {"train": {"lr": 2.5e-3}}
    assert not search.same_configs(a, b)
    assert not search.same_configs(a, b[1:])


def summary(trials: list[dict], stopped: int, started: float) -> dict:
    return {
        "metric": "ndcg10",
        "mode": "max",
        "num_trials": len(trials),
        "stopped_early": stopped,
        "best": {"trial_id": trials[-1]["trial_id"]},
        "wall_s": 100.0,
        "started": started,
        "trials": trials,
    }


@pytest.mark.timeout(30)
def test_compare_asha_with_random_search_on_the_same_four_trials():
    """Random search trains trials 0-3 for 3 epochs each, two at a time; only trial 3 is good.
    ASHA stops trials 0-2 after their first epoch, so trial 3 starts (and gets there) sooner."""
    bad = [0.30, 0.32, 0.33]
    good = [0.50, 0.65, 0.70]
    random = summary(
        [
            trial("r_00000", bad, [10, 20, 30]),
            trial("r_00001", bad, [11, 21, 31]),
            trial("r_00002", bad, [40, 50, 60]),
            trial("r_00003", good, [41, 51, 61]),
        ],
        stopped=0,
        started=0.0,
    )
    asha = summary(
        [
            trial("a_00000", bad[:1], [10]),
            trial("a_00001", bad[:1], [11]),
            trial("a_00002", bad[:1], [20]),
            trial("a_00003", good, [21, 31, 41]),
        ],
        stopped=3,
        started=0.0,
    )
    got = search.compare(asha, random, trivial=0.2)
    assert got["same_configs"] and got["best_either"] == 0.70
    assert got["target_score"] == pytest.approx(0.2 + 0.9 * 0.5)  # 0.65: trial 3's second epoch
    assert got["random"]["to_target"]["trial_epochs"] == 10 and got["random"]["to_target"]["wall_s"] == 51
    assert got["asha"]["to_target"]["trial_epochs"] == 5 and got["asha"]["to_target"]["wall_s"] == 31
    assert got["ratio_trial_epochs"] == 0.5  # exactly the bound: met
    assert got["asha"]["trial_epochs"] == 6 and got["random"]["trial_epochs"] == 12
    c = got["causes"]  # 1 of 4 configurations gets there, at its 2nd epoch; both sweeps scored alike
    assert (c["reaching"], c["reaching_share"], c["first_epoch_reaching"]) == (1, 0.25, 2)
    assert c["repeat_pairs"] == 6 and c["repeat_noise_max"] == 0.0
    (t,) = search.targets({"task": "recsys", **got})
    assert t["met"] and t["op"] == "<=" and t["target"] == 0.5
    # an ASHA that stopped the good trial never reaches the target: no ratio, target not met
    asha["trials"][3] = trial("a_00003", good[:1], [21])
    got = search.compare(asha, random, trivial=0.2)
    assert got["asha"]["to_target"]["trial_epochs"] is None and got["ratio_trial_epochs"] is None
    assert not search.targets({"task": "recsys", **got})[0]["met"]
    rows = search.rows({"task": "recsys", "plan": search.PLANS["recsys"]["quick"], "seed": 0, **got})
    assert ("recsys", "ASHA: trial-epochs to target", "not reached") in rows


@pytest.mark.timeout(60)
def test_both_sweeps_search_the_production_space_with_the_same_seed_and_differ_only_in_the_scheduler(
    tmp_path,
):
    from jobs.config import load_recipe
    from tests.conftest import CONFIGS

    plan = search.PLANS["recsys"]["quick"]
    asha = search.make_recipe("recsys", plan, "asha", tmp_path)
    random = search.make_recipe("recsys", plan, "random", tmp_path)
    assert asha.tune.scheduler.name == "asha" and random.tune.scheduler.name == "fifo"
    assert asha.tune.space == random.tune.space == load_recipe(CONFIGS / "recsys.yaml").tune.space
    for r in (asha, random):
        assert r.profile == "tiny" and r.tune.num_samples == plan["num_samples"]
        assert r.tune.search.name == "random" and r.tune.search.seed == search.SEED
        assert not r.tune.include_defaults  # random points only
        assert r.tune.trial["train.epochs"] == plan["epochs"] and r.tune.trial["baselines.mf"] is False
    assert (asha.tune.scheduler.grace_period, asha.tune.scheduler.reduction_factor) == (
        plan["grace_period"],
        plan["reduction_factor"],
    )
    assert asha.data.root == random.data.root and asha.run.name != random.run.name
    assert asha.registry.uri != random.registry.uri


@pytest.mark.timeout(30)
def test_asha_rungs_are_ray_asha_milestones():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in ((1, 3, 9), (1, 3, 6), (1, 2, 6), (2, 3, 20)):
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)
        assert search.asha_rungs(grace, rf, max_t) == ray_rungs


@pytest.mark.timeout(30)
def test_replay_stops_trials_below_the_rung_cutoff_and_starts_the_next_one_in_their_slot():
    curves = [[0.30, 0.32, 0.33], [0.25, 0.26, 0.27], [0.20, 0.21, 0.22], [0.50, 0.65, 0.70]]
    asha = search.replay(curves, [0, 1, 2, 3], "asha", grace_period=1, reduction_factor=3, startup=0.0)
    assert [(v["trial"], v["epoch"], v["time"]) for v in asha] == [
        (0, 1, 1.0),  # first at the rung: goes on
        (1, 1, 1.0),  # below trial 0's 0.30: stopped, trial 2 takes its slot
        (0, 2, 2.0),
        (2, 1, 2.0),  # below the 67th percentile of (0.30, 0.25): stopped
        (0, 3, 3.0),
        (3, 1, 3.0),
        (3, 2, 4.0),
        (3, 3, 5.0),
    ]
    random = search.replay(curves, [0, 1, 2, 3], "random", startup=0.0)
    assert len(random) == 12 and [v["trial"] for v in random[6:8]] == [2, 3]
    got = search.replay_ratios(curves, 0.65, grace_period=1, reduction_factor=3, startup=0.0, orders=30)
    assert got["sampled_order"] == pytest.approx(7 / 10)  # trial 3's 2nd epoch: 7th vs 10th validation
    assert got["orders"] == 30 and 0 <= got["met_share"] <= 1 and got["median"] is not None


OWN_CLUSTER = """
import os, ray
from jobs.bench.search import own_cluster
before = os.environ.get("RAY_ADDRESS")
with own_cluster() as address:
    @ray.remote(num_cpus=0)
    def seen():
        from ray.util.state import list_actors
        list_actors()  # Train's placement-group cleaner finds its cluster this way
        return os.environ.get("RAY_ADDRESS")
    assert ray.get(seen.remote()) == address == ray.get_runtime_context().gcs_address, address
assert not ray.is_initialized() and os.environ.get("RAY_ADDRESS") == before
print("ok")
"""


@pytest.mark.timeout(240)
def test_the_sweeps_cluster_tells_every_worker_its_own_address():
    """Without RAY_ADDRESS a worker's state-API lookup fails as soon as a second Ray instance runs
    on the machine, and a trial ASHA stops keeps its CPU forever. A fresh process: the session's
    cluster (ray_local) must not be the one reused."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", OWN_CLUSTER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=220
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
