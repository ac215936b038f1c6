"""Start-up and timeouts that tell the truth (issue 9, item 8)."""

import os
import subprocess
import sys

import torch

from tests.dist_utils import free_port, run_ranks

ONE_BLOCK_EACH = {"num_layers": 1, "num_single_layers": 1}  # what is tested is start-up, not the model

MISSING_PEER = """
import torch, warnings
warnings.filterwarnings("ignore")
from tests.conftest import tiny_model_and_inputs
ONE_BLOCK_EACH = {"num_layers": 1, "num_single_layers": 1}
_, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": 2})
with torch.no_grad():
    compiled(**inputs)
"""


def test_missing_peer_at_start_up_names_the_rank_and_the_wait():
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               NPU_DIT_GROUP_TIMEOUT="3", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MISSING_PEER], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rank 0 of 2 waited" in done.stderr and "rank(s) [1]" in done.stderr and "timeout 3 s" in done.stderr


def users_own_group(rank, world_size):
    import datetime

    import torch.distributed as dist

    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=45))  # the user's own group
    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    with torch.no_grad():
        compiled(**inputs)
    return RECORDS[-1].parallel.timeout_s


def test_the_users_group_timeout_is_the_one_reported(tmp_path):
    # run_ranks sets NPU_DIT_GROUP_TIMEOUT=30; the user's 45 s is what applies and what errors cite
    results = [r["result"] for r in run_ranks(users_own_group, 2, tmp_path, timeout=300, group_timeout=30)]
    assert results == [45.0, 45.0]


def cpu_model_where_cuda_is_available(rank, world_size):
    from npu_dit.backend import RECORDS
    from tests.conftest import tiny_model_and_inputs

    import npu_dit.runtime.dist

    npu_dit.runtime.dist._cuda_available = lambda: True  # a GPU machine, as far as npu-dit can tell
    _, model, inputs = tiny_model_and_inputs("flux", ONE_BLOCK_EACH)
    compiled = torch.compile(model, backend="npu_dit", dynamic=True, options={"ulysses_degree": world_size})
    with torch.no_grad():
        out = compiled(**inputs)[0]
        expected = model(**inputs)[0]
    record = RECORDS[-1]
    return record.parallel.backend, record.report.fell_back, (out - expected).abs().max().item()


def test_a_cpu_model_on_a_gpu_machine_communicates_over_gloo(tmp_path):
    """The group's backend follows the model's device, not the machine's: NCCL cannot move CPU tensors."""
    results = [r["result"] for r in run_ranks(cpu_model_where_cuda_is_available, 2, tmp_path, timeout=300)]
    for backend, fell_back, err in results:
        assert backend == "gloo" and not fell_back and err <= 1e-5, (backend, fell_back, err)
