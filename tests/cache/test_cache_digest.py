"""The value digest: equal content gives equal digests, in any process; different content,
different digests; and a value whose content cannot be read is refused by name."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import socket
import struct
import threading
import uuid
from collections import Counter, OrderedDict, defaultdict, namedtuple
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepvisor.cache import _arrays
from stepvisor.cache._digest import DIGEST_SCHEME, UnhashableValue, value_digest
from stepvisor.errors import StepvisorError
from tests.cache_modules import digest_in_child

Point = namedtuple("Point", "x y")


class Tagged(str):
    pass


class Count(int):
    pass


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass(frozen=True)
class Params:
    scale: float
    names: tuple[str, ...] = ()


# -- plain values and containers ---------------------------------------------------------------

DISTINCT: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**200,
    1.0,
    0.0,
    -0.0,
    float("inf"),
    1 + 0j,
    "",
    "1",
    b"1",
    bytearray(b"1"),
    ...,
    (),
    [],
    {},
    set(),
    frozenset(),
    (1,),
    [1],
    {1},
    frozenset({1}),
    {1: None},
    ("ab", "c"),
    ("a", "bc"),
    [[1], [2]],
    [[1, 2]],
    [[], [1, 2]],
    [[1], [2], []],
    {"a": 1, "b": 2},
    {"b": 2, "a": 1},  # insertion order is read: a miss, never a wrong hit
    Point(1, 2),
    (1, 2),
    OrderedDict(a=1),
    Counter(a=1),
    Color.RED,
    Color.BLUE,
    Params(1.0),
    Params(1.0, ("x",)),
    Path("a/b"),
    PurePosixPath("a/b"),
    "a/b",
    datetime.date(2024, 1, 2),
    datetime.datetime(2024, 1, 2, 3, 4, 5),
    datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    datetime.timedelta(seconds=5),
    decimal.Decimal("1.10"),
    decimal.Decimal("1.1"),
    fractions.Fraction(1, 3),
    uuid.UUID(int=5),
    len,
    str,
    Tagged("1"),
    Count(1),
    Color.RED.__format__,
    functools.partial(int, base=2),
    functools.partial(int, base=3),
    memoryview(b"abcd"),
    memoryview(b"abcd").cast("h"),
]


def test_different_values_give_different_digests() -> None:
    digests = [value_digest(v) for v in DISTINCT]
    clashes = {d for d in digests if digests.count(d) > 1}
    assert not clashes, [v for v, d in zip(DISTINCT, digests, strict=True) if d in clashes]


def test_equal_values_built_the_same_way_give_equal_digests() -> None:
    def build() -> object:
        return {
            "rows": [1, 2.5, "x", b"y", None, (True, frozenset({"a", "b"}))],
            "tags": {"q", "r", "s"},
            "when": datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
            "p": Params(2.0, ("k",)),
            "c": Color.BLUE,
        }

    first, second = build(), build()
    assert first is not second
    assert value_digest(first) == value_digest(second)
    assert len(value_digest(first)) == 64


def test_a_set_digest_does_not_depend_on_its_iteration_order() -> None:
    # Same members, different insertion history (so possibly different table layouts).
    grown = set(range(1000))
    built: set[int] = set()
    for i in range(999, -1, -1):
        built.add(i)
    assert value_digest(grown) == value_digest(built)
    assert value_digest(frozenset(grown)) == value_digest(frozenset(built))


def test_a_dataclass_digest_covers_attributes_set_outside_its_fields() -> None:
    plain, extra = Params(1.0), Params(1.0)
    object.__setattr__(extra, "hidden", 2)
    assert value_digest(plain) == value_digest(Params(1.0))
    assert value_digest(extra) != value_digest(plain)


def test_a_defaultdict_digest_covers_its_factory() -> None:
    assert value_digest(defaultdict(list, a=[1])) != value_digest(defaultdict(lambda: [0], a=[1]))
    assert value_digest(defaultdict(list, a=[1])) == value_digest(defaultdict(list, a=[1]))
    assert value_digest(defaultdict(list, a=[1])) != value_digest({"a": [1]})


def test_a_large_buffer_is_hashed_by_content_past_the_small_token_path() -> None:
    big = bytes(range(256)) * 1024  # 256 KiB, over the direct-to-hash threshold
    assert value_digest(big) == value_digest(bytes(big))
    assert value_digest(big) != value_digest(big[:-1] + b"\x01")
    assert value_digest(memoryview(big)) == value_digest(memoryview(bytearray(big)))


def test_the_digest_starts_from_the_scheme_name() -> None:
    assert DIGEST_SCHEME.startswith("stepvisor-digest/1/")


# Any nesting of the plain types; two draws are compared through a type-tagged structure in
# which -0.0 and 0.0, 1 and 1.0 and True, a list and a tuple all differ, as in the digest.
PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=4)
        | st.frozensets(st.integers(-3, 3), max_size=4)
    ),
    max_leaves=12,
)


def _typed(value: object) -> object:
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(_typed(k), _typed(v)) for k, v in value.items()])
    if isinstance(value, frozenset):
        return ("frozenset", sorted(value))
    return (type(value).__name__, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PLAIN, PLAIN)
def test_digests_are_equal_exactly_when_the_typed_content_is(first: object, second: object) -> None:
    assert value_digest(copy.deepcopy(first)) == value_digest(first)
    assert (value_digest(first) == value_digest(second)) == (_typed(first) == _typed(second))


# -- NumPy ---------------------------------------------------------------------------------


def test_an_array_digest_covers_dtype_and_shape() -> None:
    ints = np.arange(12, dtype=np.int64)
    digests = {
        value_digest(ints),
        value_digest(ints.astype(np.int32)),
        value_digest(ints.astype(np.float64)),
        value_digest(ints.reshape(3, 4)),
        value_digest(ints.reshape(4, 3)),
        value_digest(ints.view(np.float64)),  # the same bytes, another dtype
        value_digest(ints.astype(">i8")),  # the same values, the other byte order
    }
    assert len(digests) == 7


def test_equal_array_content_gives_equal_digests_whatever_the_layout() -> None:
    c_order = np.arange(24.0).reshape(4, 6)
    fortran = np.asfortranarray(c_order)
    assert not fortran.flags.c_contiguous
    assert value_digest(c_order) == value_digest(fortran)
    view = c_order[:, ::2]
    assert not view.flags.c_contiguous
    assert value_digest(view) == value_digest(view.copy())
    assert value_digest(c_order.T) == value_digest(np.ascontiguousarray(c_order.T))
    assert value_digest(c_order.T) != value_digest(c_order)
    assert value_digest(c_order[1:3]) == value_digest(np.array(c_order[1:3]))


@pytest.mark.parametrize("slab", [8, 64, 1000, 16 << 20])
@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(7 * 13 * 3.0).reshape(7, 13, 3)),
        lambda: np.arange(7 * 13.0).reshape(7, 13)[:, ::3],
        lambda: np.arange(101.0)[::-2],
        lambda: np.arange(30, dtype=np.int16).reshape(5, 6).T,
    ],
    ids=["fortran-3d", "column-view", "reversed-1d", "transposed-int16"],
)
def test_a_strided_array_read_slab_by_slab_digests_like_its_c_copy(
    monkeypatch: pytest.MonkeyPatch, slab: int, make: Any
) -> None:
    monkeypatch.setattr(_arrays, "_SLAB", slab)
    array = make()
    assert not array.flags.c_contiguous
    assert value_digest(array) == value_digest(np.ascontiguousarray(array))


def test_array_content_changes_change_the_digest() -> None:
    array = np.zeros(1_000_000)
    before = value_digest(array)
    array[-1] = 1e-300
    assert value_digest(array) != before


def test_structured_arrays_are_read_field_by_field_never_their_padding() -> None:
    dtype = np.dtype([("a", np.int8), ("b", np.int64)], align=True)
    assert dtype.itemsize > 9  # there is padding between the fields
    first = np.zeros(3, dtype=dtype)
    second = np.frombuffer(bytes(range(dtype.itemsize)) * 3, dtype=dtype).copy()
    second["a"], second["b"] = 0, 0  # the same values, different bytes in the padding
    assert value_digest(first) == value_digest(second)
    second["b"][1] = 7
    assert value_digest(first) != value_digest(second)


def test_object_arrays_are_read_item_by_item() -> None:
    first = np.array(["x", 1, None], dtype=object)
    second = np.array(["x", 1, None], dtype=object)
    assert value_digest(first) == value_digest(second)
    second[1] = 2
    assert value_digest(first) != value_digest(second)
    with pytest.raises(UnhashableValue, match=r"a lock \(_thread.lock\) at \[0\]"):
        value_digest(np.array([threading.Lock()], dtype=object))


def test_numpy_scalars_zero_dim_and_empty_arrays_and_memmaps(tmp_path: Path) -> None:
    assert value_digest(np.float64(1.0)) != value_digest(np.float32(1.0))
    assert value_digest(np.float64(1.0)) != value_digest(1.0)
    assert value_digest(np.float64(1.0)) == value_digest(np.float64(1.0))
    assert value_digest(np.array(1.0)) != value_digest(np.array([1.0]))
    assert value_digest(np.zeros((0, 3))) != value_digest(np.zeros((3, 0)))
    assert value_digest(np.arange(3).astype("datetime64[s]")) != value_digest(np.arange(3))
    mapped = np.memmap(tmp_path / "a.bin", dtype=np.float64, mode="w+", shape=(5,))
    mapped[:] = np.arange(5.0)
    assert value_digest(mapped) == value_digest(np.arange(5.0))
    del mapped


def test_a_masked_array_is_read_with_its_mask() -> None:
    data = np.arange(4.0)
    assert value_digest(np.ma.array(data, mask=[False, True, False, False])) != value_digest(
        np.ma.array(data, mask=[False, False, True, False])
    )


# -- refused values ---------------------------------------------------------------------------


@pytest.fixture
def unreadable(tmp_path: Path) -> Iterator[dict[str, Any]]:
    left, right = socket.socketpair()
    with open(tmp_path / "f.txt", "w") as text, open(tmp_path / "f.bin", "wb") as binary:
        yield {
            "text": text,
            "binary": binary,
            "socket": left,
            "lock": threading.Lock(),
            "rlock": threading.RLock(),
            "generator": (i for i in range(3)),
            "iterator": iter([1, 2]),
            "object": object(),
        }
    left.close()
    right.close()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("text", r"^an open file \(_io.TextIOWrapper\)$"),
        ("binary", r"^an open file \(_io.BufferedWriter\)$"),
        ("socket", r"^a socket \(socket.socket\)$"),
        ("lock", r"^a lock \(_thread.lock\)$"),
        ("rlock", r"^a lock \(_thread.RLock\)$"),
        ("generator", r"^a generator or coroutine \(builtins.generator\)"),
        ("iterator", r"^an iterator \(builtins.list_iterator\)"),
        ("object", r"^a builtins.object, whose content the cache cannot read"),
    ],
)
def test_a_value_that_cannot_be_read_is_refused_by_name(
    unreadable: dict[str, Any], name: str, message: str
) -> None:
    with pytest.raises(UnhashableValue, match=message) as caught:
        value_digest(unreadable[name])
    assert isinstance(caught.value, StepvisorError)
    assert caught.value.where == ""


def test_the_refusal_says_where_inside_the_value(unreadable: dict[str, Any]) -> None:
    with pytest.raises(UnhashableValue) as caught:
        value_digest({"cfg": [1, Params(2.0)], "io": [0, unreadable["text"]]})
    assert str(caught.value) == "an open file (_io.TextIOWrapper) at ['io'][1]"
    assert caught.value.what == "an open file (_io.TextIOWrapper)"
    assert f"input 'f' is {caught.value}" == (
        "input 'f' is an open file (_io.TextIOWrapper) at ['io'][1]"
    )


def test_the_place_of_a_refused_part_is_shortened_for_a_long_key() -> None:
    key = "k" * 500
    with pytest.raises(UnhashableValue) as caught:
        value_digest({key: {"x": Params(threading.Lock())}})  # type: ignore[arg-type]
    assert str(caught.value).startswith("a lock (_thread.lock) at ['kkk")
    assert str(caught.value).endswith("kkk']['x'].scale")
    assert "..." in str(caught.value)
    assert len(str(caught.value)) < 100


def test_a_container_that_holds_itself_is_refused_not_a_recursion() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(UnhashableValue, match=r"a builtins.list that contains itself at \[1\]"):
        value_digest(loop)
    deep: list[object] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(UnhashableValue, match="nested more than"):
        value_digest(deep)


def test_a_datetime_with_an_unknown_tzinfo_is_refused() -> None:
    class Zone(datetime.tzinfo):
        def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

        def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

        def tzname(self, dt: datetime.datetime | None) -> str:
            return "Z"

    with pytest.raises(UnhashableValue, match="tzinfo"):
        value_digest(datetime.datetime(2024, 1, 1, tzinfo=Zone()))


def test_a_subclass_with_slots_is_refused() -> None:
    class Slotted(list[int]):
        __slots__ = ("hidden",)

    with pytest.raises(UnhashableValue, match="__slots__"):
        value_digest(Slotted([1]))


# -- across processes ---------------------------------------------------------------------------

VALUE = (
    "{'s': {'alpha', 'beta', 'gamma'}, 'f': frozenset({b'x', b'y'}), 'n': [1, 2.5, None],"
    " 'a': np.arange(12.0).reshape(3, 4).T, 'p': pathlib.Path('a/b')}"
)


def test_equal_values_give_equal_digests_in_processes_with_other_hash_seeds(
    tmp_path: Path,
) -> None:
    setup = "import numpy as np, pathlib"
    digests = {
        digest_in_child(tmp_path, {"d": f"value_digest({VALUE})"}, setup=setup, seed=seed)["d"]
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1


def test_plain_values_do_not_import_numpy(tmp_path: Path) -> None:
    found = digest_in_child(
        tmp_path,
        {"d": "value_digest({'a': [1, 2.0, 'x']})", "numpy": "'numpy' in sys.modules"},
    )
    assert found["numpy"] == "False"


def test_without_blake3_the_digest_falls_back_to_sha256_under_another_scheme_name(
    tmp_path: Path,
) -> None:
    # A broken install must still run; its digests can never match BLAKE3 ones.
    found = digest_in_child(
        tmp_path,
        {"scheme": "DIGEST_SCHEME", "d": "value_digest([1, 'a'])"},
        first="sys.modules['blake3'] = None",
        setup="from stepvisor.cache._digest import DIGEST_SCHEME",
    )
    assert found["scheme"] == "stepvisor-digest/1/sha256"
    assert DIGEST_SCHEME == "stepvisor-digest/1/blake3"
    assert found["d"] != value_digest([1, "a"])
    assert len(found["d"]) == 64
