"""The CPU tanh's coefficients in csrc/common/fast_math.h are the ones scripts/fit_tanh_coefficients.py fits."""
import importlib.util
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _header_constants():
    text = (ROOT / "csrc" / "common" / "fast_math.h").read_text()
    return {name: float(value) for name, value in re.findall(r"(kTanh[PQ]\d) = ([-0-9.e]+)f", text)}


def test_tanh_coefficients_come_from_the_fit():
    spec = importlib.util.spec_from_file_location("fit_tanh", ROOT / "scripts" / "fit_tanh_coefficients.py")
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    worst, p, q = fit_tanh.fit()
    assert worst < 1e-7
    fitted = {**{f"kTanhP{k}": c for k, c in enumerate(p) if k}, **{f"kTanhQ{k}": c for k, c in enumerate(q) if k}}
    header = _header_constants()
    assert sorted(header) == sorted(fitted)  # the regex finds every constant
    for name, value in fitted.items():  # another LAPACK may round the last bits differently
        np.testing.assert_allclose(header[name], value, rtol=1e-5, err_msg=name)
