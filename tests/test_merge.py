"""Merge reports are exact on known cases."""

from __future__ import annotations

import pytest
import torch

from models import IncompatibleCheckpointError, build_classifier, merge_state, skeleton
from models.merge import ShapeMismatch, format_report, strip_prefixes


def _state(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(num_classes)
    return build_classifier(arch, num_classes).state_dict()


def test_resnet18_imagenet_head_into_7_classes_takes_all_but_fc() -> None:
    source, target = _state("resnet18", 1000), _state("resnet18", 7)
    merged, report = merge_state(target, source)
    assert report.merged == sorted(k for k in target if not k.startswith("fc."))
    assert report.shape_mismatched == [
        ShapeMismatch("fc.bias", [7], [1000]),
        ShapeMismatch("fc.weight", [7, 512], [1000, 512]),
    ]
    assert report.missing == [] and report.unexpected == []
    total = sum(t.numel() for t in target.values())
    assert report.target_fraction == pytest.approx((total - 7 * 512 - 7) / total)
    assert report.source_fraction == pytest.approx((len(source) - 2) / len(source))
    # buffers count as state, and the head keeps the target's own values
    assert torch.equal(merged["bn1.running_mean"], source["bn1.running_mean"])
    assert torch.equal(merged["layer1.0.bn1.num_batches_tracked"], source["layer1.0.bn1.num_batches_tracked"])
    assert torch.equal(merged["fc.weight"], target["fc.weight"])
    assert torch.equal(merged["conv1.weight"], source["conv1.weight"])


def test_squeezenet_skips_exactly_its_classifier_conv() -> None:
    _, report = merge_state(_state("squeezenet1_1", 7), _state("squeezenet1_1", 1000))
    assert [m.key for m in report.shape_mismatched] == ["classifier.1.bias", "classifier.1.weight"]
    assert report.shape_mismatched[1].target_shape == [7, 512, 1, 1]
    assert report.shape_mismatched[1].source_shape == [1000, 512, 1, 1]
    assert report.missing == [] and report.unexpected == []


def test_vit_b_16_skips_exactly_heads_head() -> None:
    target = skeleton("vit_b_16", 7).state_dict()
    source = {k: torch.zeros(v.shape) for k, v in skeleton("vit_b_16", 1000).state_dict().items()}
    target = {k: torch.zeros(v.shape) for k, v in target.items()}
    _, report = merge_state(target, source)
    assert [m.key for m in report.shape_mismatched] == ["heads.head.bias", "heads.head.weight"]
    assert len(report.merged) == len(target) - 2


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_merge_as_if_unprefixed(prefix: str) -> None:
    source, target = _state("resnet18", 1000), _state("resnet18", 7)
    plain_state, plain = merge_state(target, source)
    wrapped_state, wrapped = merge_state(target, {prefix + k: v for k, v in source.items()})
    assert wrapped.to_dict() == plain.to_dict()
    assert all(torch.equal(plain_state[k], wrapped_state[k]) for k in plain_state)


def test_configurable_prefix_list() -> None:
    assert list(strip_prefixes({"backbone.fc.weight": torch.zeros(1)}, ("backbone.",))) == ["fc.weight"]


def test_below_min_match_raises_with_the_report() -> None:
    source = _state("resnet34", 7)  # deeper net: most tensors have no counterpart in resnet18
    with pytest.raises(IncompatibleCheckpointError, match="below min_match 90.0%") as info:
        merge_state(_state("resnet18", 7), source, min_match=0.9)
    report = info.value.report
    assert report.source_fraction < 0.9 and report.unexpected
    assert report.source_fraction == pytest.approx(len(report.merged) / len(source))


def test_partial_head_only_source_and_inputs_untouched() -> None:
    target = _state("resnet18", 7)
    head = {k: torch.full_like(v, 0.5) for k, v in target.items() if k.startswith("fc.")}
    before = {k: v.clone() for k, v in target.items()}
    merged, report = merge_state(target, head, min_match=1.0)
    assert report.merged == ["fc.bias", "fc.weight"] and report.source_fraction == 1.0
    assert len(report.missing) == len(target) - 2
    assert torch.equal(merged["fc.weight"], head["fc.weight"])
    assert all(torch.equal(target[k], before[k]) for k in target)  # the target is not modified
    assert "merged                 2 tensors" in format_report(report)


def test_merged_tensors_take_the_target_dtype() -> None:
    target = {"w": torch.zeros(2, dtype=torch.float32)}
    merged, _ = merge_state(target, {"w": torch.ones(2, dtype=torch.float16)})
    assert merged["w"].dtype == torch.float32 and merged["w"].tolist() == [1.0, 1.0]


def test_min_match_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=r"within \[0, 1\], found 1.5"):
        merge_state({}, {}, min_match=1.5)
