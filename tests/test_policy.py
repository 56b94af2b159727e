"""The seed's two optimizer set-ups: head only (frozen backbone really frozen) and all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import apply_policy, build_classifier, set_train_mode


def _train_steps(arch: str, policy: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], nn.Module]:
    torch.manual_seed(0)
    model = build_classifier(arch, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = apply_policy(arch, model, policy)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        set_train_mode(arch, model, policy)
        logits = model(torch.randn(4, 3, 64, 64))
        logits = logits.logits if hasattr(logits, "logits") else logits
        loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, model.state_dict(), model


@pytest.mark.parametrize("arch, heads", [("resnet18", ("fc.",)), ("squeezenet1_1", ("classifier.1.",)),
                                         ("googlenet", ("fc.", "aux1.fc2.", "aux2.fc2."))])
def test_head_policy_trains_only_the_head(arch: str, heads: tuple[str, ...]) -> None:
    before, after, model = _train_steps(arch, "head")
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(heads) for k in changed), changed - {k for k in changed if k.startswith(heads)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith(heads)
    }


def test_head_policy_keeps_backbone_batchnorm_in_eval_mode() -> None:
    model = build_classifier("resnet18", 3)
    set_train_mode("resnet18", model, "head")
    assert model.fc.training
    assert not model.bn1.training and not model.layer4[1].bn2.training


def test_all_policy_changes_backbone_tensors_and_bn_stats() -> None:
    before, after, model = _train_steps("resnet18", "all")
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="one of head, all, found 'some'"):
        apply_policy("resnet18", build_classifier("resnet18", 3), "some")  # type: ignore[arg-type]
