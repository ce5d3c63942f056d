"""What a request asks of the cache, and whether a stored entry may answer it."""

from __future__ import annotations

import pytest

from cache.control import (
    MAX_NAMESPACE_LENGTH,
    ControlError,
    RequestControl,
    is_fresh,
    parse_duration,
    request_control,
)

# request_control: Cache-Control directives


def test_no_headers_ask_for_nothing_special() -> None:
    assert request_control([]) == RequestControl()
    assert request_control([("content-type", "application/json"), ("authorization", "Bearer x")]) == RequestControl()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("no-cache", RequestControl(no_cache=True), id="no-cache"),
        pytest.param("no-store", RequestControl(no_store=True), id="no-store"),
        pytest.param("only-if-cached", RequestControl(only_if_cached=True), id="only-if-cached"),
        pytest.param("max-age=60", RequestControl(max_age=60), id="max-age"),
        pytest.param("max-age=0", RequestControl(max_age=0), id="max-age-zero"),
        pytest.param('max-age="60"', RequestControl(max_age=60), id="quoted-max-age"),
        pytest.param("max-age = 60", RequestControl(max_age=60), id="spaces-around-equals"),
        pytest.param("NO-CACHE, Max-Age=5", RequestControl(no_cache=True, max_age=5), id="case-insensitive-names"),
        pytest.param(
            "no-cache, no-store,only-if-cached , max-age=30",
            RequestControl(no_cache=True, no_store=True, only_if_cached=True, max_age=30),
            id="all-in-one-header",
        ),
        pytest.param(
            "private, stale-while-revalidate=bogus, no-transform, x-custom, max-stale",
            RequestControl(),
            id="unknown-directives-ignored",
        ),
        pytest.param("foo=bar, no-store, baz", RequestControl(no_store=True), id="known-among-unknown"),
        pytest.param(", ,no-cache,,", RequestControl(no_cache=True), id="empty-parts-ignored"),
    ],
)
def test_cache_control_directives(value: str, expected: RequestControl) -> None:
    assert request_control([("Cache-Control", value)]) == expected


def test_directives_add_up_across_several_cache_control_headers() -> None:
    headers = [("cache-control", "no-cache"), ("x-other", "no-store"), ("CACHE-CONTROL", "max-age=9, no-store")]

    assert request_control(headers) == RequestControl(no_cache=True, no_store=True, max_age=9)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("max-age=-5", id="negative"),
        pytest.param("max-age=abc", id="not-a-number"),
        pytest.param("max-age=1.5", id="fraction"),
        pytest.param("max-age", id="no-value"),
        pytest.param("max-age=", id="empty-value"),
        pytest.param("no-cache, max-age=soon", id="after-a-valid-directive"),
    ],
)
def test_an_invalid_max_age_is_an_error_naming_max_age(value: str) -> None:
    with pytest.raises(ControlError, match="max-age"):
        request_control([("cache-control", value)])


def test_the_max_age_error_shows_the_value() -> None:
    with pytest.raises(ControlError, match="'abc'"):
        request_control([("cache-control", "max-age=abc")])


# request_control: X-Cache-Namespace


@pytest.mark.parametrize(
    ("value", "namespace"),
    [
        pytest.param("team-a", "team-a", id="simple"),
        pytest.param("  eval/run:1  ", "eval/run:1", id="stripped"),
        pytest.param("A.b_c:d/e@f+g=h-9", "A.b_c:d/e@f+g=h-9", id="every-allowed-character"),
        pytest.param("", "", id="empty"),
        pytest.param("   ", "", id="blank"),
        pytest.param("n" * MAX_NAMESPACE_LENGTH, "n" * MAX_NAMESPACE_LENGTH, id="longest-allowed"),
    ],
)
def test_a_valid_namespace_is_taken(value: str, namespace: str) -> None:
    assert request_control([("X-Cache-Namespace", value)]).namespace == namespace


def test_namespace_header_name_is_case_insensitive() -> None:
    assert request_control([("x-cache-namespace", "a")]).namespace == "a"
    assert request_control([("X-CACHE-NAMESPACE", "b")]).namespace == "b"


def test_a_namespace_of_129_characters_is_too_long() -> None:
    assert MAX_NAMESPACE_LENGTH == 128
    with pytest.raises(ControlError, match="longer than 128"):
        request_control([("x-cache-namespace", "n" * 129)])


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("team a", id="space"),
        pytest.param("team,a", id="comma"),
        pytest.param("team;a", id="semicolon"),
        pytest.param("équipe", id="non-ascii"),
        pytest.param("a\tb", id="tab"),
        pytest.param("a\nb", id="newline"),
        pytest.param("../*", id="star"),
        pytest.param('"quoted"', id="quotes"),
    ],
)
def test_a_namespace_with_forbidden_characters_is_an_error(value: str) -> None:
    with pytest.raises(ControlError, match="X-Cache-Namespace"):
        request_control([("x-cache-namespace", value)])


# request_control: X-Cache-TTL


@pytest.mark.parametrize(
    ("value", "ttl"),
    [
        pytest.param("3600", 3600, id="whole-seconds"),
        pytest.param("0", 0, id="zero"),
        pytest.param(" 60 ", 60, id="surrounding-spaces"),
    ],
)
def test_a_valid_ttl_is_taken(value: str, ttl: int) -> None:
    control = request_control([("X-Cache-TTL", value)])
    assert control.ttl == ttl
    assert isinstance(control.ttl, int)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("-5", id="negative"),
        pytest.param("abc", id="not-a-number"),
        pytest.param("1.5", id="fraction"),
        pytest.param("", id="empty"),
        pytest.param("1h", id="with-unit"),
        pytest.param("1e3", id="exponent"),
    ],
)
def test_an_invalid_ttl_is_an_error_naming_the_header(value: str) -> None:
    with pytest.raises(ControlError, match="X-Cache-TTL"):
        request_control([("x-cache-ttl", value)])


def test_namespace_ttl_and_directives_combine() -> None:
    headers = [("cache-control", "no-store"), ("x-cache-namespace", "ns"), ("x-cache-ttl", "10")]

    assert request_control(headers) == RequestControl(no_store=True, namespace="ns", ttl=10)


# request_control: offline


def test_offline_forces_only_if_cached() -> None:
    assert request_control([], offline=True) == RequestControl(only_if_cached=True)
    control = request_control([("cache-control", "no-cache, max-age=5")], offline=True)
    assert control == RequestControl(no_cache=True, only_if_cached=True, max_age=5)


def test_online_leaves_only_if_cached_to_the_request() -> None:
    assert request_control([], offline=False).only_if_cached is False


# parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("3600", 3600.0, id="plain-seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("3600s", 3600.0, id="seconds"),
        pytest.param("30m", 1800.0, id="minutes"),
        pytest.param("12h", 43200.0, id="hours"),
        pytest.param("7d", 604800.0, id="days"),
        pytest.param("2w", 1209600.0, id="weeks"),
        pytest.param("1.5h", 5400.0, id="fraction"),
        pytest.param("12H", 43200.0, id="upper-case"),
        pytest.param("  7d  ", 604800.0, id="surrounding-spaces"),
        pytest.param("7 d", 604800.0, id="space-before-unit"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("7x", id="unknown-unit"),
        pytest.param("-1d", id="negative"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("d", id="unit-only"),
        pytest.param("7dd", id="unit-twice"),
        pytest.param("1d2h", id="compound"),
        pytest.param("seven days", id="words"),
    ],
)
def test_parse_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(ControlError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_error_quotes_the_text() -> None:
    with pytest.raises(ControlError, match="'7x'"):
        parse_duration("7x")


# is_fresh


@pytest.mark.parametrize(
    ("created_at", "ttl", "now", "max_age", "fresh"),
    [
        pytest.param(1000.0, 0, 1000.0 + 10 * 365 * 86400, None, True, id="ttl-zero-never-expires"),
        pytest.param(1000.0, 60, 1000.0, None, True, id="just-stored"),
        pytest.param(1000.0, 60, 1059.999, None, True, id="just-under-ttl"),
        pytest.param(1000.0, 60, 1060.0, None, False, id="at-ttl"),
        pytest.param(1000.0, 60, 5000.0, None, False, id="long-past-ttl"),
        pytest.param(1000.0, 0, 1030.0, 30, True, id="age-at-max-age"),
        pytest.param(1000.0, 0, 1030.5, 30, False, id="age-past-max-age"),
        pytest.param(1000.0, 0, 1000.0, 0, True, id="max-age-zero-just-stored"),
        pytest.param(1000.0, 0, 1001.0, 0, False, id="max-age-zero-a-second-later"),
        pytest.param(1000.0, 60, 1020.0, 10, False, id="max-age-stricter-than-ttl"),
        pytest.param(1000.0, 60, 1070.0, 100, False, id="ttl-stricter-than-max-age"),
        pytest.param(1000.0, 60, 1020.0, 100, True, id="within-both"),
    ],
)
def test_is_fresh(created_at: float, ttl: float, now: float, max_age: int | None, fresh: bool) -> None:
    assert is_fresh(created_at, ttl, now, max_age) is fresh
