"""The plugin asks before a very large run and passes the answer to the backend (issue 11).

Real QGIS (offscreen), real tasks, real backend (in-process and the worker subprocess); only the
Yes/No answer is supplied by the test instead of a person clicking the QMessageBox.
"""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from test_large_run import HUGE_TILES, vrt
from test_plugin_support import caption_request, tiny_model_dir, wait_until

pytest.importorskip("qgis.core")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def run_with_answer(request, answer: bool):
    from rscaption_plugin.ui.caption_run import CaptionRun

    asked = []

    def confirm(info):
        asked.append((dict(info), threading.current_thread() is threading.main_thread()))
        return answer

    run = CaptionRun(request, None, add_to_project=False, confirm_large=confirm).start()
    assert wait_until(lambda: run.done, 180), "caption task did not finish"
    return run, asked


@pytest.mark.qgis_log_expects(r"^captioning failed: not started: 15,264,649 tiles")
@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_declined_large_run_is_not_started(qgis_new_project, tiny, tmp_path, mode):
    out = tmp_path / "o.gpkg"
    request = caption_request(vrt(tmp_path, 1_000_000, 1_000_000), out, tiny, mode=mode,
                              python=sys.executable if mode == "subprocess" else None, tile_size=256)
    run, asked = run_with_answer(request, False)
    assert [(a["tiles"], on_gui) for a, on_gui in asked] == [(HUGE_TILES, True)], run.outcome
    assert asked[0][0]["seconds"] == pytest.approx(HUGE_TILES / 5.0)
    assert not run.outcome.ok and run.outcome.error == "not started: 15,264,649 tiles (about 35.3 days) were not confirmed"
    assert not out.exists() and request.job.confirm_large is False


@pytest.mark.qgis_log_expects(r"^captioning failed: cannot read .*over\.vrt")
def test_confirmed_large_run_is_started_with_the_confirmation(qgis_new_project, tiny, tmp_path):
    """Just over the threshold: after Yes the job reruns with confirm_large and gets past the guard
    (to the first pixel read, which fails here because the VRT's source does not exist)."""
    out = tmp_path / "o.gpkg"
    request = caption_request(vrt(tmp_path, 12_800, 8_032, "over.vrt"), out, tiny, tile_size=32)
    run, asked = run_with_answer(request, True)
    assert len(asked) == 1 and asked[0][0]["tiles"] == 400 * 251
    assert request.job.confirm_large is True
    assert not run.outcome.ok and run.outcome.error.startswith("cannot read") and "over.vrt" in run.outcome.error
    # the run opened the (empty) output as a layer outside any project: free it now, not at
    # interpreter exit after QGIS is gone (a segfault that fails the whole pytest run)
    run.layer = None
    gc.collect()


def test_question_text_names_count_and_time():
    from rscaption_plugin.ui.large_run import question_text

    text = question_text({"tiles": 567_938, "seconds": 567_938 / 5.0})
    assert text.startswith("This run would caption 567,938 tiles, which takes about 31.6 hours")
