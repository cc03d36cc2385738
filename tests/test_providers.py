"""Which ONNX Runtime execution providers a device runs on: CUDA where the installed build has it, else
the CPU. The choice is a pure function of the build's provider list, checked here with the lists real
builds report (no GPU needed); then the real onnxruntime of this (CPU-only) machine: the Classifier
and the training step, with the default `auto`, run on the CPU."""

from __future__ import annotations

import pytest

from fedclip.device_agent.ort_loader import CPU, CUDA, choose_providers, device_providers, onnxruntime
from fedclip.sdk.errors import BackendError

# get_available_providers() of real builds
CPU_BUILD = ["CPUExecutionProvider"]  # onnxruntime, onnxruntime-training-cpu
GPU_BUILD = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # onnxruntime-gpu on x86_64
JETSON_BUILD = [  # Jetson Zoo / JetPack wheel
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
]


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", CPU_BUILD, [CPU]),
        ("auto", GPU_BUILD, [CUDA, CPU]),
        ("auto", JETSON_BUILD, [CUDA, CPU]),
        ("cpu", GPU_BUILD, [CPU]),  # asked for the CPU on a GPU build: the CPU only
        ("cuda", GPU_BUILD, [CUDA, CPU]),  # the CPU stays as the fallback for nodes without a CUDA kernel
        ("cuda", JETSON_BUILD, [CUDA, CPU]),
    ],
)
def test_choice_from_the_build_providers(device, available, expected):
    assert choose_providers(device, available) == expected


@pytest.mark.parametrize(
    ("device", "available", "says"),
    [
        ("cuda", CPU_BUILD, "fedclip[agent-cuda]"),  # asked for CUDA explicitly: no silent CPU run
        ("gpu", GPU_BUILD, "choose from auto, cpu, cuda"),
    ],
)
def test_refused_with_one_line(device, available, says):
    with pytest.raises(BackendError) as e:
        choose_providers(device, available)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_classifier_and_the_training_step_follow_the_installed_build(tiny_bundle):
    """With the default `auto`, the Classifier's sessions and the trainer the agent builds run on CUDA
    where the real onnxruntime has it, else on the CPU (this machine); `cuda` on a CPU build is refused,
    never run on the CPU instead."""
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.step_backend import make_trainer

    gpu = CUDA in onnxruntime().get_available_providers()
    device, providers = ("cuda", [CUDA, CPU]) if gpu else ("cpu", [CPU])
    assert device_providers("auto") == (device, providers)

    clf = Classifier.from_bundle(tiny_bundle)
    assert clf.device == device and clf.providers == providers
    assert make_trainer(tiny_bundle).device == device
    if not gpu:
        with pytest.raises(BackendError, match="needs CUDAExecutionProvider"):
            Classifier.from_bundle(tiny_bundle, device="cuda")
