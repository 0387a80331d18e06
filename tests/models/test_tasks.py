from __future__ import annotations

import math

import torch

from inferforge.models import get_task


def test_classification_accuracy_and_agreement() -> None:
    task = get_task("classification")
    reference = torch.eye(4)[[0, 1, 2, 3]] * 5
    outputs = torch.eye(4)[[0, 1, 3, 3]] * 5  # one of four changed its top-1
    labels = torch.tensor([0, 1, 2, 3])
    assert task.metric(outputs, labels, reference) == 75.0
    fidelity = task.fidelity(outputs, reference)
    assert fidelity["top1_agreement"] == 0.75 and fidelity["kl"] > 0
    assert task.fidelity(reference, reference)["kl"] == 0.0


def test_embedding_retrieval_agreement_detects_a_swapped_neighbour() -> None:
    task = get_task("embedding")
    reference = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert task.metric(reference, None, reference) == 100.0
    shuffled = reference[[0, 2, 1, 3]]
    assert task.metric(shuffled, None, reference) < 100.0
    assert math.isclose(task.fidelity(reference, reference)["cosine_mean"], 1.0)


def test_tensor_task_relative_error() -> None:
    task = get_task("tensor")
    reference = torch.ones(4, 4)
    fidelity = task.fidelity(reference * 1.01, reference)
    assert math.isclose(fidelity["rel_l2"], 0.01, rel_tol=1e-6)
    assert math.isclose(task.metric(reference * 1.01, None, reference), 99.0, rel_tol=1e-6)
