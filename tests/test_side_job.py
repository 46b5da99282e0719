"""SideJob: a job in a second process on one thread, its result or its error back here."""

import math
import operator
import time

import pytest
import torch

from qformer.side_job import SideJob


def test_side_job_returns_its_result_and_gives_the_threads_back():
    torch.set_num_threads(2)
    with SideJob(operator.add, 2, 3) as side:
        assert torch.get_num_threads() == 1  # this process works on one thread meanwhile
        deadline = time.time() + 60
        while not side.future.done() and time.time() < deadline:
            time.sleep(0.05)
        side.share()
        assert torch.get_num_threads() == 2  # ... and gets them back once the job is done
    assert side.result() == 5


def test_side_job_error_is_raised_here():
    torch.set_num_threads(2)
    with SideJob(math.sqrt, -1.0) as side:
        pass
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="math domain error"):
        side.result()


def test_side_job_output_goes_to_its_log(tmp_path):
    log = tmp_path / "side.log"
    with SideJob(print, "from the side job", log=log) as side:
        pass
    assert side.result() is None
    assert log.read_text() == "from the side job\n"
