"""The argument types both command lines share."""

import argparse

import pytest

from trtserve.client.arg_types import int_list, name_path, name_value, positive_numbers, size_list


def test_pairs():
    assert name_path("m=models/m.onnx") == ("m", "models/m.onnx")
    assert name_value("x=a=b") == ("x", "a=b")  # only the first '=' splits
    for bad in ("m", "=p", "m="):
        with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=PATH"):
            name_path(bad)


def test_lists():
    assert int_list("8, 16,") == (8, 16) and int_list("") == ()
    assert size_list("1,4") == (1, 4) and positive_numbers("0.5,2") == (0.5, 2.0)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers"):
        int_list("4,x")
    with pytest.raises(argparse.ArgumentTypeError, match="sizes of at least 1"):
        size_list("0,4")
    with pytest.raises(argparse.ArgumentTypeError, match="sizes of at least 1"):
        size_list("")
    with pytest.raises(argparse.ArgumentTypeError, match="numbers above 0"):
        positive_numbers("1,-2")
