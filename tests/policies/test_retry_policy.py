"""Tests for the retry policy: delays, classification, validation, config mappings.

All pure: a policy is arithmetic on frozen values, so nothing here sleeps or
needs a clock.  Hypothesis runs without its example database (database=None).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from stepvisor.errors import (
    FatalError,
    InvalidRetryPolicyError,
    InvalidSettingError,
    RetryableError,
    StepError,
    StepTimeoutError,
    WorkerCrashedError,
)
from stepvisor.policies.retry import Backoff, FailureKind, RetryDecision, RetryPolicy

quick = settings(database=None, max_examples=60, deadline=None)
seeds = st.integers(min_value=-(2**63), max_value=2**63)
step_ids = st.text(min_size=1, max_size=20)

WHERE = "etl.yaml: step 'load'"


def decide(
    policy: RetryPolicy,
    error: BaseException,
    *,
    attempt: int = 1,
    kind: FailureKind = FailureKind.ERROR,
    seed: int = 0,
    step_id: str = "load",
) -> RetryDecision:
    return policy.decide(error=error, kind=kind, attempt=attempt, seed=seed, step_id=step_id)


def no_jitter(**options: float) -> Backoff:
    return Backoff.exponential(jitter="none", **options)


# -- delays -----------------------------------------------------------------------


def test_exponential_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff=no_jitter(initial=1, multiplier=2, cap=5))
    assert policy.delays(5) == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_exponential_backoff_with_multiplier_one_is_constant() -> None:
    policy = RetryPolicy(backoff=no_jitter(initial=0.5, multiplier=1, cap=10))
    assert policy.delays(4) == [0.5, 0.5, 0.5, 0.5]


def test_fixed_and_none_backoffs_give_constant_delays() -> None:
    assert RetryPolicy(backoff=Backoff.fixed(2.5)).delays(3) == [2.5, 2.5, 2.5]
    assert RetryPolicy(backoff=Backoff.none()).delays(3) == [0.0, 0.0, 0.0]


def test_default_backoff_is_exponential_1_2_60_with_full_jitter() -> None:
    assert RetryPolicy().backoff == Backoff.exponential(
        initial=1.0, multiplier=2.0, cap=60.0, jitter="full"
    )


def test_delays_ignore_max_attempts_and_accept_zero() -> None:
    policy = RetryPolicy(max_attempts=1, backoff=Backoff.fixed(1))
    assert policy.delays(4) == [1.0] * 4
    assert policy.delays(0) == []


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    policy = RetryPolicy(backoff=no_jitter(initial=1, multiplier=3, cap=7))
    assert policy.delays(2000)[-1] == 7.0


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_delays_rejects_a_bad_count(n: Any) -> None:
    with pytest.raises(InvalidSettingError, match="n must be an integer >= 0"):
        RetryPolicy().delays(n)


def _peaks(backoff: Backoff, n: int) -> list[float]:
    return RetryPolicy(
        backoff=Backoff(
            kind=backoff.kind,
            initial=backoff.initial,
            multiplier=backoff.multiplier,
            cap=backoff.cap,
            jitter="none",
        )
    ).delays(n)


backoffs = st.one_of(
    st.builds(
        Backoff.exponential,
        initial=st.floats(0, 5),
        multiplier=st.floats(1, 4),
        cap=st.floats(5, 100),
        jitter=st.sampled_from(["full", "equal"]),
    ),
    st.builds(Backoff.fixed, st.floats(0, 30), jitter=st.sampled_from(["full", "equal"])),
)


@quick
@given(backoff=backoffs, seed=seeds, step_id=step_ids)
def test_jittered_delays_stay_within_their_bounds(
    backoff: Backoff, seed: int, step_id: str
) -> None:
    delays = RetryPolicy(backoff=backoff).delays(8, seed=seed, step_id=step_id)
    low = 0.0 if backoff.jitter == "full" else 0.5
    for delay, peak in zip(delays, _peaks(backoff, 8), strict=True):
        assert low * peak <= delay <= peak


@quick
@given(seed=seeds, step_id=step_ids, jitter=st.sampled_from(["full", "equal"]))
def test_same_seed_and_step_give_the_same_delays(seed: int, step_id: str, jitter: Any) -> None:
    backoff = Backoff.exponential(jitter=jitter)
    first = RetryPolicy(backoff=backoff).delays(6, seed=seed, step_id=step_id)
    again = RetryPolicy(backoff=backoff).delays(6, seed=seed, step_id=step_id)
    assert first == again


@quick
@given(seed=seeds, jitter=st.sampled_from(["full", "equal"]))
def test_two_steps_or_two_seeds_get_different_delays(seed: int, jitter: Any) -> None:
    policy = RetryPolicy(backoff=Backoff.exponential(jitter=jitter))
    delays = policy.delays(6, seed=seed, step_id="extract")
    assert delays != policy.delays(6, seed=seed, step_id="transform")
    assert delays != policy.delays(6, seed=seed + 1, step_id="extract")


def test_jitter_spreads_delays_across_their_range() -> None:
    # A constant fraction of the peak would pass the bounds test; it must not pass here.
    policy = RetryPolicy(backoff=Backoff.fixed(10, jitter="full"))
    firsts = [policy.delays(1, seed=seed)[0] for seed in range(200)]
    assert min(firsts) < 1.0
    assert max(firsts) > 9.0


def test_delays_are_the_same_in_another_process_with_another_hash_seed() -> None:
    script = textwrap.dedent(
        """
        import json
        from stepvisor.policies.retry import Backoff, RetryPolicy
        policy = RetryPolicy(backoff=Backoff.exponential(jitter="equal"))
        print(json.dumps(policy.delays(5, seed=42, step_id="transform")))
        """
    )
    here = RetryPolicy(backoff=Backoff.exponential(jitter="equal")).delays(
        5, seed=42, step_id="transform"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert json.loads(done.stdout) == here


def test_decide_delay_is_the_backoff_delay_for_that_attempt() -> None:
    policy = RetryPolicy(max_attempts=6)
    expected = policy.delays(5, seed=7, step_id="load")
    for attempt in range(1, 6):
        decision = decide(policy, ConnectionError(), attempt=attempt, seed=7)
        assert decision.retry
        assert decision.delay == expected[attempt - 1]


# -- classification -----------------------------------------------------------------


def test_matching_retry_on_is_retried_with_a_readable_reason() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=ConnectionError, backoff=Backoff.fixed(1.5))
    decision = decide(policy, ConnectionError("reset"))
    assert decision == RetryDecision(
        True,
        1.5,
        "ConnectionError matches retry_on (ConnectionError); retrying in 1.50 s (attempt 2 of 3)",
    )


def test_retry_on_matches_subclasses() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(KeyError, ConnectionError))
    decision = decide(policy, ConnectionResetError())
    assert decision.retry
    assert decision.reason.startswith("ConnectionResetError matches retry_on (ConnectionError);")


def test_error_outside_retry_on_is_not_retried() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(ConnectionError, TimeoutError))
    assert decide(policy, ValueError()) == RetryDecision(
        False, 0.0, "ValueError does not match retry_on (ConnectionError, TimeoutError)"
    )


def test_give_up_on_beats_retry_on() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(Exception,), give_up_on=(ValueError,))
    assert decide(policy, ValueError()) == RetryDecision(
        False, 0.0, "ValueError matches give_up_on (ValueError)"
    )


def test_give_up_on_matches_subclasses() -> None:
    policy = RetryPolicy(max_attempts=3, give_up_on=LookupError)
    decision = decide(policy, KeyError("x"))
    assert not decision.retry
    assert decision.reason == "KeyError matches give_up_on (LookupError)"


def test_retry_if_true_retries_what_retry_on_does_not_list() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(), retry_if=lambda exc: "429" in str(exc))
    assert decide(policy, ValueError("HTTP 429")).retry
    refused = decide(policy, ValueError("HTTP 400"))
    assert refused == RetryDecision(
        False, 0.0, "ValueError matches neither retry_on (nothing) nor retry_if"
    )


def test_give_up_on_beats_retry_if() -> None:
    policy = RetryPolicy(max_attempts=3, give_up_on=ValueError, retry_if=lambda exc: True)
    assert not decide(policy, ValueError()).retry


def test_retry_if_that_raises_means_not_retried_and_says_so() -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    policy = RetryPolicy(max_attempts=3, retry_on=(), retry_if=broken)
    decision = decide(policy, ValueError())
    assert not decision.retry
    assert decision.reason.startswith(
        "retry_if raised RuntimeError: predicate bug when asked about ValueError"
    )


def test_retryable_error_is_retried_even_if_retry_on_does_not_list_it() -> None:
    policy = RetryPolicy(max_attempts=3, retry_on=(KeyError,), backoff=Backoff.fixed(2))
    decision = decide(policy, RetryableError("busy"))
    assert decision == RetryDecision(
        True, 2.0, "RetryableError: the step asked for a retry; retrying in 2.00 s (attempt 2 of 3)"
    )


def test_retryable_error_after_replaces_the_backoff_delay() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=no_jitter(initial=1, cap=2))
    decision = decide(policy, RetryableError("rate limited", after=30.0))
    assert decision.retry
    assert decision.delay == 30.0
    assert "retrying in 30.00 s, the delay it asked for" in decision.reason


def test_give_up_on_beats_retryable_error() -> None:
    class ThrottledError(RetryableError):
        pass

    policy = RetryPolicy(max_attempts=3, give_up_on=ThrottledError)
    assert not decide(policy, ThrottledError(after=1)).retry
    assert decide(policy, RetryableError(after=1)).retry


def test_retryable_error_still_respects_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=2)
    decision = decide(policy, RetryableError(after=0), attempt=2)
    assert not decision.retry
    assert decision.reason.endswith("no attempts left (2 of 2)")


def test_fatal_error_is_never_retried_whatever_the_policy_says() -> None:
    policy = RetryPolicy(max_attempts=5, retry_on=(Exception,), retry_if=lambda exc: True)
    assert decide(policy, FatalError("bad input")) == RetryDecision(
        False, 0.0, "FatalError: the step asked never to be retried"
    )


def test_no_retry_when_no_attempts_are_left() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert decide(policy, ConnectionError(), attempt=2).retry
    decision = decide(policy, ConnectionError(), attempt=3)
    assert decision == RetryDecision(
        False,
        0.0,
        "ConnectionError matches retry_on (Exception), but no attempts left (3 of 3)",
    )


def test_default_policy_does_not_retry() -> None:
    assert not decide(RetryPolicy(), ConnectionError()).retry


@pytest.mark.parametrize(
    ("kind", "error", "flag", "words"),
    [
        (FailureKind.TIMEOUT, StepTimeoutError("late"), "retry_timeouts", "the attempt timed out"),
        (
            FailureKind.CRASH,
            WorkerCrashedError("died"),
            "retry_crashes",
            "the worker running the attempt crashed",
        ),
    ],
)
@pytest.mark.parametrize("on", [True, False])
def test_timeouts_and_crashes_follow_their_flags(
    kind: FailureKind, error: BaseException, flag: str, words: str, on: bool
) -> None:
    # retry_on/give_up_on do not apply: only the flag decides.
    flags: dict[str, Any] = {flag: on}
    policy = RetryPolicy(max_attempts=2, retry_on=(), give_up_on=Exception, **flags)
    decision = decide(policy, error, kind=kind)
    assert decision.retry is on
    state = "on" if on else "off"
    assert decision.reason.startswith(f"{words} and {flag} is {state}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "error"}, "kind must be a FailureKind"),
        ({"attempt": 0}, "attempt must be the 1-based number"),
        ({"seed": None}, "seed must be an integer"),
    ],
)
def test_decide_rejects_bad_arguments(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "error": ValueError(),
        "kind": FailureKind.ERROR,
        "attempt": 1,
        "seed": 0,
        "step_id": "s",
    }
    with pytest.raises(InvalidSettingError, match=message):
        RetryPolicy().decide(**{**arguments, **options})


class _BaseError(Exception):
    pass


class _ChildError(_BaseError):
    pass


class _RetryableError(RetryableError):
    pass


class _FatalError(FatalError):
    pass


_POOL: list[type[BaseException]] = [
    Exception,
    ValueError,
    KeyError,
    LookupError,
    ConnectionError,
    ConnectionResetError,
    _BaseError,
    _ChildError,
    RetryableError,
    _RetryableError,
    FatalError,
    _FatalError,
]


@quick
@given(
    raised=st.sampled_from(_POOL),
    retry_on=st.lists(st.sampled_from(_POOL), max_size=3),
    give_up_on=st.lists(st.sampled_from(_POOL), max_size=3),
    retry_if_types=st.none() | st.lists(st.sampled_from(_POOL), max_size=2),
)
def test_error_rules_agree_with_the_tenacity_composition(
    raised: type[BaseException],
    retry_on: list[type[BaseException]],
    give_up_on: list[type[BaseException]],
    retry_if_types: list[type[BaseException]] | None,
) -> None:
    """decide's first-match rules == retry_all(not give_up_on, retry_any(retry_on, retry_if))."""

    def retry_if(exc: BaseException) -> bool:
        return retry_if_types is not None and isinstance(exc, tuple(retry_if_types))

    policy = RetryPolicy(
        max_attempts=2,
        retry_on=tuple(retry_on),
        give_up_on=tuple(give_up_on),
        retry_if=None if retry_if_types is None else retry_if,
    )
    composed = tenacity.retry_all(
        tenacity.retry_if_not_exception_type((FatalError, *give_up_on)),
        tenacity.retry_any(
            tenacity.retry_if_exception_type((RetryableError, *retry_on)),
            tenacity.retry_if_exception(retry_if),
        ),
    )
    error = raised()
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.set_exception((raised, error, None))
    assert decide(policy, error).retry is composed(state)


# -- invalid policies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (RetryPolicy, {"max_attempts": 0}, r"^max_attempts must be >= 1, got 0; use 1 for"),
        (RetryPolicy, {"max_attempts": 2.0}, r"^max_attempts must be an integer, got 2\.0"),
        (RetryPolicy, {"max_attempts": True}, r"^max_attempts must be an integer, got True"),
        (Backoff.exponential, {"initial": -1}, r"^initial must be a finite number of seconds >= 0"),
        (Backoff.exponential, {"initial": math.nan}, r"^initial must be a finite .* got nan"),
        (Backoff.exponential, {"cap": math.inf}, r"^cap must be a finite number of seconds"),
        (Backoff.exponential, {"initial": "1"}, r"^initial must be a number of seconds, got '1'"),
        (Backoff.exponential, {"initial": 10, "cap": 5}, r"^cap must be >= initial, got cap=5 "),
        (Backoff.exponential, {"multiplier": 0.5}, r"^multiplier must be a finite number >= 1"),
        (Backoff.exponential, {"multiplier": math.nan}, r"^multiplier must be a finite number"),
        (Backoff.exponential, {"jitter": "gauss"}, r"^jitter must be one of 'none', 'full', 'eq"),
        (Backoff.fixed, {"delay": -2}, r"^delay must be a finite number of seconds >= 0, got -2"),
        (Backoff.fixed, {"delay": math.nan}, r"^delay must be a finite number of seconds >= 0"),
        (Backoff, {"kind": "linear"}, r"^backoff must be one of 'exponential', 'fixed', 'none'"),
        (RetryPolicy, {"backoff": "fixed"}, r"^backoff must be a Backoff, got 'fixed'; use"),
        (RetryPolicy, {"retry_on": "ValueError"}, r"^retry_on must be an exception class or a"),
        (RetryPolicy, {"retry_on": (ValueError(),)}, r"^retry_on must hold exception classes"),
        (RetryPolicy, {"give_up_on": (int,)}, r"^give_up_on must hold exception classes, got"),
        (RetryPolicy, {"retry_if": 3}, r"^retry_if must be a function taking the exception"),
        (RetryPolicy, {"retry_timeouts": "yes"}, r"^retry_timeouts must be True or False"),
        (RetryPolicy, {"retry_crashes": None}, r"^retry_crashes must be True or False"),
    ],
)
def test_invalid_policy_is_rejected_with_a_clear_message(
    make: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRetryPolicyError, match=message):
        make(**options)


def test_invalid_retry_policy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_single_exception_class_is_normalized_to_a_tuple() -> None:
    policy = RetryPolicy(retry_on=ConnectionError, give_up_on=(ValueError, KeyError))
    assert policy.retry_on == (ConnectionError,)
    assert policy.give_up_on == (ValueError, KeyError)
    assert policy == RetryPolicy(retry_on=(ConnectionError,), give_up_on=(ValueError, KeyError))


def test_fields_that_do_not_apply_to_a_backoff_kind_are_neutral() -> None:
    assert Backoff.fixed(3) == Backoff(kind="fixed", initial=3, jitter="none")
    assert Backoff.fixed(3).cap == 3.0
    assert Backoff.none() == Backoff(kind="none")
    assert Backoff.none().jitter == "none"


# -- config mappings ----------------------------------------------------------------------


def test_from_mapping_builds_the_policy_the_mapping_describes() -> None:
    policy = RetryPolicy.from_mapping(
        {
            "max_attempts": 4,
            "backoff": "exponential",
            "initial": 0.5,
            "multiplier": 3,
            "cap": 20,
            "jitter": "equal",
            "retry_on": ["ConnectionError", "builtins.TimeoutError", "stepvisor.errors.StepError"],
            "give_up_on": ["stepvisor.errors:FatalError"],
            "retry_timeouts": False,
            "retry_crashes": False,
        },
        where=WHERE,
    )
    assert policy == RetryPolicy(
        max_attempts=4,
        backoff=Backoff.exponential(initial=0.5, multiplier=3, cap=20, jitter="equal"),
        retry_on=(ConnectionError, TimeoutError, StepError),
        give_up_on=(FatalError,),
        retry_timeouts=False,
        retry_crashes=False,
    )


def test_from_mapping_uses_the_class_defaults_for_missing_keys() -> None:
    assert RetryPolicy.from_mapping({}, where=WHERE) == RetryPolicy()
    assert RetryPolicy.from_mapping({"backoff": "fixed", "delay": 2}, where=WHERE) == (
        RetryPolicy(backoff=Backoff.fixed(2))
    )
    assert RetryPolicy.from_mapping({"backoff": "none"}, where=WHERE) == (
        RetryPolicy(backoff=Backoff.none())
    )
    assert RetryPolicy.from_mapping({"retry_on": "KeyError"}, where=WHERE).retry_on == (KeyError,)


def test_from_mapping_resolves_retry_if_by_name() -> None:
    policy = RetryPolicy.from_mapping({"retry_if": "builtins:callable"}, where=WHERE)
    assert policy.retry_if is callable


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(max_attempts=5, backoff=no_jitter(initial=0.25, cap=8), give_up_on=FatalError),
        RetryPolicy(backoff=Backoff.fixed(3, jitter="full"), retry_on=(_ChildError, KeyError)),
        RetryPolicy(backoff=Backoff.none(), retry_if=callable, retry_timeouts=False),
    ],
)
def test_to_mapping_is_json_and_reads_back_as_the_same_policy(policy: RetryPolicy) -> None:
    data = json.loads(json.dumps(policy.to_mapping()))
    assert RetryPolicy.from_mapping(data, where=WHERE) == policy


def test_to_mapping_names_builtins_plainly_and_others_by_module() -> None:
    data = RetryPolicy(retry_on=(ValueError, _ChildError)).to_mapping()
    assert data["retry_on"] == ["ValueError", f"{__name__}:_ChildError"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_attempts": 0}, "retry.max_attempts must be >= 1, got 0"),
        ({"max_attempts": "3"}, "retry.max_attempts must be an integer, got '3' (str)"),
        (
            {"max_attempt": 3},
            "retry.max_attempt is not a retry setting; did you mean max_attempts?",
        ),
        ({"backoff": "linear"}, "retry.backoff must be one of 'exponential', 'fixed', 'none'"),
        ({"delay": 2}, "retry.delay does not apply to backoff 'exponential'; remove it, or set"),
        ({"backoff": "fixed", "cap": 2, "delay": 1}, "retry.cap does not apply to backoff 'fixed'"),
        ({"backoff": "none", "jitter": "full"}, "retry.jitter does not apply to backoff 'none'"),
        ({"backoff": "fixed"}, "retry.delay is required with backoff 'fixed'"),
        ({"backoff": "fixed", "delay": -1}, "retry.delay must be a finite number of seconds >= 0"),
        ({"initial": 5, "cap": 1}, "retry.cap must be >= initial, got cap=1 below initial=5"),
        ({"multiplier": 0}, "retry.multiplier must be a finite number >= 1"),
        ({"jitter": "half"}, "retry.jitter must be one of 'none', 'full', 'equal', got 'half'"),
        ({"retry_on": 3}, "retry.retry_on must be a list of exception class names"),
        (
            {"retry_on": ["ValueError", "Nope"]},
            "retry.retry_on[1] names 'Nope', which is not a builtin",
        ),
        (
            {"give_up_on": ["nosuchpkg.Error"]},
            "retry.give_up_on[0] names 'nosuchpkg.Error', but module",
        ),
        (
            {"give_up_on": ["stepvisor.errors:Nope"]},
            "retry.give_up_on[0] names 'stepvisor.errors:Nope'",
        ),
        (
            {"retry_on": ["builtins.len"]},
            "retry.retry_on[0] names 'builtins.len', which is not an excep",
        ),
        ({"retry_on": [7]}, "retry.retry_on[0] must be a name such as 'ValueError'"),
        (
            {"retry_if": "builtins:__name__"},
            "retry.retry_if must be a function taking the exception",
        ),
        ({"retry_timeouts": "no"}, "retry.retry_timeouts must be True or False, got 'no'"),
    ],
)
def test_from_mapping_errors_start_with_where_then_the_key(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRetryPolicyError) as caught:
        RetryPolicy.from_mapping(data, where=WHERE)
    assert str(caught.value).startswith(f"{WHERE}: {message}")


def test_from_mapping_rejects_something_that_is_not_a_mapping() -> None:
    with pytest.raises(InvalidRetryPolicyError, match=r"^etl\.yaml: step 'load': retry must be a"):
        RetryPolicy.from_mapping([("max_attempts", 3)], where=WHERE)  # type: ignore[arg-type]


@pytest.mark.parametrize("step_id", ["load", 'say "hi"', "naïve/étape", "tab\there", ""])
def test_jitter_draws_from_the_key_earlier_versions_used(step_id: str) -> None:
    # A run resumed by a newer stepvisor with the same seed waits the same delays:
    # the source is seeded from sha256(json.dumps(["stepvisor.retry", seed, id, n])).
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415
    import random  # noqa: PLC0415

    policy = RetryPolicy(backoff=Backoff.exponential(initial=1, multiplier=2, cap=60))
    for attempt in (1, 2, 5):
        key = json.dumps(["stepvisor.retry", 42, step_id, attempt]).encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        peak = min(60.0, 1.0 * 2 ** (attempt - 1))
        expected = rng.uniform(0.0, peak)
        assert policy.delays(attempt, seed=42, step_id=step_id)[-1] == pytest.approx(expected)


# -- a failure decided on late -----------------------------------------------------


def _late(policy: RetryPolicy, step_id: str, late: float, attempt: int = 1) -> float:
    return policy.decide(
        error=ConnectionError("down"),
        kind=FailureKind.ERROR,
        attempt=attempt,
        seed=7,
        step_id=step_id,
        late=late,
    ).delay


JITTERED = RetryPolicy(max_attempts=3, backoff=Backoff.exponential(initial=0.2, cap=1.0))


def test_a_failure_decided_on_at_once_keeps_its_drawn_delay() -> None:
    for i in range(50):
        drawn = JITTERED.delays(1, seed=7, step_id=f"s{i}")[0]
        assert _late(JITTERED, f"s{i}", 0.0) == drawn


def test_a_jittered_delay_decided_on_late_is_waited_from_the_decision() -> None:
    # Counted from the attempt's end, every draw shorter than the lag would be
    # past already and those retries would start at once, together.
    for i in range(200):
        drawn = JITTERED.delays(1, seed=7, step_id=f"s{i}")[0]
        assert _late(JITTERED, f"s{i}", 0.15) == pytest.approx(0.15 + drawn)


def test_retries_decided_on_late_stay_as_spread_as_their_draws() -> None:
    # What the service sees is the wait from the decision: the draws themselves,
    # uniform over the window, not bunched at the lag.
    late = 0.15
    waits = sorted(_late(JITTERED, f"s{i}", late) - late for i in range(2000))
    assert waits[0] >= 0.0
    assert waits[-1] <= 0.2
    first_tenth = sum(1 for w in waits if w < 0.02)  # uniform over [0, 0.2]: about a tenth
    assert 0.05 * len(waits) < first_tenth < 0.15 * len(waits)


def test_a_late_delay_is_still_a_function_of_the_seed_step_and_lateness() -> None:
    assert _late(JITTERED, "s1", 0.1) == _late(JITTERED, "s1", 0.1)
    assert _late(JITTERED, "s1", 0.1) != _late(JITTERED, "s2", 0.1)


def test_the_reason_says_a_lag_worth_saying() -> None:
    def reason(late: float) -> str:
        return JITTERED.decide(
            error=ConnectionError("down"),
            kind=FailureKind.ERROR,
            attempt=1,
            seed=7,
            step_id="s1",
            late=late,
        ).reason

    drawn = JITTERED.delays(1, seed=7, step_id="s1")[0]
    assert f"retrying in {drawn:.2f} s from now, 0.15 s after the attempt ended" in reason(0.15)
    assert reason(0.0001).endswith(f"retrying in {drawn:.2f} s (attempt 2 of 3)")


def test_equal_jitter_is_waited_from_the_decision_too() -> None:
    policy = RetryPolicy(
        max_attempts=2, backoff=Backoff.exponential(initial=1.0, cap=1.0, jitter="equal")
    )
    for i in range(100):
        drawn = policy.delays(1, seed=7, step_id=f"s{i}")[0]
        assert 0.5 <= drawn <= 1.0
        assert _late(policy, f"s{i}", 0.3) == pytest.approx(0.3 + drawn)


def test_no_jitter_or_a_delay_the_step_asked_for_is_never_moved() -> None:
    fixed = RetryPolicy(max_attempts=2, backoff=no_jitter(initial=0.5, cap=0.5))
    assert _late(fixed, "s1", 0.3) == pytest.approx(0.5)
    assert _late(fixed, "s1", 2.0) == pytest.approx(0.5)
    asked = JITTERED.decide(
        error=RetryableError("busy", after=0.05),
        kind=FailureKind.ERROR,
        attempt=1,
        seed=7,
        step_id="s1",
        late=0.1,
    )
    assert asked.delay == pytest.approx(0.05)
