"""Real multi-process data-parallel training (gloo on CPU) through examples/train_ddp.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_tree_lora.integrations.telemetry import TELEMETRY_KEYS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
DDP_FAILURES = ("marked as ready twice", "ready only once", "unused parameters", "Expected to have finished reduction")

pytestmark = pytest.mark.slow


def process_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLE.parents[1]), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory):
    """One torchrun job: 2 processes, both routing modes, reentrant checkpointing (the hardest case for DDP)."""
    output_dir = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
        "--output-dir", str(output_dir), "--steps", "4", "--gradient-checkpointing", "reentrant",
    ]  # fmt: skip
    result = subprocess.run(command, env=process_env(), capture_output=True, text=True, timeout=300)
    return result, output_dir


def test_torchrun_job_exits_cleanly_without_ddp_errors(torchrun_job):
    result, _ = torchrun_job
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert not [failure for failure in DDP_FAILURES if failure in output]


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_every_rank_ends_with_the_same_trained_adapter(torchrun_job, routing):
    result, output_dir = torchrun_job
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"routing={routing}: 2 processes, parallel mode distributed, backend gloo" in result.stdout
    rank0 = load_file(output_dir / routing / "rank0" / "adapter_model.safetensors")
    rank1 = load_file(output_dir / routing / "rank1" / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() and any("treelora_router" in key for key in rank0)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    leaf_B = [tensor for key, tensor in rank0.items() if "treelora_B" in key]
    assert all(tensor.abs().sum() > 0 for tensor in leaf_B)  # B starts at zero: nonzero means it trained


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_rank_zero_logs_routing_telemetry(torchrun_job, routing):
    _, output_dir = torchrun_job
    history = json.loads((output_dir / routing / "log_history.json").read_text())
    records = [record for record in history if "loss" in record]
    assert [record["step"] for record in records] == [2, 4]
    assert all(set(TELEMETRY_KEYS) <= record.keys() for record in records)


def test_a_hung_rank_makes_the_other_exit_with_an_error_within_ddp_timeout(tmp_path):
    # Launched like two nodes (no torchrun agent to tear the job down): rank 1 hangs after step 1, rank 0 must give
    # up after --ddp-timeout seconds in its next collective instead of waiting forever.
    env = process_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    command = [
        sys.executable, str(EXAMPLE), "--output-dir", str(tmp_path), "--routing", "token", "--steps", "4",
        "--gradient-checkpointing", "off", "--ddp-timeout", "5", "--crash-rank", "1", "--crash-after-step", "1",
        "--crash-mode", "hang",
    ]  # fmt: skip
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        output, _ = ranks[0].communicate(timeout=240)
    finally:
        for process in ranks:  # rank 1 hangs by design; rank 0 only if the timeout did not work
            if process.poll() is None:
                process.kill()
    hung_output = ranks[1].communicate()[0]
    assert "crash drill: hang after step 1" in hung_output
    assert ranks[0].returncode != 0
    assert "Timed out waiting 5000ms" in output, output[-3000:]


TELEMETRY_WORKER = """
import json, os, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from peft_tree_lora.integrations.telemetry import RoutingTelemetry
from peft_tree_lora.tuner.call import RouteRecord, RoutingCall

dist.init_process_group("gloo")
rank = dist.get_rank()
leaf = torch.tensor([0, 0, 0, 0] if rank == 0 else [3, 3, 3, 3])
logits = torch.full((4, 3), 4.0 if rank == 0 else -4.0)
call = RoutingCall(training=True, records=[RouteRecord("layer", "default", leaf, logits)])
telemetry = RoutingTelemetry()
telemetry.end_call(call, SimpleNamespace(loss=torch.tensor(2.0 if rank == 0 else 3.0)), {})
figures = telemetry.summary(across_processes=True)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as out:
    json.dump(figures, out)
dist.destroy_process_group()
os._exit(0)
"""


def test_telemetry_is_summed_over_processes(tmp_path):
    # Each rank alone sent everything to one leaf (3 of 4 dead); together they used two leaves.
    worker = tmp_path / "worker.py"
    worker.write_text(TELEMETRY_WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
        str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=process_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    figures = [json.loads((tmp_path / f"rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert figures[0] == figures[1]
    assert figures[0]["dead_leaf_share"] == pytest.approx(0.5)
    assert figures[0]["leaf_usage_entropy"] == pytest.approx(0.5)  # two of four leaves, evenly: log 2 / log 4
    assert figures[0]["router_confidence"] == pytest.approx(float(torch.sigmoid(torch.tensor(4.0)) - 0.5), rel=1e-5)
    assert figures[0]["task_loss"] == pytest.approx(2.5)
