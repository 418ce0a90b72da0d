"""scikit-learn's n_jobs on the joblib backend: the same scores as on loky.

Small data and models, so each case takes about a second; the estimators are
seeded, so equal scores are exactly equal (not approximately).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from joblib import parallel_config
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score

import stepvisor.joblib
from tests import joblib_loky

joblib_loky.prepare()


@pytest.fixture(autouse=True)
def registered(no_leaks: None) -> Iterator[None]:
    stepvisor.joblib.register()
    yield
    stepvisor.joblib.close()
    joblib_loky.stop()


def _data() -> tuple[Any, Any]:
    x, y = make_classification(n_samples=200, n_features=10, random_state=0)
    return x, y


def _on(backend: str, fn: Any) -> Any:
    with parallel_config(backend=backend, n_jobs=2):
        return fn()


def test_cross_val_score_gives_loky_s_scores() -> None:
    x, y = _data()
    model = RandomForestClassifier(n_estimators=10, random_state=0)

    def scores() -> Any:
        return cross_val_score(model, x, y, cv=4, n_jobs=2)

    on_loky, on_stepvisor = _on("loky", scores), _on("stepvisor", scores)
    np.testing.assert_array_equal(on_stepvisor, on_loky)
    assert on_stepvisor.shape == (4,)


def test_grid_search_cv_gives_loky_s_scores_and_choice() -> None:
    x, y = _data()

    def search() -> Any:
        grid = GridSearchCV(
            LogisticRegression(max_iter=200), {"C": [0.01, 0.1, 1.0]}, cv=3, n_jobs=2
        )
        return grid.fit(x, y)

    on_loky, on_stepvisor = _on("loky", search), _on("stepvisor", search)
    np.testing.assert_array_equal(
        on_stepvisor.cv_results_["mean_test_score"], on_loky.cv_results_["mean_test_score"]
    )
    assert on_stepvisor.best_params_ == on_loky.best_params_


def test_an_estimator_s_own_n_jobs_runs_on_the_backend() -> None:
    # A forest fits its trees with Parallel(prefer="threads"): thread calls here.
    x, y = _data()

    def fit() -> Any:
        return RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=2).fit(x, y)

    on_loky, on_stepvisor = _on("loky", fit), _on("stepvisor", fit)
    np.testing.assert_array_equal(on_stepvisor.predict(x), on_loky.predict(x))
