"""The code digest's change-detection rules, each shown across two processes.

Every case writes user modules to a temporary folder, digests a function in a fresh
interpreter, rewrites a module, and digests again in another interpreter with another
``PYTHONHASHSEED``: the digest must change exactly when the rules say the code changed
(see ``stepvisor.cache._code``'s docstring), and never otherwise.  A few in-process tests
follow for what needs one process: the memo's checks and never raising.
"""

from __future__ import annotations

import functools
import gc
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from stepvisor.cache._code import code_digest
from tests.cache_modules import digest_in_child, write_modules


def _twice(
    folder: Path,
    before: dict[str, str],
    after: dict[str, str],
    *,
    expression: str = "code_digest(mod.f)",
    setup: str = "import mod",
) -> tuple[str, str]:
    """The digest with ``before`` written, then with ``after`` written over it."""
    write_modules(folder, before)
    first = digest_in_child(folder, {"d": expression}, setup=setup, seed="1")["d"]
    write_modules(folder, after)
    second = digest_in_child(folder, {"d": expression}, setup=setup, seed="2")["d"]
    return first, second


BASE = """
    def f(x):
        return x + 1
"""


def test_the_same_code_in_two_processes_with_other_hash_seeds_gives_the_same_digest(
    tmp_path: Path,
) -> None:
    # Sets and frozensets (as constants and as defaults) and strings everywhere: their
    # hash() and iteration order differ between the two seeds.
    source = """
        import enum
        class Color(enum.Enum):
            RED = "red"
        NAMES = frozenset({"alpha", "beta", "gamma", "delta"})
        def f(x, opts={"k": {"a", "b", "c"}}, *, color=Color.RED):
            return x in {"p", "q", "r", "s"} and x in NAMES
    """
    first, second = _twice(tmp_path, {"mod": source}, {"mod": source})
    assert first == second
    assert len(first) == 64
    int(first, 16)


def test_a_changed_body_changes_the_digest(tmp_path: Path) -> None:
    after = BASE.replace("x + 1", "x + 2")
    first, second = _twice(tmp_path, {"mod": BASE}, {"mod": after})
    assert first != second


def test_moving_the_function_or_changing_a_comment_keeps_the_digest(tmp_path: Path) -> None:
    after = "\n\n# a comment above\n\n" + textwrap.dedent(BASE).replace("x + 1", "x + 1  # same")
    first, second = _twice(tmp_path, {"mod": BASE}, {"mod": after})
    assert first == second


@pytest.mark.parametrize(
    "use",
    [
        "from helpers import clean\ndef f(x):\n    return clean(x)\n",
        "import helpers\ndef f(x):\n    return helpers.clean(x)\n",
        "import pkg.helpers\ndef f(x):\n    return pkg.helpers.clean(x)\n",
    ],
    ids=["from-import", "module-attribute", "package-attribute-chain"],
)
def test_a_changed_helper_in_another_user_module_changes_the_digest(
    tmp_path: Path, use: str
) -> None:
    # joblib.Memory's blind spot: the cached function did not change, its helper did.
    helper = "def clean(x):\n    return inner(x)\ndef inner(x):\n    return x.strip()\n"
    changed = helper.replace("x.strip()", "x.lower()")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    first, second = _twice(
        tmp_path,
        {"mod": use, "helpers": helper, "pkg/helpers": helper},
        {"mod": use, "helpers": changed, "pkg/helpers": changed},
    )
    assert first != second


@pytest.mark.parametrize(
    ("modules", "setup"),
    [
        ({"mod": "def f(x):\n    import helpers\n    return helpers.clean(x)\n"}, "import mod"),
        ({"mod": "def f(x):\n    from helpers import clean\n    return clean(x)\n"}, "import mod"),
        (
            {"pkg/mod": "def f(x):\n    from . import helpers\n    return helpers.clean(x)\n"},
            "import pkg.mod as mod",
        ),
        (
            {"pkg/mod": "def f(x):\n    from .helpers import clean\n    return clean(x)\n"},
            "import pkg.mod as mod",
        ),
    ],
    ids=["import", "from-import", "relative-module", "relative-name"],
)
@pytest.mark.parametrize("ran", [False, True], ids=["not-imported-yet", "imported-by-a-run"])
def test_a_changed_module_imported_inside_the_function_changes_the_digest(
    tmp_path: Path, modules: dict[str, str], setup: str, ran: bool
) -> None:
    helper = "def clean(x):\n    return x.strip()\n"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    before = {**modules, "helpers": helper, "pkg/helpers": helper}
    after = {**before, "helpers": helper + "# v2\n", "pkg/helpers": helper + "# v2\n"}
    if ran:  # the step ran once in this process: the module is in memory
        after = {**after, "helpers": helper.replace("strip", "lower")}
        after["pkg/helpers"] = after["helpers"]
        setup += "\nmod.f(' x ')"
    first, second = _twice(tmp_path, before, after, setup=setup)
    assert first != second


def test_a_local_import_not_imported_yet_is_read_from_its_file_and_not_run(
    tmp_path: Path,
) -> None:
    source = "def f(x):\n    import helpers\n    return helpers.clean(x)\n"
    write_modules(tmp_path, {"mod": source, "helpers": "def clean(x):\n    return x\n"})
    found = digest_in_child(
        tmp_path,
        {"d": "code_digest(mod.f)", "imported": "'helpers' in sys.modules"},
        setup="import mod",
    )
    assert found["imported"] == "False"


def test_a_module_imported_already_is_read_as_it_is_in_memory_not_as_its_file(
    tmp_path: Path,
) -> None:
    # Edited without a reload: the process still runs the old code, so its key must stay
    # the old code's, never the new file's (a later process would reuse a wrong result).
    source = "def f(x):\n    import helpers\n    return helpers.clean(x)\n"
    old = "def clean(x):\n    return x\n"
    new = "def clean(x):\n    return -x\n"
    write_modules(tmp_path, {"mod": source, "helpers": old})
    setup = (
        "import mod, pathlib\nmod.f(1)\nbefore = code_digest(mod.f)\n"
        f"pathlib.Path('helpers.py').write_text({new!r})\n"
    )
    stale = digest_in_child(
        tmp_path, {"before": "before", "after": "code_digest(mod.f)"}, setup=setup
    )
    fresh = digest_in_child(tmp_path, {"d": "code_digest(mod.f)"}, setup="import mod\nmod.f(1)")
    assert stale["before"] == stale["after"]
    assert fresh["d"] != stale["after"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "def f(x, scale=2):\n    return x * scale\n",
            "def f(x, scale=3):\n    return x * scale\n",
        ),
        (
            "def f(x, *, scale=(1, 2)):\n    return x * scale[0]\n",
            "def f(x, *, scale=(1, 3)):\n    return x * scale[0]\n",
        ),
        (
            "def f(x, opts={'k': [1, 2]}):\n    return opts\n",
            "def f(x, opts={'k': [1, 3]}):\n    return opts\n",
        ),
    ],
    ids=["default", "keyword-default", "mutable-default"],
)
def test_a_changed_default_changes_the_digest(tmp_path: Path, before: str, after: str) -> None:
    first, second = _twice(tmp_path, {"mod": before}, {"mod": after})
    assert first != second


def test_two_functions_with_one_body_and_different_closures_differ(tmp_path: Path) -> None:
    # prefect#23062: hashing the source text gives these two one cache entry.
    source = """
        def make(factor):
            def f(x):
                return x * factor
            return f
        double, triple, double_again = make(2), make(3), make(2)
    """
    write_modules(tmp_path, {"mod": source})
    digests = digest_in_child(
        tmp_path,
        {
            "double": "code_digest(mod.double)",
            "triple": "code_digest(mod.triple)",
            "again": "code_digest(mod.double_again)",
        },
        setup="import mod",
    )
    assert digests["double"] != digests["triple"]
    assert digests["double"] == digests["again"]


def test_a_changed_closure_value_changes_the_digest(tmp_path: Path) -> None:
    source = "def make(k):\n    def f(x):\n        return x * k\n    return f\nf = make({})\n"
    first, second = _twice(
        tmp_path, {"mod": source.format("[1, 2]")}, {"mod": source.format("[1, 3]")}
    )
    assert first != second


def test_a_closure_holding_a_helper_function_follows_its_code(tmp_path: Path) -> None:
    helper = "def clean(x):\n    return x.strip()\n"
    source = (
        "from helpers import clean\ndef make(fn):\n    def f(x):\n        return fn(x)\n"
        "    return f\nf = make(clean)\n"
    )
    first, second = _twice(
        tmp_path,
        {"mod": source, "helpers": helper},
        {"mod": source, "helpers": helper.replace("strip", "lower")},
    )
    assert first != second


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("SCALE = 2", "SCALE = 3"),
        ("SCALE = 'a'", "SCALE = 'b'"),
        ("SCALE = (1, (2, b'x'))", "SCALE = (1, (2, b'y'))"),
        ("SCALE = frozenset({1.5, None})", "SCALE = frozenset({2.5, None})"),
        ("import enum\nclass E(enum.Enum):\n    A = 1\n    B = 2\nSCALE = E.A", None),
    ],
    ids=["int", "str", "nested-tuple", "frozenset", "enum"],
)
def test_a_changed_plain_global_changes_the_digest(
    tmp_path: Path, before: str, after: str | None
) -> None:
    after = after or before.replace("SCALE = E.A", "SCALE = E.B")
    body = "\ndef f(x):\n    return x * SCALE\n"
    first, second = _twice(tmp_path, {"mod": before + body}, {"mod": after + body})
    assert first != second


def test_a_changed_global_object_is_not_tracked(tmp_path: Path) -> None:
    # Documented: a global that is not plain data (here a dict) is tracked by its type
    # only. Cache(version=...) is the way to invalidate by hand.
    body = "\ndef f(x):\n    return x * CONFIG['scale']\n"
    first, second = _twice(
        tmp_path, {"mod": "CONFIG = {'scale': 2}" + body}, {"mod": "CONFIG = {'scale': 3}" + body}
    )
    assert first == second


def test_a_global_object_changed_to_another_type_changes_the_digest(tmp_path: Path) -> None:
    body = "\ndef f(x):\n    return x * CONFIG[0]\n"
    first, second = _twice(
        tmp_path, {"mod": "CONFIG = [2]" + body}, {"mod": "CONFIG = {0: 2}" + body}
    )
    assert first != second


def test_a_changed_library_function_is_not_tracked(tmp_path: Path) -> None:
    # An installed package (a site-packages folder on the path): its code is not the user's.
    lib = tmp_path / "venv" / "lib" / "site-packages"
    lib.mkdir(parents=True)
    source = "import fakelib\ndef f(x):\n    return fakelib.scale(x)\n"
    library = "def scale(x):\n    return x * 2\n"
    setup = f"sys.path.insert(0, {str(lib)!r})\nimport mod"
    write_modules(lib, {"fakelib": library})
    first, second = _twice(tmp_path, {"mod": source}, {"mod": source}, setup=setup)
    write_modules(lib, {"fakelib": library.replace("* 2", "* 3")})
    third = digest_in_child(tmp_path, {"d": "code_digest(mod.f)"}, setup=setup)["d"]
    assert first == second == third


@pytest.mark.parametrize(
    "before",
    [
        "def f(x):\n    return g(x) if x else 0\ndef g(x):\n    return f(x - 1) + 1\n",
        "def f(x):\n    return f(x - 1) + 1 if x else 0\n",
        "import other\ndef f(x):\n    return other.g(x)\ndef h(x):\n    return x + 1\n",
    ],
    ids=["mutual-recursion", "self-recursion", "module-cycle"],
)
def test_cycles_terminate_and_the_far_side_is_tracked(tmp_path: Path, before: str) -> None:
    # "+ 1" is in g (mutual), in f itself (self), in mod.h reached as f -> other.g -> mod.h.
    other = "import mod\ndef g(x):\n    return mod.h(x) + mod.f(x)\n"
    first, second = _twice(
        tmp_path,
        {"mod": before, "other": other},
        {"mod": before.replace("+ 1", "+ 2"), "other": other},
    )
    assert first != second


def test_a_closure_holding_a_list_that_holds_the_function_terminates(tmp_path: Path) -> None:
    source = (
        "def make():\n    box = []\n    def f(x):\n        return box[0](x - 1) if x else 0\n"
        "    box.append(f)\n    return f\nf = make()\n"
    )
    first, second = _twice(tmp_path, {"mod": source}, {"mod": source.replace("- 1", "- 2")})
    assert first != second


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "def f(xs):\n    return sorted(xs, key=lambda v: v[0])\n",
            "def f(xs):\n    return sorted(xs, key=lambda v: v[1])\n",
        ),
        (
            "KEY = lambda v: v[0]\ndef f(xs):\n    return sorted(xs, key=KEY)\n",
            "KEY = lambda v: v[1]\ndef f(xs):\n    return sorted(xs, key=KEY)\n",
        ),
        (
            "def f(xs):\n    def inner(v):\n        return [w * 2 for w in v]\n"
            "    return inner(xs)\n",
            "def f(xs):\n    def inner(v):\n        return [w * 3 for w in v]\n"
            "    return inner(xs)\n",
        ),
    ],
    ids=["inline-lambda", "global-lambda", "nested-function-and-comprehension"],
)
def test_lambdas_and_nested_functions_are_read(tmp_path: Path, before: str, after: str) -> None:
    first, second = _twice(tmp_path, {"mod": before}, {"mod": after})
    assert first != second


MODEL = """
class Base:
    def scale(self):
        return 2

class Model(Base):
    unit = "m"

    def predict(self, x):
        return x * self.scale() + helper()

    @staticmethod
    def tool():
        return 1

    @property
    def size(self):
        return 3

def helper():
    return 0

def f(x):
    return Model().predict(x)

INSTANCE = Model()

def g(x):
    return INSTANCE.predict(x)
"""


CHANGES = {
    "method": ("return x * self.scale()", "return x / self.scale()"),
    "base-class-method": ("return 2", "return 4"),
    "staticmethod": ("return 1", "return 5"),
    "property": ("return 3", "return 6"),
    "class-attribute": ('unit = "m"', 'unit = "s"'),
    "helper": ("return 0", "return 7"),
}
# Each way in: a function using the class, the class, a bound method (its self's class is
# read), a function using a global instance (a global object: its class's code is read, not
# its state), and a static method alone (which reaches only its own code).
TARGETS = [
    *((t, c) for t in ("mod.f", "mod.Model", "mod.Model().predict", "mod.g") for c in CHANGES),
    ("mod.Model.tool", "staticmethod"),
]


@pytest.mark.parametrize(("target", "change"), TARGETS, ids=[f"{t}-{c}" for t, c in TARGETS])
def test_methods_and_classes_are_read_with_what_they_reach(
    tmp_path: Path, target: str, change: str
) -> None:
    old, new = CHANGES[change]
    assert MODEL.count(old) == 1
    first, second = _twice(
        tmp_path,
        {"mod": MODEL},
        {"mod": MODEL.replace(old, new)},
        expression=f"code_digest({target})",
    )
    assert first != second


def test_moving_a_class_keeps_the_digest(tmp_path: Path) -> None:
    # Python 3.13 records a class's first line in its namespace (__firstlineno__).
    first, second = _twice(tmp_path, {"mod": MODEL}, {"mod": "\n\n\n" + MODEL})
    assert first == second


def test_a_changed_metaclass_changes_the_digest(tmp_path: Path) -> None:
    source = (
        "class Meta(type):\n    def make(cls):\n        return 1\n"
        "class Model(metaclass=Meta):\n    pass\n"
        "def f():\n    return Model.make()\n"
    )
    first, second = _twice(tmp_path, {"mod": source}, {"mod": source.replace("1", "2")})
    assert first != second


def test_functions_defined_in_main_are_the_users_code(tmp_path: Path) -> None:
    # python -c: __main__ has no file; the functions' code says "<string>".
    program = "SCALE = {}\ndef helper(x):\n    return x * SCALE\ndef f(x):\n    return helper(x)\n"
    digests = [
        digest_in_child(tmp_path, {"d": "code_digest(f)"}, setup=program.format(n), seed=seed)["d"]
        for n, seed in ((2, "1"), (2, "2"), (3, "3"))
    ]
    assert digests[0] == digests[1] != digests[2]


def test_a_script_run_as_main_is_the_users_code(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    body = (
        "from stepvisor.cache._code import code_digest\n"
        "def f(x):\n    return x + {}\nprint(code_digest(f))\n"
    )
    outputs = []
    for n in (1, 1, 2):
        script.write_text(body.format(n))
        setup = f"import runpy\nout = runpy.run_path({str(script)!r}, run_name='__main__')"
        outputs.append(digest_in_child(tmp_path, {"d": "code_digest(out['f'])"}, setup=setup)["d"])
    assert outputs[0] == outputs[1] != outputs[2]


# -- in one process: the memo and never raising ----------------------------------------------

SCALE = 2


def _scaled(x: int) -> int:
    return x * SCALE


def test_the_memo_sees_a_plain_global_rebound_in_the_same_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = code_digest(_scaled)
    assert code_digest(_scaled) == before
    monkeypatch.setitem(globals(), "SCALE", 3)
    assert code_digest(_scaled) != before
    monkeypatch.setitem(globals(), "SCALE", 2)
    assert code_digest(_scaled) == before


def test_the_memo_sees_a_small_mutable_default_changed_in_place() -> None:
    def f(x: int, table: list[int] = [1, 2]) -> int:  # noqa: B006 - the point of the test
        return table[x]

    before = code_digest(f)
    assert f.__defaults__ is not None
    f.__defaults__[0].append(3)
    assert code_digest(f) != before


def test_the_memo_sees_a_new_code_object_and_a_changed_cell() -> None:
    def make(k: int) -> Callable[[int], int]:
        def f(x: int) -> int:
            return x * k

        return f

    f = make(2)
    before = code_digest(f)
    assert f.__closure__ is not None
    f.__closure__[0].cell_contents = 3
    after_cell = code_digest(f)
    assert after_cell != before
    f.__code__ = f.__code__.replace(co_name="renamed")
    assert code_digest(f) not in (before, after_cell)


def test_partials_wrapped_and_decorated_functions_follow_the_function() -> None:
    def add(x: int, y: int) -> int:
        return x + y

    def sub(x: int, y: int) -> int:
        return x - y

    assert code_digest(functools.partial(add, 1)) != code_digest(functools.partial(add, 2))
    assert code_digest(functools.partial(add, 1)) != code_digest(functools.partial(sub, 1))
    assert code_digest(functools.lru_cache(add)) != code_digest(functools.lru_cache(sub))


class _Weird:
    """A callable whose attribute reads fail (but its class, which pytest's ids read)."""

    def __getattribute__(self, name: str) -> object:
        if name == "__class__":
            return type(self)
        raise RuntimeError(f"no {name}")

    def __call__(self) -> None:
        return None


@pytest.mark.parametrize(
    "fn",
    [print, len, str.join, _Weird(), types.SimpleNamespace, threading.Lock, sys.exit],
    ids=["print", "len", "method-descriptor", "weird", "library-class", "lock-factory", "exit"],
)
def test_any_callable_gets_a_digest_and_nothing_raises(fn: Callable[..., object]) -> None:
    digest = code_digest(fn)
    assert len(digest) == 64
    int(digest, 16)


def test_a_callable_instance_is_read_by_its_class_and_its_state() -> None:
    class Scaler:
        def __init__(self, k: int) -> None:
            self.k = k

        def __call__(self, x: int) -> int:
            return x * self.k

    assert code_digest(Scaler(2)) == code_digest(Scaler(2))
    assert code_digest(Scaler(2)) != code_digest(Scaler(3))


def test_threads_digesting_at_once_agree_with_one_thread() -> None:
    def make(k: int) -> Callable[[int], int]:
        def f(x: int) -> int:
            return _scaled(x) * k

        return f

    functions = [make(k % 3) for k in range(12)]
    expected = [code_digest(make(k % 3)) for k in range(12)]  # fresh objects, one thread
    start = threading.Barrier(4, timeout=30)
    results: dict[int, list[str]] = {}

    def work(index: int) -> None:
        start.wait()
        results[index] = [code_digest(fn) for fn in functions]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(not t.is_alive() for t in threads)
    assert [results[i] for i in range(4)] == [expected] * 4


def test_the_memo_does_not_keep_a_digested_function_alive() -> None:
    # A lambda per map instance must not pile up: the memo holds functions weakly and its
    # checks never name the function itself (here also held by its own closure cell).
    def make() -> Callable[[int], int]:
        def f(x: int) -> int:
            return f(x - 1) if x else 0

        return f

    fn = make()
    code_digest(fn)
    code_digest(fn)  # memoized
    alive = weakref.ref(fn)
    del fn
    gc.collect()
    assert alive() is None
