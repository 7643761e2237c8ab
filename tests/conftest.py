import pytest
import torch

from cases import CASE_IDS, CASES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param
