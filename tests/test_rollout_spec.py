"""The rollout spec: parsing and validation, the spec of a serving state, and the rollout file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from service.control.rollout import (
    DEFAULT_MODEL,
    ModelSpec,
    RolloutFile,
    RolloutSpec,
    RolloutSpecError,
    parse_spec,
    spec_of,
)
from service.control.slots import ModelState, ServingState, SlotSpec
from service.errors import RequestError
from service.http.errors import status_of


def _one(revision: str = "", stable: str = "", **fields: object) -> RolloutSpec:
    """A single-model spec (the default model's)."""
    return RolloutSpec(revision, {DEFAULT_MODEL: ModelSpec(stable, **fields)})  # type: ignore[arg-type]


def _state(generation: int, revision: str | None = None, **fields: object) -> ServingState:
    """A serving state of one model, "m"."""
    return ServingState(generation, {"m": ModelState(**fields)}, "m", revision)  # type: ignore[arg-type]


FULL_YAML = """\
revision: "2026-12-01.1"
stable: {checkpoint: demo-v2.safetensors, merge: [head-v2.safetensors, heads/extra.safetensors]}
canary: {checkpoint: head-v3.safetensors, mode: merge, weight: 10, shadow: 5, min_match: 0.5}
"""


# --- parse_spec: valid specs -------------------------------------------------------------------

def test_full_yaml_spec() -> None:
    assert parse_spec(FULL_YAML) == _one(
        revision="2026-12-01.1", stable="demo-v2.safetensors",
        stable_merges=("head-v2.safetensors", "heads/extra.safetensors"),
        canary="head-v3.safetensors", canary_mode="merge", weight=10, shadow=5, min_match=0.5,
    )


def test_full_json_spec_equals_the_yaml_one() -> None:
    doc = {"revision": "2026-12-01.1",
           "stable": {"checkpoint": "demo-v2.safetensors", "merge": ["head-v2.safetensors", "heads/extra.safetensors"]},
           "canary": {"checkpoint": "head-v3.safetensors", "mode": "merge", "weight": 10, "shadow": 5,
                      "min_match": 0.5}}
    assert parse_spec(json.dumps(doc)) == parse_spec(FULL_YAML)


def test_minimal_spec_takes_every_default() -> None:
    spec = parse_spec("stable: {checkpoint: a.safetensors}")
    assert spec == _one(revision="", stable="a.safetensors")
    one = spec.models[DEFAULT_MODEL]
    assert (one.stable_merges, one.canary, one.canary_mode, one.weight, one.shadow, one.min_match) == (
        (), None, "replace", 0, 0, 0.0)


def test_minimal_json_spec() -> None:
    assert parse_spec('{"stable": {"checkpoint": "a.pt", "mode": "replace", "merge": []}}') == _one("", "a.pt")


def test_canary_defaults() -> None:
    spec = parse_spec("revision: r1\nstable: {checkpoint: a}\ncanary: {checkpoint: b}\n")
    assert spec == _one(revision="r1", stable="a", canary="b", canary_mode="replace", weight=0, shadow=0,
                               min_match=0.0)


def test_null_canary_means_no_canary() -> None:
    assert parse_spec("stable: {checkpoint: a}\ncanary: null\n").models[DEFAULT_MODEL].canary is None


def test_numeric_revision_is_kept_as_text() -> None:
    assert parse_spec("revision: 7\nstable: {checkpoint: a}").revision == "7"


@pytest.mark.parametrize("weight", [0, 1, 50, 100])
def test_weight_bounds_are_inclusive(weight: int) -> None:
    spec = parse_spec(f"stable: {{checkpoint: a}}\ncanary: {{checkpoint: b, weight: {weight}, shadow: {weight}}}")
    assert (spec.models[DEFAULT_MODEL].weight, spec.models[DEFAULT_MODEL].shadow) == (weight, weight)


@pytest.mark.parametrize("min_match", [0, 1, 0.25])
def test_min_match_bounds_are_inclusive(min_match: float) -> None:
    spec = parse_spec(f"stable: {{checkpoint: a}}\ncanary: {{checkpoint: b, min_match: {min_match}}}")
    assert spec.models[DEFAULT_MODEL].min_match == min_match


# --- parse_spec: every refusal -----------------------------------------------------------------

CANARY = "stable: {checkpoint: a}\ncanary: "
NEITHER = "give either 'models' (a mapping of model names) or 'stable' (one model), not both or neither"
BAD_SPECS = [
    # (text, exact message after "rollout spec: ")
    ("- a\n- b\n", "expected a mapping with 'models' or 'stable', found list"),
    ("42", "expected a mapping with 'models' or 'stable', found int"),
    ("just text", "expected a mapping with 'models' or 'stable', found str"),
    ("", "expected a mapping with 'models' or 'stable', found NoneType"),
    ("stable: {checkpoint: a}\nweights: 3\nzzz: 1\n", "unknown keys ['weights', 'zzz']"),
    ("revision: r", NEITHER),
    ("stable: {checkpoint: a}\nmodels: {m: {stable: {checkpoint: a}}}", NEITHER),
    ("models: [a, b]", "models must be a mapping of model names to entries with 'stable'"),
    ("models: {}", "'models' names no model"),
    ("stable: a.safetensors", "stable must be a mapping with 'checkpoint'"),
    ("stable: {checkpoint: a, path: b}", "stable has unknown keys ['path']"),
    ("stable: {}", "stable.checkpoint must be a checkpoint name in the store"),
    ("stable: {checkpoint: ''}", "stable.checkpoint must be a checkpoint name in the store, found ''"),
    ("stable: {checkpoint: 3}", "stable.checkpoint must be a checkpoint name in the store, found 3"),
    ("stable: {checkpoint: a, mode: merge}", "stable.mode must be replace (express merges as stable.merge), found 'merge'"),
    ("stable: {checkpoint: a, merge: b.safetensors}", "stable.merge must be a list of checkpoint names, found 'b.safetensors'"),
    ("stable: {checkpoint: a, merge: [b, '']}", "stable.merge must be a list of checkpoint names, found ''"),
    ("stable: {checkpoint: a, merge: [b, 3]}", "stable.merge must be a list of checkpoint names, found 3"),
    ("stable: {checkpoint: a, merge: null}", "stable.merge must be a list of checkpoint names, found None"),
    ("stable: {checkpoint: a}\ncanary: b", "canary must be a mapping with 'checkpoint'"),
    (CANARY + "{weight: 5}", "canary.checkpoint must be a checkpoint name in the store"),
    (CANARY + "{checkpoint: b, path: c, stable: d}", "canary has unknown keys ['path', 'stable']"),
    (CANARY + "{checkpoint: b, mode: swap}",
     "canary.mode must be replace or merge, found 'swap'"),
    (CANARY + "{checkpoint: b, weight: 101}", "canary.weight must be an integer 0-100, found 101"),
    (CANARY + "{checkpoint: b, weight: -1}", "canary.weight must be an integer 0-100, found -1"),
    (CANARY + "{checkpoint: b, weight: 1.5}", "canary.weight must be an integer 0-100, found 1.5"),
    (CANARY + "{checkpoint: b, weight: '10'}",
     "canary.weight must be an integer 0-100, found '10'"),
    (CANARY + "{checkpoint: b, weight: true}",
     "canary.weight must be an integer 0-100, found True"),
    (CANARY + "{checkpoint: b, shadow: 200}", "canary.shadow must be an integer 0-100, found 200"),
    (CANARY + "{checkpoint: b, shadow: false}",
     "canary.shadow must be an integer 0-100, found False"),
    (CANARY + "{checkpoint: b, min_match: 1.5}", "canary.min_match must be a number within [0, 1], found 1.5"),
    (CANARY + "{checkpoint: b, min_match: -0.1}", "canary.min_match must be a number within [0, 1], found -0.1"),
    (CANARY + "{checkpoint: b, min_match: half}", "canary.min_match must be a number within [0, 1], found 'half'"),
    (CANARY + "{checkpoint: b, min_match: .nan}", "canary.min_match must be a number within [0, 1], found nan"),
    ("stable: [a", "not valid YAML/JSON: while parsing a flow sequence"),
    ('{"stable": {"checkpoint": "a"}', "not valid YAML/JSON: while parsing a flow mapping"),
    ("a: b: c", "not valid YAML/JSON: mapping values are not allowed here"),
    ("stable: !!python/name:os.system a",
     "not valid YAML/JSON: could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'"),
    ("*anchor", "not valid YAML/JSON: found undefined alias 'anchor'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPECS)
def test_bad_spec_is_a_400_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError) as info:
        parse_spec(text)
    assert str(info.value) == f"rollout spec: {message}"
    assert isinstance(info.value, RequestError)
    assert status_of(info.value) == 400
    assert info.value.reason == "rollout"


@pytest.mark.parametrize(("text", "message"), [
    ("{1: a, b: c, stable: {checkpoint: a}}", "unknown keys [1, 'b']"),
    ("stable: {checkpoint: a, 1: x, y: z}", "stable has unknown keys [1, 'y']"),
])
def test_unknown_keys_of_mixed_types_are_a_400(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError) as info:
        parse_spec(text)
    assert str(info.value) == f"rollout spec: {message}"


def test_min_match_bool_is_refused() -> None:
    with pytest.raises(RolloutSpecError, match=r"^rollout spec: canary\.min_match must be a number within \[0, 1\], found True$"):
        parse_spec(CANARY + "{checkpoint: b, min_match: true}")


def test_where_prefixes_the_message() -> None:
    with pytest.raises(RolloutSpecError, match=r"^rollout file r\.yaml: stable\.checkpoint must be a checkpoint name"):
        parse_spec("stable: {}", where="rollout file r.yaml")


# --- spec_of -----------------------------------------------------------------------------------

def _slot(checkpoint: str, *merges: str, version: str = "v") -> SlotSpec:
    return SlotSpec(checkpoint=checkpoint, merges=merges, version=version, meta={"arch": "resnet18", "num_classes": 7})


def test_spec_of_stable_only_names_the_generation_when_there_is_no_revision() -> None:
    state = _state(generation=3, stable=_slot("base.safetensors", "head-a.safetensors"))
    assert spec_of(state) == _one(revision="generation-3", stable="base.safetensors",
                                         stable_merges=("head-a.safetensors",))


def test_spec_of_keeps_the_revision() -> None:
    state = _state(generation=3, stable=_slot("base"), revision="2026-12-01.1")
    assert spec_of(state).revision == "2026-12-01.1"


def test_spec_of_merge_canary_on_plain_stable() -> None:
    state = _state(generation=2, stable=_slot("base"), canary=_slot("base", "head-v3", version="c"),
                         weight=10, shadow=5)
    assert spec_of(state) == _one(revision="generation-2", stable="base", canary="head-v3", canary_mode="merge",
                                         weight=10, shadow=5)


def test_spec_of_merge_canary_on_merged_stable() -> None:
    state = _state(generation=4, stable=_slot("base", "head-a"), canary=_slot("base", "head-a", "head-b"),
                         weight=25, shadow=0)
    assert spec_of(state) == _one(revision="generation-4", stable="base", stable_merges=("head-a",),
                                         canary="head-b", canary_mode="merge", weight=25)


def test_spec_of_replace_canary() -> None:
    state = _state(generation=5, stable=_slot("base", "head-a"), canary=_slot("other"), weight=50, shadow=100)
    assert spec_of(state) == _one(revision="generation-5", stable="base", stable_merges=("head-a",),
                                         canary="other", canary_mode="replace", weight=50, shadow=100)


def test_spec_of_canary_of_the_stable_checkpoint_itself_is_a_replace() -> None:
    state = _state(generation=6, stable=_slot("base"), canary=_slot("base"), weight=1)
    spec = spec_of(state).models[DEFAULT_MODEL]
    assert (spec.canary, spec.canary_mode, spec.weight) == ("base", "replace", 1)


@pytest.mark.parametrize("state", [
    _state(generation=2, stable=_slot("base"), canary=_slot("base", "head-v3"), weight=10, shadow=5),
    _state(generation=2, stable=_slot("base", "a", "b"), canary=_slot("base", "a", "b", "c"), weight=99),
    _state(generation=2, stable=_slot("base", "a"), canary=_slot("x"), weight=3, shadow=7),
    _state(generation=9, stable=_slot("base", "a"), revision="r9"),
])
def test_spec_of_round_trips_through_the_text_form(state: ServingState) -> None:
    spec = spec_of(state)
    assert parse_spec(yaml.safe_dump(spec.to_dict())) == spec
    assert parse_spec(json.dumps(spec.to_dict())) == spec


def test_spec_of_tells_apart_canaries_that_serve_different_weights() -> None:
    # canary loaded as base+b (merge onto a plain stable), then stable loaded as base+a (merge):
    # the canary still serves base+b, which is not what a canary of plain base serves
    merged = _state(generation=3, stable=_slot("base", "a"), canary=_slot("base", "b"), weight=10)
    plain = _state(generation=3, stable=_slot("base", "a"), canary=_slot("base"), weight=10)
    assert spec_of(merged) != spec_of(plain)


# --- RolloutFile -------------------------------------------------------------------------------

SPEC = _one(revision="2026-12-01", stable="base.safetensors", stable_merges=("head-a.safetensors",),
                   canary="head-b.safetensors", canary_mode="merge", weight=10, shadow=5, min_match=0.75)


@pytest.mark.parametrize("name", ["rollout.yaml", "rollout.yml", "rollout.json"])
def test_write_then_read_round_trips(tmp_path: Path, name: str) -> None:
    file = RolloutFile(tmp_path / name)
    file.write(SPEC)
    assert file.read() == SPEC
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind


def test_json_file_is_json_and_yaml_file_is_yaml(tmp_path: Path) -> None:
    RolloutFile(tmp_path / "r.json").write(SPEC)
    RolloutFile(tmp_path / "r.yaml").write(SPEC)
    expected = {"revision": "2026-12-01",
                "stable": {"checkpoint": "base.safetensors", "merge": ["head-a.safetensors"]},
                "canary": {"checkpoint": "head-b.safetensors", "mode": "merge", "weight": 10, "shadow": 5,
                           "min_match": 0.75}}
    json_text = (tmp_path / "r.json").read_text()
    assert json_text.endswith("}\n")
    assert json.loads(json_text) == expected
    yaml_text = (tmp_path / "r.yaml").read_text()
    assert not yaml_text.lstrip().startswith("{")
    # a date-like revision stays a string in YAML (quoted), not a date
    assert yaml.safe_load(yaml_text) == expected


def test_write_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text("stable: {checkpoint: old}\n")
    file = RolloutFile(path)
    before = file.stamp()
    inode = path.stat().st_ino
    file.write(SPEC)
    assert file.read() == SPEC
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert file.stamp() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.yaml"]


def test_stamp_changes_after_a_write_of_the_same_size(tmp_path: Path) -> None:
    file = RolloutFile(tmp_path / "rollout.json")
    file.write(SPEC)
    first = file.stamp()
    file.write(SPEC)  # same text, same size, maybe the same mtime: the inode still differs
    second = file.stamp()
    assert first is not None and second is not None
    assert first[1] == second[1]
    assert second != first


def test_stamp_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert RolloutFile(tmp_path / "none.yaml").stamp() is None


def test_stamp_is_mtime_size_inode(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stable: {checkpoint: a}\n")
    st = os.stat(path)
    assert RolloutFile(path).stamp() == (st.st_mtime_ns, st.st_size, st.st_ino)


def test_read_missing_file_is_a_400(tmp_path: Path) -> None:
    with pytest.raises(RolloutSpecError, match=r"^rollout file unreadable: FileNotFoundError$") as info:
        RolloutFile(tmp_path / "missing.yaml").read()
    assert status_of(info.value) == 400


def test_read_binary_file_is_a_400(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\xfa garbage")
    with pytest.raises(RolloutSpecError, match=r"^rollout file unreadable: UnicodeDecodeError$"):
        RolloutFile(path).read()


def test_read_names_the_file_not_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stable: {checkpoint: a, mode: merge}\n")
    with pytest.raises(RolloutSpecError) as info:
        RolloutFile(path).read()
    assert str(info.value) == "rollout file r.yaml: stable.mode must be replace (express merges as stable.merge), found 'merge'"
    assert str(tmp_path) not in str(info.value)


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text("stable: {checkpoint: old}\n")

    def refuse(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        RolloutFile(path).write(SPEC)
    assert path.read_text() == "stable: {checkpoint: old}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.yaml"]


def test_writable(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    assert RolloutFile(path).writable() is True  # missing, in a writable folder
    path.write_text("stable: {checkpoint: a}\n")
    assert RolloutFile(path).writable() is True
    if os.geteuid() != 0:  # root can write anything
        path.chmod(0o444)
        assert RolloutFile(path).writable() is False


# --- many models -------------------------------------------------------------------------------

MODELS_YAML = """\
revision: r2
models:
  shapes:
    stable: {checkpoint: shapes.safetensors}
    canary: {checkpoint: head-v3.safetensors, mode: merge, weight: 10, shadow: 100}
  glyphs:
    stable: {checkpoint: shapes.safetensors, merge: [glyphs-head.safetensors]}
"""


def test_models_form_keeps_every_entry_in_order() -> None:
    spec = parse_spec(MODELS_YAML)
    assert spec == RolloutSpec("r2", {
        "shapes": ModelSpec("shapes.safetensors", canary="head-v3.safetensors", canary_mode="merge", weight=10, shadow=100),
        "glyphs": ModelSpec("shapes.safetensors", stable_merges=("glyphs-head.safetensors",)),
    })
    assert list(spec.models) == ["shapes", "glyphs"]  # the first is the default model


def test_a_malformed_entry_is_refused_alone() -> None:
    spec = parse_spec(MODELS_YAML + "  broken:\n    stable: {checkpoint: a, weight: 3}\n"
                      "  'bad name':\n    stable: {checkpoint: a}\n  late: {stable: {checkpoint: late.safetensors}}\n")
    assert list(spec.models) == ["shapes", "glyphs", "late"]
    assert spec.errors == {
        "broken": "rollout spec: models.broken: stable has unknown keys ['weight']",
        "bad name": "rollout spec: models.bad name: a model name is 1-64 of A-Z a-z 0-9 _ . -",
    }


def test_spec_of_many_models_round_trips() -> None:
    state = ServingState(3, {"shapes": ModelState(_slot("base"), canary=_slot("base", "head"), weight=5),
                             "glyphs": ModelState(_slot("base", "glyphs"))}, "shapes", "r3")
    spec = spec_of(state)
    assert spec == RolloutSpec("r3", {"shapes": ModelSpec("base", canary="head", canary_mode="merge", weight=5),
                                      "glyphs": ModelSpec("base", stable_merges=("glyphs",))})
    assert parse_spec(yaml.safe_dump(spec.to_dict(), sort_keys=False)) == spec


def test_spec_of_one_model_is_the_single_model_form() -> None:
    assert "models" not in spec_of(_state(1, stable=_slot("base"))).to_dict()


def test_spec_of_names_the_default_model_first() -> None:
    state = ServingState(3, {"a": ModelState(_slot("a")), "z": ModelState(_slot("z"))}, "z")
    assert list(spec_of(state).models) == ["z", "a"]
