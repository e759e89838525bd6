"""Database URLs naming several PostgreSQL servers (a primary and its standbys): parsed in
either form libpq users write them, and shown with every password masked."""

from __future__ import annotations

import pytest

from sayiir_persistence import InvalidInputError
from sayiir_persistence.urls import mask_url, parse_url, redact_passwords

QUERY_FORM = (
    "postgresql+psycopg2://alice:s3cret@/test"
    "?host=db1:5440&host=db2:5441&target_session_attrs=read-write"
)
LIBPQ_FORM = (
    "postgresql+psycopg2://alice:s3cret@db1:5440,db2:5441/test?target_session_attrs=read-write"
)


@pytest.mark.parametrize("url", [QUERY_FORM, LIBPQ_FORM], ids=["query", "libpq"])
def test_a_multi_host_url_names_every_server_in_order(url: str) -> None:
    parsed = parse_url(url)
    assert parsed.query["host"] == ("db1:5440", "db2:5441")
    assert parsed.query["target_session_attrs"] == "read-write"
    assert parsed.database == "test"
    assert parsed.username == "alice"
    assert parsed.password == "s3cret"


def test_the_libpq_form_without_ports_or_query() -> None:
    parsed = parse_url("postgresql://alice@db1,db2/test")
    assert parsed.query["host"] == ("db1", "db2")
    assert parsed.database == "test"


@pytest.mark.parametrize("url", [QUERY_FORM, LIBPQ_FORM], ids=["query", "libpq"])
def test_a_multi_host_url_is_shown_masked(url: str) -> None:
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert "alice:***@" in masked
    assert "db1" in masked and "db2" in masked


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://alice@/test?host=db1&host=db2&password=s3cret",
        "postgresql+psycopg://alice@db1,db2/test?sslmode=require&password=s3cret",
    ],
)
def test_a_password_in_the_query_is_masked(url: str) -> None:
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert "password=***" in masked


def test_a_password_in_the_query_of_a_bad_url_is_masked() -> None:
    assert "s3cret" not in redact_passwords("not a url://db1?password=s3cret&x=1")
    with pytest.raises(InvalidInputError) as raised:
        parse_url("postgresql://alice@db1:notaport/test?password=s3cret")
    assert "s3cret" not in str(raised.value)
