"""core.names: model names and versions that are safe as path components."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replicas.releases.manifest as manifest
from core.names import (
    MAX_MODEL_NAME_LEN,
    InvalidNameError,
    check_model_name,
    check_version,
    model_name_problem,
    model_ref_problem,
    version_problem,
)
from tests.fuzzing import examples


@pytest.mark.parametrize("name", ["demo", "demo-heavy", "resnet50_v1.5", "_private", "A", "a" * MAX_MODEL_NAME_LEN,
                                  "9lives", "x.onnx"])
def test_good_model_names(name):
    assert model_name_problem(name) == ""
    assert check_model_name(name) == name


@pytest.mark.parametrize(("name", "words"), [
    ("", "empty"),
    ("..", "'..'"),
    ("../etc", "'/'"),
    ("a/../../b", "'/'"),
    ("a\\b", "'\\\\'"),
    ("..\\x", "'\\\\'"),
    ("a\x00b", "NUL"),
    ("a..b", "'..'"),
    (".hidden", "starts with '.'"),
    ("-rf", "starts with '-'"),
    ("a b", "' '"),
    ("dém", "'é'"),
    ("a\nb", "'\\n'"),
    ("a%2e%2e", "'%'"),
    ("x" * (MAX_MODEL_NAME_LEN + 1), "characters long"),
    (None, "must be a string"),
    (3, "must be a string"),
])
def test_bad_model_names_have_reasons(name, words):
    problem = model_name_problem(name)
    assert problem, name
    assert words in problem
    with pytest.raises(InvalidNameError, match="model name"):
        check_model_name(name)


@pytest.mark.parametrize("version", ["1", "2", "10", "42", "999999999999999999"])
def test_good_versions(version):
    assert version_problem(version) == ""
    assert check_version(version) == version


@pytest.mark.parametrize(("version", "words"), [
    ("", "empty"), ("0", "positive integer"), ("01", "leading zeros"), ("-1", "integral value > 0"),
    ("+1", "no sign"), ("1.0", "positive integer"), (" 1", "positive integer"), ("1 ", "positive integer"),
    ("..", "integral value > 0"), ("1/2", "positive integer"), ("\u0661", "integral value > 0"),  # Arabic-Indic one
    ("²", "integral value > 0"), ("1" * 19, "too long"), (1, "must be a string"), (None, "must be a string"),
])
def test_bad_versions_have_reasons(version, words):
    problem = version_problem(version)
    assert words in problem
    with pytest.raises(InvalidNameError):
        check_version(version)


def test_model_ref():
    assert model_ref_problem("demo", None) == ""
    assert model_ref_problem("demo", "3") == ""
    assert "'/'" in model_ref_problem("de/mo", "3")
    assert "integral value > 0" in model_ref_problem("demo", "../1")  # Triton's text: stol reads no number


# ---------------------------------------------------------------------------- vs replicas.releases.manifest

name_chars = st.sampled_from(list("abcXYZ019_.-/\\\x00\n é"))


@settings(max_examples=examples(1000), deadline=None, database=None)
@given(name=st.text(alphabet=name_chars, max_size=12))
def test_every_name_we_accept_the_store_accepts(name):
    """Switching the store's own check (replicas/releases/manifest.py) to this module never orphans a
    model the store already holds... in one direction: what we accept, it accepts."""
    if model_name_problem(name) == "":
        assert manifest.check_model_name(name) == name


@settings(max_examples=examples(500), deadline=None, database=None)
@given(version=st.one_of(st.integers(-5, 10**6).map(str), st.text(alphabet="0123456789+- .\u00b2\u0661", max_size=5)))
def test_versions_agree_with_the_store(version):
    ours = version_problem(version) == ""
    try:
        theirs = manifest.check_version(version) == version
    except ValueError:
        theirs = False
    assert ours == theirs or len(version) > 18, version


def test_store_refuses_a_trailing_newline():
    """Found by test_every_name_we_accept_the_store_accepts' counterpart: the store's own regex
    ended in '$', which also matches before a trailing newline, so "demo\\n" was a model name to
    the store (and a directory name in the site's repository). The store now uses this module."""
    assert model_name_problem("demo\n")  # ours refuses it
    with pytest.raises(ValueError, match="'\\\\n'"):
        manifest.check_model_name("demo\n")
    with pytest.raises(ValueError, match="positive integer"):
        manifest.check_version("1\n")


@settings(max_examples=examples(1000), deadline=None, database=None)
@given(name=st.text(alphabet=name_chars, max_size=12))
def test_store_and_gateway_agree_on_names(name):
    """Both directions now: one rule set."""
    ok = model_name_problem(name) == ""
    try:
        theirs = manifest.check_model_name(name) == name
    except ValueError:
        theirs = False
    assert ok == theirs, name


# Triton's texts (core's ParseModelVersion: std::stol, then "< 0"), where Triton refuses the version too.
STOL_FAILED = ("failed to get model version from specified version string '{}' (details: stol), "
               "version should be an integral value > 0")


@pytest.mark.parametrize(("version", "expected"), [
    ("abc", STOL_FAILED.format("abc")),
    ("..", STOL_FAILED.format("..")),
    ("9" * 19, STOL_FAILED.format("9" * 19)),  # past int64: out_of_range
    ("-1", "invalid model version specified '-1' , version should be an integral value > 0"),
    ("-42", "invalid model version specified '-42' , version should be an integral value > 0"),
])
def test_versions_triton_refuses_get_tritons_text(version, expected):
    assert version_problem(version) == expected


@pytest.mark.parametrize("version", ["+1", "01", " 1", "1.0", "1abc", "0", "-0", "1" * 19])
def test_versions_triton_reads_leniently_keep_our_rule(version):
    problem = version_problem(version)
    assert problem and "integral value" not in problem


def test_huge_version_is_cut_in_the_text():
    problem = version_problem("7" * 10_000)  # longer than CPython converts to int at all
    assert problem.startswith("failed to get model version") and len(problem) < 300
