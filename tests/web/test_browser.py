"""The portable form in a browser: onnxruntime-web (wasm) in headless Chromium, against Python's ONNX Runtime.

The bundled digits CNN, a deterministic variant of its portable hardened form, and portable
bernoulli / multinomial / ensemble models are served from 127.0.0.1 (web_server.py) to index.html,
which runs them with onnxruntime-web; the same models run in Python here. Needs Debian's chromium,
`npm ci` in tests/web and the playwright Python package (no browser download): scripts/ci/web.sh
installs all three; without them these tests skip, saying which is missing.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import version_converter

from onnx_sap import make_session
from onnx_sap.api import harden
from onnx_sap.runtime import example_file
from onnx_sap.sap_nodes import with_deterministic_sap

HERE = Path(__file__).resolve().parent
ORT_WEB = HERE / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.mjs"
CHROMIUM = os.environ.get("ONNX_SAP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and quiet on a closed network: no first-run, sync, component or background fetches.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STOCHASTIC = {  # model name -> (harden options, runs per side for the accuracy comparison, opset)
    "bernoulli": ({"portable": True, "mode": "bernoulli"}, 10, 17),
    "multinomial": ({"portable": True, "mode": "multinomial"}, 10, 17),
    "ensemble": ({"portable": True, "mode": "multinomial", "ensemble": 4}, 4, 17),  # 4 passes per run
    # Opset 18, where several Reduce ops take their axes as an input: the form must run there too.
    "bernoulli-opset18": ({"portable": True, "mode": "bernoulli"}, 10, 18),
    "multinomial-opset18": ({"portable": True, "mode": "multinomial"}, 10, 18),
}


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or set ONNX_SAP_CHROMIUM)"
    if not ORT_WEB.is_file():
        return "onnxruntime-web is not installed (npm ci in tests/web)"
    return None


if _missing() and os.environ.get("ONNX_SAP_WEB_REQUIRED"):  # CI's web step must run them, never skip
    raise RuntimeError(f"ONNX_SAP_WEB_REQUIRED is set but {_missing()}")
pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"no browser: {_missing()}; "
                                "bash scripts/ci/web.sh installs what these tests need")


@pytest.fixture(scope="module")
def digits():
    with np.load(example_file("digits_test.npz")) as d:
        return d["x"].astype(np.float32), d["y"].astype(np.int64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """Every model of the comparison, also written to a folder the server publishes at /models/."""
    folder = tmp_path_factory.mktemp("models")
    original = onnx.load(str(example_file("digits_cnn.onnx")))
    found = {"original": original,
             "deterministic": with_deterministic_sap(harden(original, portable=True, mode="bernoulli").model)}
    at_opset = {17: original, 18: version_converter.convert_version(original, 18)}
    found.update({name: harden(at_opset[opset], **opts).model for name, (opts, _, opset) in STOCHASTIC.items()})
    for name, m in found.items():
        onnx.save(m, str(folder / f"{name}.onnx"))
    found["_folder"] = folder
    return found


# Figures for the closing summary (conftest.py prints them): model -> one line.
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def browser(models, tmp_path_factory):
    """A page factory on a fresh Chromium profile, pages served by web_server.py."""
    from playwright.sync_api import sync_playwright

    from web_server import serve

    started = time.perf_counter()
    server = serve(models["_folder"])
    url = f"http://127.0.0.1:{server.server_port}/index.html"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), headless=True,
                                                       executable_path=CHROMIUM, args=FLAGS)

        def new_page():
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("window.sapReady === true")
            return page

        yield new_page
        context.close()
    server.shutdown()
    FIGURES["_time"] = f"{time.perf_counter() - started:.0f} s from browser start to close"


@pytest.fixture(scope="module")
def page(browser):
    p = browser()
    info = p.evaluate("sap.info()")
    assert info["isolated"], "the page is not cross-origin isolated: wasm threads need COOP/COEP"
    FIGURES["_info"] = f"onnxruntime-web {info['version']}, {info['threads']} wasm threads"
    return p


def browser_runs(page, name: str, x: np.ndarray, runs: int) -> np.ndarray:
    """runs runs of a new session of /models/NAME on x in this page: [runs, N, classes]."""
    sid = page.evaluate("n => sap.open(n)", f"{name}.onnx")
    out = page.evaluate("([id, d, s, k]) => sap.run(id, d, s, k)", [sid, x.ravel().tolist(), list(x.shape), runs])
    return np.asarray(out, dtype=np.float64).reshape(runs, len(x), -1)


def python_runs(model: onnx.ModelProto, x: np.ndarray, runs: int) -> np.ndarray:
    sess = make_session(model)
    return np.stack([sess.run(None, {"x": x})[0] for _ in range(runs)]).astype(np.float64)


@pytest.mark.parametrize("name", ["original", "deterministic"])
def test_deterministic_models_give_python_outputs(page, models, digits, name):
    x, y = digits
    web, py = browser_runs(page, name, x, 1)[0], python_runs(models[name], x, 1)[0]
    # Within 1e-5 relative to the logit (absolute below 1): float32 kernels differ by a few ulps.
    rel = float((np.abs(web - py) / np.maximum(1.0, np.abs(py))).max())
    FIGURES[name] = (f"accuracy Python {np.mean(py.argmax(1) == y):.2%}, browser {np.mean(web.argmax(1) == y):.2%}; "
                     f"max |diff| {np.abs(web - py).max():.1e} (relative {rel:.1e}, "
                     f"logits up to {np.abs(py).max():.0f})")
    assert rel <= 1e-5, f"{name}: browser and Python differ by {rel:.2e} relative"
    np.testing.assert_array_equal(web.argmax(1), py.argmax(1))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_accuracy_matches_python_within_sampling_error(page, models, digits, name):
    x, y = digits
    runs = STOCHASTIC[name][1]
    with ThreadPoolExecutor(1) as pool:  # Python's runs meanwhile: the browser is another process
        py = pool.submit(python_runs, models[name], x, runs)
        web = browser_runs(page, name, x, runs)
        py = py.result()
    assert not np.array_equal(web[0], web[1]), "runs within a browser session should differ"
    acc_web, acc_py = (web.argmax(2) == y).mean(), (py.argmax(2) == y).mean()
    # Binomial over all runs x examples bounds the run-to-run variance from above (fixed examples).
    p = (acc_web + acc_py) / 2
    tolerance = 4 * math.sqrt(2 * p * (1 - p) / (runs * len(y)))
    FIGURES[name] = (f"accuracy Python {acc_py:.2%}, browser {acc_web:.2%} "
                     f"(mean of {runs} runs; 4 sigma {tolerance:.2%})")
    assert abs(acc_web - acc_py) <= tolerance


def test_new_page_gives_a_new_stream_but_sessions_in_one_page_repeat(browser, digits):
    """What README "In the browser" says: onnxruntime-web seeds its random ops once per page (wasm
    instance), like ONNX Runtime once per process; harden --portable warns about it."""
    x = digits[0][:8]
    first_page, second_page = browser(), browser()
    a = browser_runs(first_page, "bernoulli", x, 3)
    assert not np.array_equal(a[0], a[1])
    np.testing.assert_array_equal(browser_runs(first_page, "bernoulli", x, 3), a)  # a second session replays it
    assert not np.array_equal(browser_runs(second_page, "bernoulli", x, 3)[0], a[0])
    first_page.close()
    second_page.close()
