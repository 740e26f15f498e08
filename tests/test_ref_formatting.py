"""reference/formatting.py: how numbers and values read in every error message (issue 19).

The expected strings are the documented formats (``short``: ``repr`` with NumPy
scalars as Python numbers, cut at ``limit``; ``number``: 6 significant digits,
scientific strictly below 1e-3; ``article``: "an" before a vowel letter).
"""

from __future__ import annotations

import numpy as np
import pytest

from reference.formatting import article, number, short


def test_short_reads_numpy_scalars_as_python_numbers_and_cuts_at_the_limit():
    assert short(np.float64(0.5)) == "0.5"
    assert short(np.int64(3)) == "3"
    assert short(np.bool_(True)) == "True"
    assert short(0.25) == "0.25"
    s80 = "x" * 78  # repr adds two quotes: exactly 80 characters, kept
    assert short(s80) == repr(s80) and len(short(s80)) == 80
    s81 = "x" * 79  # 81 characters: cut to 80, the last three "..."
    assert short(s81) == repr(s81)[:77] + "..." and len(short(s81)) == 80
    assert short(list(range(100)), limit=10) == "[0, 1, ..."


@pytest.mark.parametrize("x,text", [
    (1.5, "1.5"), (0.00123, "0.00123"), (1e-3, "0.001"), (-1e-3, "-0.001"), (123456789.0, "1.23457e+08"),
    (0.0, "0"), (1.234e-5, "1.234e-05"), (-0.5e-3, "-5.000e-04"), (1.0, "1"), (-1.0, "-1"), (0.5, "0.5"),
    (np.float32(2.0), "2"),
])
def test_number_six_digits_scientific_strictly_below_1e_3(x, text):
    assert number(x) == text


@pytest.mark.parametrize("word,text", [("int", "an int"), ("list", "a list"), ("Object", "an Object"),
                                       ("float", "a float"), ("x", "a x")])
def test_article_by_the_first_letter(word, text):
    assert article(word) == text
